#!/usr/bin/env bash
# A real cluster on this machine: the control plane of hack/cluster.sh plus three real nodes
# (hack/real-node.sh: the real kubelet, containerd and runc), each a network namespace with a pod
# network and kube-proxy, joined by a bridge in a router namespace of the cluster's own. Nothing is
# added to the machine's own network: every interface, address and route lives in namespaces this
# script made, and the API server (on the machine's 127.0.0.1) is reached through relays on UNIX
# sockets.
#
#   hack/real-cluster.sh up [--image ARCHIVE]... [--owner-pid PID]
#                                 start it (ARCHIVE: OCI archives pushed to the cluster's registry, which
#                                 the nodes pull from; PID: take everything down once that process exits,
#                                 as hack/cluster.sh does)
#   hack/real-cluster.sh env      print the exports for kubectl/helm and the nodes' names
#   hack/real-cluster.sh status   nodes, their kube-proxy mode and iptables backend
#   hack/real-cluster.sh down     take the nodes, the network and the control plane down
#
# The nodes (PREFIX is "lg" and 4 hex digits of the state dir's hash, so that two clusters with
# different LOOPGUARD_CLUSTER_DIRs never share a namespace name):
#   PREFIX-legacy     kube-proxy in iptables mode on the legacy backend   10.254.10.11  fd00:254:10::11
#   PREFIX-nft        kube-proxy in iptables mode on the nft backend      10.254.10.12  fd00:254:10::12
#   PREFIX-nftables   kube-proxy in nftables mode                         10.254.10.13  fd00:254:10::13
# Pod networks 10.244.N.0/24 and fd00:10:244:N::/64 (N = 0, 1, 2), routed node to node; Services
# 10.96.0.0/12 and fd00:10:96::/112. The router namespace PREFIX-net holds the bridge with
# 10.254.10.1 and fd00:254:10::1, the address the API server advertises for the `kubernetes`
# Service: a relay there carries it to the API server, and an HTTP CONNECT proxy there carries what
# the API server dials itself (kubectl logs and exec) to the nodes.
# The cluster's OCI registry (go-containerregistry's, hack/build-release-tools.sh) listens on the
# machine's 127.0.0.1 and is relayed to 10.254.10.1:5000 in the router namespace, where the nodes'
# containerd pulls from it over plain HTTP (each node's certs.d/10.254.10.1:5000/hosts.toml says so).
# `env` prints each pushed image as LOOPGUARD_REAL_IMAGE_<n>=10.254.10.1:5000/REPOSITORY@DIGEST.
set -Eeuo pipefail
trap 'echo "real-cluster: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/real-cluster}"
export LOOPGUARD_CLUSTER_DIR="$dir"
rc="$dir/real-cluster"
prefix="lg$(printf '%s' "$dir" | sha256sum | cut -c1-4)"
router="$prefix-net"
router_ip=10.254.10.1
router_ip6=fd00:254:10::1
service_cidrs=10.96.0.0/12,fd00:10:96::/112
cluster_cidrs=10.244.0.0/16,fd00:10:244::/56
# name proxy-mode iptables-backend host-packages, in the order of their index N. The packages make
# each node's host facts (its dpkg database, in hosts/NAME, which the chart mounts with
# agent.perNodeHostRoots): iptables only (the seed's rule applies), ufw installed and inactive (the
# ufw rule), nftables (the nftables rule).
node_specs=("$prefix-legacy iptables legacy iptables" "$prefix-nft iptables nft iptables,ufw"
  "$prefix-nftables nftables nft iptables,nftables")

log() { echo "real-cluster: $*" >&2; }
die() {
  log "$*"
  exit 1
}
[[ $EUID -eq 0 ]] || die "needs root"

node_names() {
  local spec
  for spec in "${node_specs[@]}"; do echo "${spec%% *}"; done
}

