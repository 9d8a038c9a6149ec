#!/usr/bin/env bash
# A local Kubernetes cluster with loopguard installed from its Helm chart, to explore by hand: the real
# control plane (hack/cluster.sh) and three hollow nodes, each its own network namespace whose ip6tables
# the agent on that node programs. Needs root (network namespaces); see hack/README.md for the harness.
#
#   hack/dev-cluster.sh up      start it (or bring it up to date), install the chart, apply the example
#                               policy, wait until it is Compliant, print the status; leaves it running
#   hack/dev-cluster.sh up --real
#                               the chart on a real cluster instead (hack/real-cluster.sh: three real
#                               nodes, each the real kubelet with containerd, runc, a pod network and
#                               kube-proxy) running the image built from the Dockerfile
#                               (hack/build-image.sh); the example policy; leaves it running
#   hack/dev-cluster.sh env [--real]    print the exports for kubectl and helm
#   hack/dev-cluster.sh down [--real]   stop everything and delete its state
#
# State: ${LOOPGUARD_CLUSTER_DIR:-~/.cache/loopguard/dev-cluster} (with --real:
# ~/.cache/loopguard/dev-real-cluster), apart from the test clusters.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
real=false
[[ "${2:-}" == --real ]] && real=true
if $real; then
  export LOOPGUARD_CLUSTER_DIR="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/dev-real-cluster}"
else
  export LOOPGUARD_CLUSTER_DIR="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/dev-cluster}"
fi
# The Rust build cache hack/test.sh fills, so that a first `up` after the tests builds nothing again.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loopguard/target}"
dir="$LOOPGUARD_CLUSTER_DIR"
nodes=(dev-node-a dev-node-b dev-node-c)
namespace=loopguard-system
policy=deploy/examples/default-policy.yaml
log() { printf '\n== %s\n' "$*" >&2; }

