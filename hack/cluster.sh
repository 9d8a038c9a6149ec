#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) as plain
# processes on 127.0.0.1, for tests and local development. See hack/README.md.
#
#   hack/cluster.sh up [--owner-pid PID] [--controllers LIST] [--advertise-address IP]
#                      [--service-cidr CIDRS] [--egress-uds PATH]
#                                          build what is missing, start, wait until ready (LIST: the
#                                          controller manager's --controllers, default "*"; the last
#                                          three are hack/real-cluster.sh's: see hack/README.md)
#   hack/cluster.sh down                   take its real nodes down, stop what `up` started, delete
#                                          hollow-node netns, remove the dir
#   hack/cluster.sh env                    print `export KUBECONFIG=...` and `export PATH=<bin dir>:...`
#   hack/cluster.sh status                 show the components and whether the API server is ready
#   hack/cluster.sh restart-apiserver      restart kube-apiserver on the same port, etcd data kept
#   hack/cluster.sh stop-apiserver         stop kube-apiserver only (an outage, for reliability tests)
#   hack/cluster.sh start-apiserver        start it again on the same port, and wait until ready
#   hack/cluster.sh pause-apiserver        SIGSTOP kube-apiserver: it hangs (a partition, not a refusal)
#   hack/cluster.sh resume-apiserver       SIGCONT it
#   hack/cluster.sh nodes up FLAGS...      run loopguard-hollow in the background (flags: see its --help)
#   hack/cluster.sh nodes down             stop it (its netns go with it)
#
# State lives in ${LOOPGUARD_CLUSTER_DIR:-~/.cache/loopguard/cluster}; set it to run several clusters.
set -Eeuo pipefail
trap 'echo "cluster: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/cluster}"
marker="$dir/.loopguard-cluster"
service_ip=10.96.0.1