kubectl() { "$dir/bin/kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }

pid_of() {
  local file="$rc/pids/$1.pid" pid
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$rc" && echo "$pid"
}

start() {
  local name="$1"
  shift
  setsid "$@" </dev/null >>"$rc/logs/$name.log" 2>&1 &
  echo $! >"$rc/pids/$name.pid"
}

wait_for() {
  local what="$1"
  shift
  for _ in $(seq 600); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "timed out waiting for $what; see $rc/logs and $dir/real-nodes/*/logs"
}

# Node N's IPv6 pod network, written as RFC 5952 has it (the API server warns otherwise).
pod_cidr6() { if (($1 == 0)); then echo fd00:10:244::/64; else echo "fd00:10:244:$1::/64"; fi; }

# Whether the control plane's API server answers /readyz.
api_ready() {
  (
    source "$dir/cluster.env" 2>/dev/null || exit 1
    curl -fsS --max-time 5 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" \
      --key "$dir/pki/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz"
  ) >/dev/null 2>&1
}

in_router() { nsenter "--net=/run/netns/$router" "$@"; }

# The router: a bridge every node's eth0 is plugged into, the API server's advertised address, a
# route to every pod network through its node.
router_up() {
  source "$dir/cluster.env"
  ip netns add "$router"
  ip -n "$router" link set lo up
  ip -n "$router" link add br0 type bridge
  ip -n "$router" addr add "$router_ip/24" dev br0
  ip -n "$router" addr add "$router_ip6/64" dev br0 nodad
  ip -n "$router" link set br0 up
  in_router sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  # Bridged frames between nodes skip the router's own netfilter (the nodes filter their own).
  if in_router test -e /proc/sys/net/bridge/bridge-nf-call-iptables; then
    in_router sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0
  fi
  local n
  for n in 0 1 2; do
    ip -n "$router" route add "10.244.$n.0/24" via "10.254.10.1$((n + 1))"
    ip -n "$router" -6 route add "$(pod_cidr6 "$n")" via "fd00:254:10::1$((n + 1))"
  done
  start relay-host socat "UNIX-LISTEN:$rc/apiserver.sock,fork,unlink-early" "TCP:127.0.0.1:$APISERVER_PORT"
  wait_for "the API server relay's socket" test -S "$rc/apiserver.sock"
  start relay-router nsenter "--net=/run/netns/$router" \
    socat "TCP-LISTEN:$APISERVER_PORT,bind=$router_ip,fork,reuseaddr" "UNIX-CONNECT:$rc/apiserver.sock"
  if ((${#images[@]})); then registry_up; fi
  start egress-proxy nsenter "--net=/run/netns/$router" python3 "$repo/hack/real-node/connect-proxy.py" \
    "$rc/egress.sock" 10.254.10.0/24 fd00:254:10::/64 10.244.0.0/16 fd00:10:244::/56
  wait_for "the API server through the router" in_router curl -fsS --max-time 5 --cacert "$dir/pki/ca.crt" \
    --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" "https://$router_ip:$APISERVER_PORT/readyz"
  wait_for "the egress proxy's socket" test -S "$rc/egress.sock"
}

# The cluster's registry, relayed into the router namespace, with every --image archive pushed to
# it under its own repository and tag; $rc/images lists them as pulled from the nodes, by digest.
registry_up() {
  local tools port archive layout name reference digest n=0
  tools="$("$repo/hack/build-release-tools.sh")"
  mkdir -p "$rc/registry"
  start registry "$tools/crane" registry serve --address 127.0.0.1:0 --disk "$rc/registry"
  wait_for "the registry's port" grep -q 'serving on port' "$rc/logs/registry.log"
  port="$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$rc/logs/registry.log" | head -1)"
  start relay-registry-host socat "UNIX-LISTEN:$rc/registry.sock,fork,unlink-early" "TCP:127.0.0.1:$port"
  wait_for "the registry relay's socket" test -S "$rc/registry.sock"
  start relay-registry-router nsenter "--net=/run/netns/$router" \
    socat "TCP-LISTEN:5000,bind=$router_ip,fork,reuseaddr" "UNIX-CONNECT:$rc/registry.sock"
  wait_for "the registry through the router" in_router curl -fsS --max-time 5 "http://$router_ip:5000/v2/"
  : >"$rc/images"
  for archive in "${images[@]}"; do
    layout="$(mktemp -d "$rc/layout.XXXXXX")"
    tar -xf "$archive" -C "$layout"
    # The name the archive was written under (hack/build-image.sh: REGISTRY/REPOSITORY:TAG).
    name="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$layout/index.json")" ||
      die "$archive names no image (org.opencontainers.image.ref.name in its index.json)"
    reference="${name#*/}" # without the registry
    "$tools/crane" push --insecure "$layout" "127.0.0.1:$port/$reference" >/dev/null 2>"$rc/logs/push.log" ||
      die "pushing $archive to the cluster's registry failed: $(cat "$rc/logs/push.log")"
    rm -rf "$layout"
    digest="$("$tools/crane" digest --insecure "127.0.0.1:$port/$reference")"
    echo "LOOPGUARD_REAL_IMAGE_$n=$router_ip:5000/${reference%:*}@$digest" >>"$rc/images"
    n=$((n + 1))
  done
}

# host_root NAME PACKAGES: a Debian 12 host's facts as the agent reads them: os-release, a dpkg
# database with PACKAGES (comma-separated) installed, their binaries in usr/sbin, ufw's settings
# (inactive) where ufw is installed.
host_root() {
  local root="$rc/hosts/$1" packages="$2" package
  mkdir -p "$root"/{etc,usr/sbin,var/lib/dpkg,var/lib/loopguard}
  cat >"$root/etc/os-release" <<EOF
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
ID=debian
EOF
  : >"$root/var/lib/dpkg/status"
  for package in ${packages//,/ }; do
    printf 'Package: %s\nStatus: install ok installed\nVersion: 1.0\n\n' "$package" >>"$root/var/lib/dpkg/status"
    case "$package" in
      iptables) touch "$root/usr/sbin/iptables" "$root/usr/sbin/ip6tables" ;;
      nftables) touch "$root/usr/sbin/nft" ;;
      ufw)
        touch "$root/usr/sbin/ufw"
        mkdir -p "$root/etc/ufw"
        printf 'ENABLED=no\nLOGLEVEL=low\n' >"$root/etc/ufw/ufw.conf"
        ;;
    esac
  done
}

