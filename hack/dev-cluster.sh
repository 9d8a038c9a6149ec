#!/usr/bin/env bash
# A local Kubernetes cluster with loopguard installed from its Helm chart, to explore by hand: the real
# control plane (hack/cluster.sh) and three hollow nodes, each its own network namespace whose ip6tables
# the agent on that node programs. Needs root (network namespaces); see hack/README.md for the harness.
#
#   hack/dev-cluster.sh up      start it (or bring it up to date), install the chart, apply the example
#                               policy, wait until it is Compliant, print the status; leaves it running
#   hack/dev-cluster.sh up --real-node
#                               the same, plus a real node (hack/real-node.sh: the real kubelet with
#                               containerd and runc) that runs the image built from the Dockerfile
#                               (hack/build-image.sh); the controller stays on the hollow nodes
#   hack/dev-cluster.sh env     print the exports for kubectl and helm
#   hack/dev-cluster.sh down    stop everything and delete its state
#
# State: ${LOOPGUARD_CLUSTER_DIR:-~/.cache/loopguard/dev-cluster}, apart from the test clusters.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export LOOPGUARD_CLUSTER_DIR="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/dev-cluster}"
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
  local real_node=false
  [[ "${1:-}" == --real-node ]] && real_node=true
  if [[ $EUID -ne 0 ]]; then
    echo "hack/dev-cluster.sh needs root: each hollow node is a network namespace" >&2
    exit 2
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
  local sets=()
  if $real_node; then
    log "a real node: the image from the Dockerfile (hack/build-image.sh), kubelet, containerd, runc"
    local archive started=$SECONDS
    archive="$(hack/build-image.sh)"
    if [[ ! -e /run/netns/lg-real-0 ]]; then
      hack/real-node.sh up lg-real-0
    fi
    hack/real-node.sh import lg-real-0 "$archive"
    echo "real node ready in $((SECONDS - started))s" >&2
    # The real node has no pod network: the controller stays on the hollow nodes. Its agent reads
    # this machine's dpkg database, and keeps its state apart from this machine's own.
    sets=(--set 'controller.nodeSelector.loopguard\.dev/hollow=yes'
      --set agent.stateDir=/var/lib/loopguard-dev-real-node)
  fi
  kubectl get nodes

  log "helm upgrade --install loopguard charts/loopguard --namespace $namespace --create-namespace --wait"
  # The chart's defaults but for one thing only hollow nodes need: the pods of a hollow node share its
  # network namespace, so the two controller replicas must not land on one node (both would bind the
  # metrics port). On real nodes every pod has a network of its own.
  helm upgrade --install loopguard charts/loopguard --namespace "$namespace" --create-namespace \
    --wait --timeout 3m "${sets[@]}" -f - <<'VALUES'
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
  kubectl -n "$namespace" get daemonset,deployment,pods -o wide

  log "kubectl apply -f $policy"
  kubectl apply -f "$policy"
  kubectl wait --for=condition=Compliant lbp/default --timeout=2m

  log "kubectl get lbp,lbns"
  kubectl get lbp,lbns

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
  if $real_node; then
    cat <<MESSAGE
The real node lg-real-0 runs the image with the real kubelet, containerd and runc. Its agent reads
this machine's dpkg database: where nftables is installed, the CIS rule does not apply (Auto);
a policy with \`applicability: Always\` enforces it there too. Its namespace: ip netns exec lg-real-0 ...
MESSAGE
  fi
}

case "${1:-}" in
  up) up "${2:-}" ;;
  env) hack/cluster.sh env ;;
  down)
    hack/real-node.sh down lg-real-0
    rm -rf /var/lib/loopguard-dev-real-node
    hack/cluster.sh down
    ;;
  *) sed -n '2,11s/^# \{0,1\}//p' "$0" >&2 && exit 2 ;;
esac