log() { echo "cluster: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# --- processes -------------------------------------------------------------------------------------------

# A pid file names one of our processes only while that process still runs with our state dir in its
# command line, so a pid reused after a crash is never signalled.
pid_of() {
  local pid_file="$dir/pids/$1.pid" pid
  [[ -f "$pid_file" ]] || return 1
  pid="$(<"$pid_file")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir" && echo "$pid"
}

# start NAME COMMAND...: run in its own session, detached from our stdio, log in logs/NAME.log.
start() {
  local name="$1"
  shift
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/pids/$name.pid"
}

# stop NAME...: SIGTERM to all of them at once, SIGKILL to those still running after 10s.
stop() {
  local name pid pids=()
  for name in "$@"; do
    if pid="$(pid_of "$name")" && [[ "$pid" != "$$" ]]; then # $$: the watchdog running `down` itself
      kill -TERM "$pid" 2>/dev/null || true
      kill -CONT "$pid" 2>/dev/null || true # a paused process acts on TERM only once continued
      pids+=("$pid")
    fi
    rm -f "$dir/pids/$name.pid"
  done
  for _ in $(seq 100); do
    running_pids "${pids[@]}" || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  while running_pids "${pids[@]}"; do sleep 0.1; done
}

running_pids() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

# started NAME: whether the process that `start` just launched still runs. Not pid_of: until the
# forked shell has exec'd the command, its command line does not name $dir yet, and on a busy machine
# that moment can last longer than a first health check.
started() {
  local pid
  pid="$(<"$dir/pids/$1.pid")" || return 1
  [[ -r "/proc/$pid/stat" ]] && [[ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

# wait_for WHAT PROCESS COMMAND...: retry COMMAND for up to 60s while PROCESS keeps running.
wait_for() {
  local what="$1" process="$2"
  shift 2
  for _ in $(seq 600); do
    "$@" >/dev/null 2>&1 && return 0
    started "$process" || die "$process exited while waiting for $what; see $dir/logs/$process.log"
    sleep 0.1
  done
  die "timed out waiting for $what; see $dir/logs/$process.log"
}

# choose_ports N: N distinct TCP ports from LOOPGUARD_PORT_RANGE (FIRST-LAST, default 20000-39999)
# that no socket of this machine's network namespace uses, in random order, on one line. Ports of the
# kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default) only when too few
# others are free: any outgoing connection may take one of those between choosing and binding.
choose_ports() {
  local want="$1" range="${LOOPGUARD_PORT_RANGE:-20000-39999}" first last free eph_first=0 eph_last=-1 fixed
  if [[ ! "$range" =~ ^([0-9]+)-([0-9]+)$ ]] || ((BASH_REMATCH[1] < 1024 || BASH_REMATCH[1] > BASH_REMATCH[2] ||
    BASH_REMATCH[2] > 65535)); then
    die "LOOPGUARD_PORT_RANGE=$range: expected FIRST-LAST, two ports from 1024 to 65535 (for example 20000-39999)"
  fi
  first="${BASH_REMATCH[1]}" last="${BASH_REMATCH[2]}"
  free="$(comm -23 <(seq "$first" "$last" | sort) <(ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -u))"
  if (($(grep -c . <<<"$free") < want)); then
    die "$(grep -c . <<<"$free") of the ports $range are free on this machine and up needs $want (etcd's client and peer ports, kube-apiserver, kube-controller-manager, kube-scheduler); nothing was started. See who holds them with: ss -Htanp 'sport >= :$first and sport <= :$last'; free some, or set LOOPGUARD_PORT_RANGE to a range with $want free ports"
  fi
  read -r eph_first eph_last </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  fixed="$(awk -v a="$eph_first" -v b="$eph_last" '$1 < a || $1 > b' <<<"$free")"
  if (($(grep -c . <<<"$fixed") >= want)); then
    free="$fixed"
  fi
  shuf -n "$want" <<<"$free" | tr '\n' ' '
}

# --- certificates ----------------------------------------------------------------------------------------

# cert NAME SUBJECT [SANS]: an EC key and a certificate signed by the cluster CA.
cert() {
  local name="$1" subject="$2" sans="${3:-}" pki="$dir/pki"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subject" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  local ext="$pki/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n "$sans" ]]; then
      echo "extendedKeyUsage=serverAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm "$pki/$name.csr" "$ext"
}

make_pki() {
  local pki="$dir/pki"
  mkdir -p "$pki"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
    -subj "/CN=loopguard-test-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  local advertised=""
  [[ "$ADVERTISE_ADDRESS" != 127.0.0.1 ]] && advertised="IP:$ADVERTISE_ADDRESS,"
  cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:$service_ip,${advertised}DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=kubernetes-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# kubeconfig NAME: $dir/NAME.kubeconfig with the client certificate pki/NAME.{crt,key} embedded.
kubeconfig() {
  local name="$1" pki="$dir/pki"
  cat >"$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: loopguard
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$pki/$name.crt")
    client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
- name: loopguard
  context: {cluster: loopguard, user: $name}
current-context: loopguard
EOF
}

# --- components ------------------------------------------------------------------------------------------

start_etcd() {
  start etcd "$BIN/etcd" --name=loopguard --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="loopguard=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level=warn
  wait_for etcd etcd curl -fsS --max-time 5 "http://127.0.0.1:$ETCD_PORT/health"
}

# By default the endpoint reconciler is off: Endpoints may not hold a loopback address, and workloads
# reach the API server through the hollow nodes' proxy, not through the kubernetes Service. A real
# cluster (hack/real-cluster.sh) advertises an address on its own bridge, where a relay listens, and
# sends what the API server dials itself (kubectl logs, exec) through an HTTP CONNECT proxy on a UNIX
# socket into that network: the API server still binds 127.0.0.1 only.
start_apiserver() {
  local pki="$dir/pki" extra=(--endpoint-reconciler-type=none)
  if [[ "$ADVERTISE_ADDRESS" != 127.0.0.1 ]]; then
    extra=(--endpoint-reconciler-type=lease
      --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key"
      --kubelet-preferred-address-types=InternalIP)
  fi
  if [[ -n "$EGRESS_UDS" ]]; then
    cat >"$dir/egress-selector.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: $EGRESS_UDS
EOF
    extra+=(--egress-selector-config-file="$dir/egress-selector.yaml")
  fi
  start kube-apiserver "$KUBE_APISERVER" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address="$ADVERTISE_ADDRESS" --secure-port="$APISERVER_PORT" \
    "${extra[@]}" --cert-dir="$pki" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false
  wait_for "kube-apiserver /readyz" kube-apiserver curl -fsS --max-time 5 --cacert "$pki/ca.crt" \
    --cert "$pki/admin.crt" --key "$pki/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz"
}

start_controller_manager() {
  local pki="$dir/pki" kc="$dir/controller-manager.kubeconfig"
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$kc" --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --authentication-skip-lookup \
    --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" --cert-dir="$pki" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --profiling=false --controllers="$controllers"
}

start_scheduler() {
  local pki="$dir/pki" kc="$dir/scheduler.kubeconfig"
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$kc" --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --authentication-skip-lookup \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$pki" \
    --leader-elect=false --profiling=false
}

load_env() {
  [[ -f "$dir/cluster.env" ]] || die "no cluster in $dir (run: hack/cluster.sh up)"
  # shellcheck source=/dev/null
  source "$dir/cluster.env"
  # Clusters started before these settings existed.
  : "${ADVERTISE_ADDRESS:=127.0.0.1}" "${SERVICE_CIDR:=10.96.0.0/12}" "${EGRESS_UDS:=}" \
    "${KUBE_APISERVER:=$BIN/kube-apiserver}"
}

running() { [[ -f "$dir/cluster.env" ]] && pid_of kube-apiserver >/dev/null && pid_of etcd >/dev/null; }

# --- commands --------------------------------------------------------------------------------------------

cmd_up() {
  local owner_pid=""
  up_args=("$@") # a start that lost a port to another process starts again with these
  controllers="*"
  ADVERTISE_ADDRESS=127.0.0.1 SERVICE_CIDR=10.96.0.0/12 EGRESS_UDS=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --owner-pid) owner_pid="$2" && shift 2 ;;
      --controllers) controllers="$2" && shift 2 ;;
      --advertise-address) ADVERTISE_ADDRESS="$2" && shift 2 ;;
      --service-cidr) SERVICE_CIDR="$2" && shift 2 ;;
      --egress-uds) EGRESS_UDS="$2" && shift 2 ;;
      *) die "up: unknown argument $1" ;;
    esac
  done
  if running; then
    log "already running in $dir"
  else
    [[ -e "$dir" ]] && cmd_down # leftovers of a crashed run
    BIN="$("$repo/hack/build-control-plane.sh")"
    # LOOPGUARD_KUBE_APISERVER: another kube-apiserver binary (the oldest version loopguard claims,
    # hack/build-oldest-apiserver.sh); the other components stay the pinned ones.
    KUBE_APISERVER="${LOOPGUARD_KUBE_APISERVER:-$BIN/kube-apiserver}"
    [[ -x "$KUBE_APISERVER" ]] || die "LOOPGUARD_KUBE_APISERVER=$KUBE_APISERVER is not an executable: build it with hack/build-oldest-apiserver.sh"
    local ports
    ports="$(choose_ports 5)" || exit 1
    read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT CONTROLLER_MANAGER_PORT SCHEDULER_PORT <<<"$ports"
    mkdir -p "$dir/logs" "$dir/pids"
    touch "$marker"
    trap up_failed EXIT
    declare -p BIN KUBE_APISERVER ETCD_PORT ETCD_PEER_PORT APISERVER_PORT CONTROLLER_MANAGER_PORT SCHEDULER_PORT \
      ADVERTISE_ADDRESS SERVICE_CIDR EGRESS_UDS |
      sed 's/^declare -- //' >"$dir/cluster.env"
    ln -sfn "$BIN" "$dir/bin"
    make_pki
    kubeconfig admin
    kubeconfig controller-manager
    kubeconfig scheduler
    ln -sf admin.kubeconfig "$dir/kubeconfig"
    start_etcd
    start_apiserver
    start_controller_manager
    start_scheduler
    wait_ready
    trap - EXIT
    log "ready: export KUBECONFIG=$dir/kubeconfig"
  fi
  [[ -n "$owner_pid" ]] && start_watchdog "$owner_pid"
  return 0
}