# node_env N NAME MODE BACKEND: the settings hack/real-node.sh reads for node N.
node_env() {
  local n="$1" name="$2" mode="$3" backend="$4" routes="" m
  for m in 0 1 2; do
    ((m == n)) && continue
    routes+="10.244.$m.0/24=10.254.10.1$((m + 1)) $(pod_cidr6 "$m")=fd00:254:10::1$((m + 1)) "
  done
  mkdir -p "$dir/real-nodes/$name"
  cat >"$dir/real-nodes/$name/node.env" <<EOF
NETWORK=cluster
NODE_IP=10.254.10.1$((n + 1))
NODE_IP6=fd00:254:10::1$((n + 1))
POD_CIDR=10.244.$n.0/24
POD_CIDR6=$(pod_cidr6 "$n")
CLUSTER_CIDR=$cluster_cidrs
ROUTER_NETNS=$router
REGISTRY=$router_ip:5000
ROUTER_IP=$router_ip
ROUTER_IP6=$router_ip6
PEER=$prefix-v$n
PEER_ROUTES="$routes"
IPT_BACKEND=$backend
PROXY_MODE=$mode
APISERVER_URL=https://$router_ip:$APISERVER_PORT
CNI_BIN=$CNI_BIN
XTABLES_LOCKFILE=$rc/xtables.lock
NODE_LABELS=loopguard.dev/kube-proxy-mode=$mode,loopguard.dev/iptables-backend=$backend
EOF
}

