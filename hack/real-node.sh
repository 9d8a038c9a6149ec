#!/usr/bin/env bash
# A real node for the local control plane (hack/cluster.sh): the real kubelet (built from the same
# pinned k8s.io/kubernetes module as the control plane) with Debian's containerd and runc, running in
# a network namespace of its own that plays the node's host network. The machine's own network and
# firewall are never touched.
#
#   hack/real-node.sh up [NAME]      start node NAME (default lg-real-0) on the running cluster
#   hack/real-node.sh down [NAME]    stop it and remove everything it made (mounts, cgroups, netns)
#   hack/real-node.sh reboot [NAME]  kill it, lose its /run state and its firewall, boot it again
#   hack/real-node.sh import [NAME] ARCHIVE...   load OCI image archives into the node's containerd
#   hack/real-node.sh packages [EXTRA...]   install the Debian packages a node needs (and EXTRA) if
#                                            missing; says which when apt-get cannot install them
#
# Inside the namespace: lo, and an eth0 (one end of a veth pair whose other end stays inside too) with the node's address (10.254.0.2) and the API
# server's Service address (10.96.0.1). A relay (socat, through a UNIX socket) carries 10.96.0.1:443
# to the API server on the machine's 127.0.0.1, so the kubelet and the pods reach it the way they
# do on a real cluster. containerd and the kubelet are started with `nsenter --net` only (not
# `ip netns exec`, whose /sys remount hides the cgroup mounts from runc). The node has no CNI
# network: hostNetwork pods (the loopguard agent) run on it; other pods stay on hollow nodes.
#
# On a real cluster (hack/real-cluster.sh writes the node's settings to real-nodes/NAME/node.env
# before `up`), eth0's peer sits on the cluster's bridge in its router namespace instead, the node has
# a pod network (the CNI bridge, host-local and loopback plugins, hack/build-cni.sh) with routes to
# the other nodes' pod networks, and kube-proxy runs beside the kubelet, in iptables mode on the
# legacy or the nft backend or in nftables mode. The kubelet, containerd and kube-proxy find
# iptables through a PATH of the node's own whose names all point at xtables-legacy-multi or
# xtables-nft-multi, as a kube-proxy image's iptables wrapper would have chosen.
#
# Choices (see hack/README.md): containerd 1.6.20 and runc 1.1.5 from Debian bookworm's packages,
# because they are what a Debian 12 node runs and need no build; a static pause binary of our own
# (hack/real-node/pause.c) as the sandbox image. This machine uses cgroup v1: the kubelet runs
# with failCgroupV1: false, the cgroupfs driver and no QoS cgroups; containerd with
# restrict_oom_score_adj (no CAP_SYS_RESOURCE here for the sandbox's negative oom_score_adj).
set -Eeuo pipefail
trap 'echo "real-node: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/cluster}"
cmd="${1:-}"
node="${2:-lg-real-0}"
dir="$cluster/real-nodes/$node"
service_ip=10.96.0.1
pause_image=loopguard.local/pause:1
# A node of its own (the defaults), or one of hack/real-cluster.sh's (its node.env).
NETWORK=standalone
NODE_IP=10.254.0.2
APISERVER_URL="https://$service_ip:443"
if [[ "$cmd" =~ ^(up|reboot)$ && -f "$dir/node.env" ]]; then
  # shellcheck source=/dev/null
  source "$dir/node.env"
fi