up_failed() {
  log "start-up failed; the last lines of each log:"
  tail -n 20 "$dir"/logs/*.log >&2 2>/dev/null || true
  if grep -qs "address already in use" "$dir"/logs/*.log; then
    local attempt="${LOOPGUARD_UP_ATTEMPT:-1}"
    if ((attempt < 3)); then
      log "a port was taken by another process between choosing it and binding it; starting again on other free ports (attempt $((attempt + 1)) of 3)"
      cmd_down
      LOOPGUARD_UP_ATTEMPT=$((attempt + 1)) exec "$repo/hack/cluster.sh" up "${up_args[@]}"
    fi
    log "a port was taken by another process between choosing it and binding it, $attempt times; run up again (it chooses other free ports), or set LOOPGUARD_PORT_RANGE to ports nothing else on this machine uses"
  fi
  cmd_down
}

# Ready means: API server ready, controller manager and scheduler healthy, and the controllers that
# every Pod needs (service accounts, root CA publisher) have done their first round.
wait_ready() {
  local kubectl=("$BIN/kubectl" --kubeconfig="$dir/kubeconfig")
  wait_for "kube-controller-manager /healthz" kube-controller-manager \
    curl -fsSk --max-time 5 "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
  wait_for "kube-scheduler /healthz" kube-scheduler curl -fsSk --max-time 5 "https://127.0.0.1:$SCHEDULER_PORT/healthz"
  wait_for "the default ServiceAccount" kube-controller-manager "${kubectl[@]}" get serviceaccount default
  wait_for "the kube-root-ca.crt ConfigMap" kube-controller-manager "${kubectl[@]}" get configmap kube-root-ca.crt
}

# The watchdog runs `down` once the owner process is gone. It identifies the owner by pid and start time,
# so a reused pid does not keep the cluster alive.
start_watchdog() {
  local owner="$1" started
  # An owner that died while the cluster started would leave it running with nobody to stop it.
  if ! started="$(cut -d' ' -f22 "/proc/$owner/stat" 2>/dev/null)"; then
    log "owner process $owner is gone: taking the cluster down"
    cmd_down
    exit 1
  fi
  stop watchdog
  # shellcheck disable=SC2016 # expanded by the watchdog's own shell
  start watchdog bash -c '
    while [[ "$(cut -d" " -f22 "/proc/$1/stat" 2>/dev/null)" == "$2" ]]; do sleep 1; done
    LOOPGUARD_CLUSTER_DIR="$4" exec "$3" down' watchdog "$owner" "$started" "$repo/hack/cluster.sh" "$dir"
}

# Hollow nodes first, while the API server still answers their last writes; etcd last, as kube-apiserver
# does not finish shutting down without it.
stop_components() {
  stop hollow
  stop kube-scheduler kube-controller-manager kube-apiserver
  stop etcd
}

# Network namespaces of hollow nodes and their pods whose harness did not get to clean up (each
# node's and pod's state folder holds a `netns` marker file while its namespace exists), with whatever
# still runs in them.
delete_hollow_netns() {
  local marker node
  for marker in "$dir"/hollow/*/pods/*/netns "$dir"/hollow/*/nodes/*/netns; do
    [[ -f "$marker" ]] || continue
    node="$(<"$marker")"
    [[ -e "/run/netns/$node" ]] || continue
    ip netns pids "$node" | xargs -r kill -KILL
    ip netns delete "$node" && log "deleted leftover netns $node"
  done
  return 0
}

cmd_down() {
  [[ -e "$dir" ]] || return 0
  [[ -f "$marker" ]] || die "$dir is not a cluster dir made by hack/cluster.sh; not touching it"
  # Real nodes first (their kubelet, containerd, shims, mounts, cgroups and netns): removing the
  # dir under a live node would leave all of that running (the watchdog runs `down` after a crash).
  if [[ -d "$dir/real-cluster" ]]; then # hack/real-cluster.sh's nodes and network
    LOOPGUARD_CLUSTER_DIR="$dir" "$repo/hack/real-cluster.sh" down-network ||
      die "down: the real cluster's network did not go down; $dir kept (run down again)"
  fi
  local node
  for node in "$dir"/real-nodes/*/; do
    [[ -d "$node" ]] || continue
    LOOPGUARD_CLUSTER_DIR="$dir" "$repo/hack/real-node.sh" down "$(basename "$node")" ||
      die "down: real node $(basename "$node") did not go down; $dir kept (run down again)"
  done
  stop_components
  delete_hollow_netns
  stop watchdog
  rm -rf "$dir"
  log "down: removed $dir"
}