cmd_up() {
  local owner=() images=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --image) images+=("$2") && shift 2 ;;
      --owner-pid) owner=(--owner-pid "$2") && shift 2 ;;
      *) die "up: unknown argument $1 (see the top of hack/real-cluster.sh)" ;;
    esac
  done
  local archive
  for archive in "${images[@]}"; do
    [[ -f "$archive" ]] || die "--image $archive: no such file (hack/build-image.sh prints the image's archive)"
  done
  # Running: its namespace and relays, and the control plane's API server (a crashed run leaves
  # the first behind without the rest, and is taken down below).
  if [[ -e "/run/netns/$router" ]] && pid_of relay-host >/dev/null && pid_of relay-router >/dev/null &&
    api_ready; then
    die "already up in $dir (hack/real-cluster.sh down first)"
  fi
  if [[ -e "$dir" ]]; then
    log "leftovers of an earlier run in $dir: taking them down first"
    cmd_down
  fi
  local ns
  for ns in "$router" $(node_names); do
    [[ ! -e "/run/netns/$ns" ]] ||
      die "network namespace $ns exists but $dir has no cluster that owns it; remove it by hand (ip netns pids $ns; ip netns delete $ns)"
  done
  # Every package before anything starts: the nodes' (real-node.sh) and the egress proxy's python3.
  "$repo/hack/real-node.sh" packages python3 || exit 1
  local started=$SECONDS
  trap up_failed EXIT
  "$repo/hack/cluster.sh" up "${owner[@]}" --advertise-address "$router_ip" \
    --service-cidr "$service_cidrs" --egress-uds "$rc/egress.sock"
  mkdir -p "$rc"/{logs,pids}
  touch "$rc/xtables.lock"
  CNI_BIN="$("$repo/hack/build-cni.sh")"
  router_up

  local n=0 spec name mode backend packages
  for spec in "${node_specs[@]}"; do
    read -r name mode backend packages <<<"$spec"
    host_root "$name" "$packages"
    node_env "$n" "$name" "$mode" "$backend"
    "$repo/hack/real-node.sh" up "$name"
    kubectl patch node "$name" --type merge \
      -p "{\"spec\":{\"podCIDR\":\"10.244.$n.0/24\",\"podCIDRs\":[\"10.244.$n.0/24\",\"$(pod_cidr6 "$n")\"]}}" >/dev/null
    n=$((n + 1))
  done
  kubectl wait --for=condition=Ready node $(node_names) --timeout=120s >/dev/null ||
    die "the nodes did not become Ready; see $dir/real-nodes/*/logs/kubelet.log"
  wait_for "the kubernetes Service's endpoints at $router_ip" \
    bash -c "'$dir/bin/kubectl' --kubeconfig '$dir/kubeconfig' get endpointslice -n default -l kubernetes.io/service-name=kubernetes -o jsonpath='{.items[*].endpoints[*].addresses[*]}' | grep -qx '$router_ip'"
  # The watchdog may have taken the control plane down while the nodes started: nothing may stay.
  if ((${#owner[@]})) && [[ ! -e "/proc/${owner[1]}" ]]; then
    die "owner process ${owner[1]} is gone; taking everything down"
  fi
  trap - EXIT
  log "up in $((SECONDS - started))s: nodes $(node_names | tr '\n' ' ')(eval \"\$(hack/real-cluster.sh env)\")"
}

up_failed() {
  log "start-up failed; taking everything down again"
  cmd_down
}

# The nodes and the network, not the control plane: what hack/cluster.sh down calls first.
cmd_down_network() {
  local name
  for name in $(node_names); do
    if [[ -d "$dir/real-nodes/$name" || -e "/run/netns/$name" ]]; then
      "$repo/hack/real-node.sh" down "$name" || die "node $name did not go down; run down again"
    fi
  done
  local pid
  for name in relay-host relay-router egress-proxy registry relay-registry-host relay-registry-router; do
    if pid="$(pid_of "$name")"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  if [[ -e "/run/netns/$router" ]]; then
    ip netns pids "$router" | xargs -r kill -KILL 2>/dev/null || true
    ip netns delete "$router"
  fi
  rm -rf "$rc"
}

cmd_down() {
  cmd_down_network
  "$repo/hack/cluster.sh" down
}

cmd_env() {
  "$repo/hack/cluster.sh" env
  echo "export LOOPGUARD_REAL_NODES=\"$(node_names | tr '\n' ' ' | sed 's/ $//')\""
  # For the chart: --set agent.perNodeHostRoots=$LOOPGUARD_NODE_ROOTS,agent.xtablesLock=$LOOPGUARD_XTABLES_LOCK
  echo "export LOOPGUARD_NODE_ROOTS=$rc/hosts"
  echo "export LOOPGUARD_XTABLES_LOCK=$rc/xtables.lock"
  # The pushed images, as the nodes pull them (--set image.registry=...,image.digest=...).
  if [[ -f "$rc/images" ]]; then sed 's/^/export /' "$rc/images"; fi
}

cmd_status() {
  kubectl get nodes -L loopguard.dev/kube-proxy-mode,loopguard.dev/iptables-backend -o wide
}

case "${1:-}" in
  up) shift && cmd_up "$@" ;;
  down) cmd_down ;;
  down-network) cmd_down_network ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) die "usage: hack/real-cluster.sh up [--image ARCHIVE]... [--owner-pid PID] | env | status | down" ;;
esac