log() { echo "real-node: $*" >&2; }
die() {
  log "$*"
  exit 1
}
[[ $EUID -eq 0 ]] || die "needs root"
[[ "$node" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#node} -le 15 ]] ||
  die "node name $node: a DNS label of at most 15 characters (it names the network namespace too)"

# The PATH of the node's kubelet, containerd and kube-proxy: on a real cluster's node, iptables and
# ip6tables (and their -save/-restore) are the node's backend.
node_path="$PATH"
[[ "$NETWORK" == cluster ]] && node_path="$dir/xtables:$PATH"
# The xtables lock of the node's iptables users (a real cluster's nodes share one of the cluster's
# own, as the containers of one host share the host's; the chart's agent.xtablesLock names it).
node_env=(env PATH="$node_path")
[[ -n "${XTABLES_LOCKFILE:-}" ]] && node_env+=(XTABLES_LOCKFILE="$XTABLES_LOCKFILE")

ctr() { command ctr --address "$dir/containerd/containerd.sock" --namespace k8s.io "$@"; }

pid_of() {
  local file="$dir/pids/$1.pid" pid
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2" && echo "$pid"
}

start() {
  local name="$1"
  shift
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/pids/$name.pid"
}

wait_for() {
  local what="$1" i
  shift
  for i in $(seq 600); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "$what did not come up; see $dir/logs"
}

# ensure_packages [EXTRA...]: the Debian packages a node needs (and EXTRA), installed if missing;
# stops with what is missing and how to get it when they cannot be installed.
ensure_packages() {
  local missing=() p
  # iptables and nftables: a real cluster's node runs xtables-*-multi, and reboot empties both;
  # buildah and gcc make the pause image.
  for p in containerd runc socat curl iptables nftables buildah gcc "$@"; do
    dpkg-query --show --showformat='${db:Status-Status}' "$p" 2>/dev/null | grep -q '^installed$' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
    die "missing packages: ${missing[*]}, and apt-get could not install them (its error is above); nothing was started. Install them (apt-get install ${missing[*]}) or make the package archive reachable, then run up again"
  # The Debian package starts a system containerd where there is an init system; ours is separate.
}

# The pause image: a static binary in a one-layer image, archived in the cache.
pause_archive() {
  local cache="${LOOPGUARD_CACHE:-$HOME/.cache/loopguard}/images" src="$repo/hack/real-node/pause.c"
  local archive
  archive="$cache/pause-$(sha256sum "$src" | cut -c1-12).tar"
  if [[ ! -f "$archive" ]]; then
    mkdir -p "$cache"
    local work
    work="$(mktemp -d)"
    gcc -Os -static -o "$work/pause" "$src"
    local c
    c="$(buildah from scratch)"
    buildah copy --quiet "$c" "$work/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    buildah commit --quiet "$c" "$pause_image" >/dev/null
    buildah rm "$c" >/dev/null
    buildah push --quiet "$pause_image" "oci-archive:$archive.tmp:$pause_image" >/dev/null
    mv "$archive.tmp" "$archive"
    rm -rf "$work"
  fi
  echo "$archive"
}

cmd_up() {
  [[ -f "$cluster/cluster.env" ]] || die "no cluster in $cluster (run: hack/cluster.sh up)"
  # shellcheck source=/dev/null
  source "$cluster/cluster.env"
  [[ -x "$BIN/kubelet" ]] || die "no kubelet in $BIN (hack/build-control-plane.sh builds it)"
  if [[ -e "/run/netns/$node" ]]; then
    die "$node is already up (hack/real-node.sh down $node first)"
  fi
  ensure_packages
  local started=$SECONDS
  mkdir -p "$dir"/{logs,pids,containerd,kubelet,certs,cni/bin,cni/net.d,pod-logs}
  echo "$cluster" >"$dir/.cluster"

  ip netns add "$node"
  ip -n "$node" link set lo up
  if [[ "$NETWORK" == cluster ]]; then
    cluster_network
  else
    # A node of its own: an address and the API server's Service address, relayed to the API server.
    ip -n "$node" link add eth0 type veth peer name eth0-peer
    ip -n "$node" link set eth0-peer up
    ip -n "$node" addr add "$NODE_IP/24" dev eth0
    ip -n "$node" addr add "$service_ip/32" dev eth0
    ip -n "$node" link set eth0 up
    start relay-host socat "UNIX-LISTEN:$dir/apiserver.sock,fork,unlink-early" "TCP:127.0.0.1:$APISERVER_PORT"
    wait_for "the relay socket" test -S "$dir/apiserver.sock"
  fi

  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  # Pod network namespaces under the state dir, not in the machine's shared /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1
    ip_pref = "ipv4"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    # runc's state per node: its default, /run/containerd/runc/k8s.io, would be shared by all nodes.
    Root = "$dir/runc"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/containerd/certs.d"
EOF
  # The cluster's registry (hack/real-cluster.sh), over plain HTTP.
  if [[ -n "${REGISTRY:-}" ]]; then
    mkdir -p "$dir/containerd/certs.d/$REGISTRY"
    cat >"$dir/containerd/certs.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  fi
  local pki="$cluster/pki"
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: loopguard
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: kubelet
  user:
    client-certificate-data: $(base64 -w0 "$pki/admin.crt")
    client-key-data: $(base64 -w0 "$pki/admin.key")
contexts:
- name: loopguard
  context: {cluster: loopguard, user: kubelet}
current-context: loopguard
EOF
  cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
readOnlyPort: 0
staticPodPath: ""
resolvConf: /etc/resolv.conf
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusReportFrequency: 10s
# Per node: a kubelet deletes the log folders of every pod it does not know in its podLogsDir.
podLogsDir: $dir/pod-logs
EOF
  boot
  log "$node up in $((SECONDS - started))s (kubelet $("$BIN/kubelet" --version | cut -d' ' -f2), $(containerd --version | cut -d' ' -f3), runc $(runc --version | head -n1 | cut -d' ' -f3))"
}

# What starts when the node boots: the node's relay (a node of its own), containerd, the kubelet,
# kube-proxy (a real cluster's node).
boot() {
  if [[ "$NETWORK" != cluster ]]; then
    start relay-node nsenter "--net=/run/netns/$node" \
      socat "TCP-LISTEN:443,bind=$service_ip,fork,reuseaddr" "UNIX-CONNECT:$dir/apiserver.sock"
  fi
  start containerd "${node_env[@]}" nsenter "--net=/run/netns/$node" containerd --config "$dir/containerd/config.toml"
  wait_for containerd ctr version
  import "$(pause_archive)"
  local node_ips="$NODE_IP" labels="loopguard.dev/real-node=true"
  [[ "$NETWORK" == cluster ]] && node_ips="$NODE_IP,$NODE_IP6" labels="$labels,$NODE_LABELS"
  start kubelet "${node_env[@]}" nsenter "--net=/run/netns/$node" "$BIN/kubelet" \
    --config="$dir/kubelet/config.yaml" --kubeconfig="$dir/kubeconfig" \
    --root-dir="$dir/kubelet/root" --cert-dir="$dir/certs" \
    --hostname-override="$node" --node-ip="$node_ips" \
    --node-labels="$labels" --v=1
  wait_for "the kubelet's Node" "$BIN/kubectl" --kubeconfig "$cluster/kubeconfig" get node "$node"
  if [[ "$NETWORK" == cluster ]]; then start_kube_proxy; fi
}

# Everything of the node's that runs: what is in its namespace (kubelet, containerd, kube-proxy,
# containers) and the container shims, which containerd re-parents outside it.
kill_node_processes() {
  # Every container runc started for this node, pods with a network namespace of their own
  # included (nothing else finds those: they are neither in the node's namespace nor children of
  # a shim once it is gone).
  local id
  if [[ -d "$dir/runc/k8s.io" ]]; then
    for id in $(runc --root "$dir/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$dir/runc/k8s.io" kill --all "$id" KILL 2>/dev/null || true
    done
  fi
  if [[ -e "/run/netns/$node" ]]; then
    ip netns pids "$node" | xargs -r kill -KILL 2>/dev/null || true
  fi
  pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -address $dir/" | xargs -r kill -KILL 2>/dev/null || true
  sleep 0.5
  # Mounts the kubelet and containerd made (volumes, overlay root file systems, pod network
  # namespaces), deepest first.
  findmnt -rno TARGET | grep -F "$dir/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}

# A reboot, as far as one namespace can have one: every process of the node killed, what lives in
# /run on a real host lost (containerd's and runc's state, the pods' network namespaces, the CNI
# bridge), the namespace's firewall empty (iptables of both backends and nftables), then the node
# boots: containerd, the kubelet (which starts the pods again) and kube-proxy. Disk state stays:
# images, the kubelet's root, the CNI address reservations.
cmd_reboot() {
  [[ -e "/run/netns/$node" && -f "$dir/kubelet/config.yaml" ]] || die "$node is not up"
  source "$cluster/cluster.env"
  local started=$SECONDS
  kill_node_processes
  rm -rf "$dir/containerd/state" "$dir/runc"
  ip -n "$node" link delete cni0 2>/dev/null || true
  # The legacy tables the node has, each emptied (restoring a table without --noflush flushes it
  # and deletes its chains); nftables (iptables-nft's tables included) all at once.
  local family table script
  for family in iptables ip6tables; do
    script=""
    for table in $(nsenter "--net=/run/netns/$node" "$family-legacy-save" | sed -n 's/^\*//p'); do
      script+="*$table"$'\n'"COMMIT"$'\n'
    done
    [[ -z "$script" ]] || nsenter "--net=/run/netns/$node" "$family-legacy-restore" <<<"$script"
  done
  nsenter "--net=/run/netns/$node" nft flush ruleset
  boot
  log "$node rebooted in $((SECONDS - started))s"
}

# The node's part of the cluster network (hack/real-cluster.sh made the router namespace and its
# bridge): eth0 with both addresses, its peer on the bridge, a default route through the router,
# each other node's pod network through that node, a pod network of its own (CNI), forwarding on.
cluster_network() {
  ip -n "$node" link add eth0 type veth peer name "$PEER" netns "$ROUTER_NETNS"
  ip -n "$ROUTER_NETNS" link set "$PEER" master br0 up
  ip -n "$node" addr add "$NODE_IP/24" dev eth0
  ip -n "$node" addr add "$NODE_IP6/64" dev eth0 nodad
  ip -n "$node" link set eth0 up
  ip -n "$node" route add default via "$ROUTER_IP"
  ip -n "$node" -6 route add default via "$ROUTER_IP6"
  local route
  for route in $PEER_ROUTES; do # CIDR=VIA
    ip -n "$node" route add "${route%%=*}" via "${route#*=}"
  done
  nsenter "--net=/run/netns/$node" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

  mkdir -p "$dir/xtables"
  local name
  for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -s "/usr/sbin/xtables-$IPT_BACKEND-multi" "$dir/xtables/$name"
  done
  for name in bridge host-local loopback; do
    ln -s "$CNI_BIN/$name" "$dir/cni/bin/$name"
  done
  cat >"$dir/cni/net.d/10-loopguard.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "lg-$node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}], [{"subnet": "$POD_CIDR6"}]]
      }
    }
  ]
}
EOF
}