cmd_env() {
  load_env
  echo "export KUBECONFIG=$dir/kubeconfig"
  echo "export PATH=$dir/bin:\$PATH"
}

cmd_status() {
  load_env
  local name pid
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler hollow watchdog; do
    if pid="$(pid_of "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
  done
  echo "kube-apiserver: https://127.0.0.1:$APISERVER_PORT"
  echo "readyz: $(curl -sS --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" 2>&1)"
}

cmd_restart_apiserver() {
  load_env
  stop kube-apiserver
  start_apiserver
  log "kube-apiserver restarted on port $APISERVER_PORT"
}

cmd_stop_apiserver() {
  load_env
  stop kube-apiserver
  log "kube-apiserver stopped (port $APISERVER_PORT); etcd and the other components keep running"
}

cmd_signal_apiserver() {
  load_env
  local pid
  pid="$(pid_of kube-apiserver)" || die "kube-apiserver is not running"
  kill "-$1" "$pid"
  log "kube-apiserver (pid $pid) got SIG$1"
}

cmd_start_apiserver() {
  load_env
  pid_of kube-apiserver >/dev/null && die "kube-apiserver is already running"
  start_apiserver
  log "kube-apiserver started on port $APISERVER_PORT"
}

cmd_nodes() {
  load_env
  case "${1:-}" in
    up)
      shift
      stop hollow
      (cd "$repo" && cargo build --quiet -p loopguard-hollow)
      start hollow "${CARGO_TARGET_DIR:-$repo/target}/debug/loopguard-hollow" \
        --kubeconfig="$dir/kubeconfig" --state-dir="$dir/hollow/cli" "$@"
      log "loopguard-hollow started; log in $dir/logs/hollow.log"
      ;;
    down) stop hollow ;;
    *) die "usage: hack/cluster.sh nodes up FLAGS... | nodes down" ;;
  esac
}

case "${1:-}" in
  up) shift && cmd_up "$@" ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  restart-apiserver) cmd_restart_apiserver ;;
  stop-apiserver) cmd_stop_apiserver ;;
  start-apiserver) cmd_start_apiserver ;;
  pause-apiserver) cmd_signal_apiserver STOP ;;
  resume-apiserver) cmd_signal_apiserver CONT ;;
  nodes) shift && cmd_nodes "$@" ;;
  *) sed -n '2,15s/^# \{0,1\}//p' "$0" >&2 && exit 2 ;;
esac
