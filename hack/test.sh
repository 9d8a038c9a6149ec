#!/usr/bin/env bash
# Runs every test of loopguard on a fresh machine, as root: installs the system packages the tests
# need, checks formatting and lints, builds (or reuses) the Kubernetes control plane and the container
# image, starts the control plane, runs `cargo test` for the whole workspace, and stops the control
# plane again, also on failure.
#
#   hack/test.sh            everything (what CI runs)
#
# Caches live outside the checkout, so a fresh clone is warm: Rust builds in
# ${CARGO_TARGET_DIR:-~/.cache/loopguard/target}, control-plane binaries in ~/.cache/loopguard/k8s-*.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf '\n== %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
  echo "hack/test.sh needs root: the tests create network namespaces and program ip6tables inside them" >&2
  exit 2
fi

log "system packages"
# buildah and mmdebstrap build the image; containerd, runc and socat run the real node (socat also
# relays Prometheus's scrapes into the nodes); chromium renders the HTML report.
packages=(iptables nftables iproute2 curl openssl util-linux ca-certificates python3-venv
  buildah mmdebstrap containerd runc socat gcc libc6-dev chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query --show --showformat='${db:Status-Status}' "$p" 2>/dev/null | grep -q '^installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The legacy backend's kernel side (the tests use it only inside their own namespaces).
modprobe ip6_tables 2>/dev/null || true
modprobe ip_tables 2>/dev/null || true

log "toolchains"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup" >&2; exit 2; }
command -v go >/dev/null || { echo "go not found: install Go 1.26 into /usr/local/go" >&2; exit 2; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loopguard/target}"
mkdir -p "$CARGO_TARGET_DIR"

# Incremental compilation state is only of use to an edit-compile loop: in a fresh clone it is many
# GiB of disk for nothing.
export CARGO_INCREMENTAL=0

log "disk"
# The tests unpack the image into three real nodes per cluster and build into the cache: on a disk shared
# with other work, too little room fails them half-way with "no space left on device". Free what is ours
# and can be rebuilt, then refuse to start with a message saying so, rather than fail late.
need_gib="${LOOPGUARD_MIN_FREE_GIB:-12}"
free_gib() { df -P --block-size=1G "$1" | awk 'NR == 2 { print $4 }'; }
short_of_room() {
  local where
  for where in "$CARGO_TARGET_DIR" "${TMPDIR:-/tmp}"; do
    (($(free_gib "$where") >= need_gib)) || return 0
  done
  return 1
}
if short_of_room; then
  echo "less than $need_gib GiB free; removing what loopguard's caches can rebuild" >&2
  rm -rf "$CARGO_TARGET_DIR"/*/incremental
fi
if short_of_room; then
  echo "still less than $need_gib GiB free; removing the Rust build cache $CARGO_TARGET_DIR (rebuilt next)" >&2
  cargo clean --quiet --target-dir "$CARGO_TARGET_DIR" 2>/dev/null || rm -rf "${CARGO_TARGET_DIR:?}"/*
  mkdir -p "$CARGO_TARGET_DIR"
fi
if short_of_room; then
  df -h "$CARGO_TARGET_DIR" "${TMPDIR:-/tmp}" >&2
  echo "the tests need $need_gib GiB free on the file systems of $CARGO_TARGET_DIR and ${TMPDIR:-/tmp}" \
    "(LOOPGUARD_MIN_FREE_GIB); free some and run this again" >&2
  exit 2
fi
df -h "$CARGO_TARGET_DIR" "${TMPDIR:-/tmp}" | sed 's/^/  /' >&2

# Leftovers of an interrupted earlier run (namespaces of the node engine tests and the demo).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^(lgt-|loopguard-demo-)' || true); do
  ip netns del "$ns" || true
done

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "control plane"
export LOOPGUARD_CLUSTER_DIR="${LOOPGUARD_CLUSTER_DIR:-$HOME/.cache/loopguard/cluster-test}"
hack/cluster.sh up
trap 'hack/cluster.sh down' EXIT
eval "$(hack/cluster.sh env)"

log "chart, manifests and Dockerfile: checkov and hadolint"
hack/lint-manifests.sh

log "release build, as the Dockerfile's build stage runs it"
hack/build-release.sh

log "Prometheus and promtool, from their Go module (reused while the pin is unchanged)"
started=$SECONDS
hack/build-prometheus.sh >/dev/null
echo "prometheus step: $((SECONDS - started))s" >&2

log "a Debian host root with ufw, for the ufw tests (reused while its pins are unchanged)"
started=$SECONDS
hack/build-ufw-root.sh >/dev/null
echo "ufw root step: $((SECONDS - started))s" >&2

log "compliance-trestle, the OSCAL models the report's OSCAL output is validated with (reused)"
hack/build-trestle.sh >/dev/null

log "the previous release (hack/release/previous) for the upgrade test, and the oldest kube-apiserver claimed (reused)"
started=$SECONDS
hack/build-previous.sh >/dev/null
oldest_apiserver="$(hack/build-oldest-apiserver.sh)"
echo "previous release and oldest API server step: $((SECONDS - started))s" >&2

log "the release tools: crane (the tests' OCI registry) and cosign, from their Go modules (reused)"
started=$SECONDS
hack/build-release-tools.sh >/dev/null
echo "release tools step: $((SECONDS - started))s" >&2

log "the image, from the Dockerfile, with buildah (reused while its inputs are unchanged)"
started=$SECONDS
hack/build-image.sh >/dev/null
echo "image step: $((SECONDS - started))s" >&2

log "tests"
LOOPGUARD_REQUIRE_CLUSTER=1 cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"

log "the API-server tests again, on the oldest Kubernetes loopguard claims ($("$oldest_apiserver" --version))"
started=$SECONDS
# Clusters of their own (not the one KUBECONFIG names), each running that kube-apiserver.
env -u KUBECONFIG LOOPGUARD_KUBE_APISERVER="$oldest_apiserver" LOOPGUARD_REQUIRE_CLUSTER=1 cargo test --locked \
  --test chart --test controller --test access -- --test-threads="${TEST_THREADS:-4}" \
  the_api_server_is_the_version_asked_for the_rendered_chart_is_accepted_by_the_api_server \
  the_admission_policy_confines_each_agent_to_its_own_node the_openshift_rendering \
  invalid_specs_are_refused_with_their_messages an_exception_exempts_a_failing_node \
  policy_reports_follow_the_nodes roles_and_protection_hold_for_each_user
echo "oldest API server step: $((SECONDS - started))s" >&2

log "mutants: the CI subset of hack/mutants.sh (each defect must turn its tests red)"
started=$SECONDS
hack/mutants.sh --ci
echo "mutants step: $((SECONDS - started))s" >&2

log "benchmarks, quick mode (they still work; BENCHMARKS.md is left as it is)"
started=$SECONDS
LOOPGUARD_REQUIRE_CLUSTER=1 cargo bench --locked --bench node_engine -- --quick
LOOPGUARD_REQUIRE_CLUSTER=1 cargo bench --locked --bench cluster -- --quick
LOOPGUARD_REQUIRE_CLUSTER=1 cargo bench --locked --bench soak -- --quick
echo "bench step: $((SECONDS - started))s" >&2
log "all tests passed"