# kube-proxy, dual-stack, in the node's namespace with the node's iptables. Conntrack limits are
# left alone (nf_conntrack_max is read-only outside the machine's namespace and the hash size is
# global); its OOM score too (no CAP_SYS_RESOURCE here).
start_kube_proxy() {
  local sync=iptables
  [[ "$PROXY_MODE" == nftables ]] && sync=nftables
  cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: $PROXY_MODE
hostnameOverride: $node
clientConnection: {kubeconfig: $dir/kubeconfig}
clusterCIDR: $CLUSTER_CIDR
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 0.0.0.0:10249
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0}
$sync: {minSyncPeriod: 1s}
EOF
  start kube-proxy "${node_env[@]}" nsenter "--net=/run/netns/$node" "$BIN/kube-proxy" \
    --config="$dir/kube-proxy.yaml" --v=1
  wait_for "kube-proxy's /healthz" nsenter "--net=/run/netns/$node" curl -fsS --max-time 5 http://127.0.0.1:10256/healthz
}


import() {
  local archive
  for archive in "$@"; do
    ctr images import --no-unpack=false "$archive" >/dev/null
  done
}

cmd_import() {
  [[ -S "$dir/containerd/containerd.sock" ]] || die "$node is not up"
  import "$@"
}

cmd_down() {
  [[ -d "$dir" || -e "/run/netns/$node" ]] || return 0
  kill_node_processes
  local pid
  if pid="$(pid_of relay-host "$dir/apiserver.sock")"; then kill -KILL "$pid" 2>/dev/null || true; fi
  # The pod cgroups containerd made, in every cgroup v1 hierarchy.
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    [[ -d "$hierarchy/k8s.io" ]] || continue
    find "$hierarchy/k8s.io" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  [[ -e "/run/netns/$node" ]] && ip netns delete "$node"
  # libcni's result cache is the machine's (containerd sets none of its own); the pods' entries
  # outlive a killed runtime.
  rm -f /var/lib/cni/results/"lg-$node"-*
  rm -rf "$dir"
  log "$node down"
}

case "$cmd" in
  up) cmd_up ;;
  packages)
    shift
    ensure_packages "$@"
    ;;
  down) cmd_down ;;
  reboot) cmd_reboot ;;
  import)
    shift 2 || die "import NAME ARCHIVE..."
    cmd_import "$@"
    ;;
  *) die "usage: hack/real-node.sh up|down|reboot [NAME] | import NAME ARCHIVE... | packages [EXTRA...]" ;;
esac