wait_nodes_ready() {
  for _ in $(seq 60); do
    if [[ "$(kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready ')" -ge ${#nodes[@]} ]]; then
      return 0
    fi
    sleep 1
  done
  echo "the hollow nodes did not become Ready within 60 s; see $dir/logs/hollow.log" >&2
  exit 1
}

up() {
  if [[ $EUID -ne 0 ]]; then
    echo "hack/dev-cluster.sh needs root: each node is a network namespace" >&2
    exit 2
  fi
  if $real; then
    up_real
    return
  fi

  log "control plane ($dir)"
  hack/cluster.sh up
  eval "$(hack/cluster.sh env)"

  log "loopguard (cargo build -p loopguard)"
  cargo build --quiet -p loopguard
  local binary="$CARGO_TARGET_DIR/debug/loopguard"
  "$binary" --version

  log "hollow nodes: ${nodes[*]}"
  # Each node plays a Debian host with iptables installed and neither nftables nor ufw, so the CIS rule
  # applies: the agent reads the host's dpkg database, which is the node's root folder here.
  local node
  for node in "${nodes[@]}"; do
    mkdir -p "$dir/hollow/cli/nodes/$node/root/var/lib/dpkg"
    printf 'Package: iptables\nStatus: install ok installed\nVersion: 1.8.9-2\n\n' \
      >"$dir/hollow/cli/nodes/$node/root/var/lib/dpkg/status"
  done
  if [[ "$(hack/cluster.sh status)" == *"hollow: running"* ]]; then
    echo "already running; pods start the binary anew when restarted:" \
      "kubectl -n $namespace rollout restart daemonset/loopguard-agent deployment/loopguard-controller" >&2
  else
    hack/cluster.sh nodes up --nodes "$(IFS=,; echo "${nodes[*]}")" \
      --image ghcr.io/loopguard/loopguard="$binary" --node-labels loopguard.dev/hollow=yes
  fi
  wait_nodes_ready
  kubectl get nodes

  log "helm upgrade --install loopguard charts/loopguard --namespace $namespace --create-namespace --wait"
  # The chart's defaults but for one thing only hollow nodes need: the pods of a hollow node share its
  # network namespace, so the two controller replicas must not land on one node (both would bind the
  # metrics port). On real nodes every pod has a network of its own.
  helm upgrade --install loopguard charts/loopguard --namespace "$namespace" --create-namespace \
    --wait --timeout 3m -f - <<'VALUES'
controller:
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              app.kubernetes.io/name: loopguard
              app.kubernetes.io/component: controller
VALUES
  apply_policy condition=Compliant

  cat <<MESSAGE

The cluster keeps running. To use it:

$(hack/cluster.sh env)
  kubectl get lbp,lbns -o wide
  kubectl get events -n default --field-selector involvedObject.kind=LoopbackPolicy

Each node's firewall is a network namespace on this machine; drift is repaired at once:
  ip netns exec ${nodes[0]} ip6tables -S INPUT
  ip netns exec ${nodes[0]} ip6tables -D INPUT -s ::1/128 -j DROP; sleep 1
  ip netns exec ${nodes[0]} ip6tables -S INPUT; kubectl get lbns ${nodes[0]}

More policies: deploy/examples/. The pods' logs: $dir/hollow/cli/logs/
Stop it all: hack/dev-cluster.sh down
MESSAGE
}

# apply_policy CONDITION: the example policy, applied, and waited for until CONDITION.
apply_policy() {
  kubectl -n "$namespace" get daemonset,deployment,pods -o wide
  log "kubectl apply -f $policy"
  kubectl apply -f "$policy"
  kubectl wait --for="$1" lbp/default --timeout=3m
  log "kubectl get lbp,lbns"
  kubectl get lbp,lbns
}

# Three real nodes (hack/real-cluster.sh) pulling the image from the Dockerfile from the cluster's
# registry by digest, the chart, the example policy.
up_real() {
  log "the image from the Dockerfile (hack/build-image.sh)"
  local archive
  archive="$(hack/build-image.sh --path)"
  if [[ -f "$dir/real-cluster/pids/relay-router.pid" ]] && hack/real-cluster.sh status >/dev/null 2>&1; then
    # Its registry holds the image it was started with: start it again with this one.
    log "real cluster already up in $dir: taking it down to start it again with this image"
    hack/real-cluster.sh down
  fi
  log "real cluster ($dir): control plane, three real nodes with kube-proxy, the image in its registry"
  hack/real-cluster.sh up --image "$archive"
  eval "$(hack/real-cluster.sh env)"
  hack/real-cluster.sh status

  log "helm upgrade --install loopguard charts/loopguard --namespace $namespace --create-namespace --wait"
  # All three nodes are this one machine: each agent reads its node's own host facts and state
  # folder (agent.perNodeHostRoots, a test-only value), and takes the cluster's xtables lock.
  helm upgrade --install loopguard charts/loopguard --namespace "$namespace" --create-namespace \
    --wait --timeout 5m --set "agent.perNodeHostRoots=$LOOPGUARD_NODE_ROOTS" \
    --set "agent.xtablesLock=$LOOPGUARD_XTABLES_LOCK" \
    --set "image.registry=${LOOPGUARD_REAL_IMAGE_0%%/*}" --set "image.digest=${LOOPGUARD_REAL_IMAGE_0#*@}"
  # Every node reports; the ufw node cannot be Compliant (below).
  apply_policy condition=Progressing=False
  local legacy nft nftables
  read -r legacy nft nftables <<<"$LOOPGUARD_REAL_NODES"
  cat <<MESSAGE

The cluster keeps running. To use it:

$(hack/real-cluster.sh env)
  kubectl get lbp,lbns -o wide
  kubectl -n $namespace logs ds/loopguard-agent

Each node is a network namespace on this machine with the real kubelet, containerd, kube-proxy:
  $legacy     ip6tables-legacy, the seed's rules beside kube-proxy's chains
  $nft        ip6tables-nft, ufw installed and inactive: NonCompliant (UfwInactive), as the
                    CIS ufw rule wants ufw active there and loopguard never enables ufw
  $nftables   loopguard's table beside kube-proxy's nftables table
  ip netns exec $legacy ip6tables-legacy -S INPUT
  ip netns exec $legacy ip6tables-legacy -D INPUT -s ::1/128 -j DROP; sleep 1
  ip netns exec $legacy ip6tables-legacy -S INPUT; kubectl get lbns $legacy
  ip netns exec $nftables nft list table inet loopguard

Stop it all: hack/dev-cluster.sh down --real
MESSAGE
}

case "${1:-}" in
  up) up ;;
  env) if $real; then hack/real-cluster.sh env; else hack/cluster.sh env; fi ;;
  down) if $real; then hack/real-cluster.sh down; else hack/cluster.sh down; fi ;;
  *) sed -n '2,17s/^# \{0,1\}//p' "$0" >&2 && exit 2 ;;
esac
