#!/usr/bin/env bash
# Builds the control-plane binaries pinned in hack/control-plane/{kubernetes,etcd,helm}/go.mod into a
# cache folder outside the checkout and prints that folder's bin/ path on stdout. Binaries already there
# are reused; the folder name carries the Kubernetes version and a hash of every go.mod/go.sum and of the
# Go version, so a changed pin (or toolchain) builds into a fresh folder. Go's module and build caches
# stay at their defaults in the home folder.
#
#   hack/build-control-plane.sh            # build what is missing, print the bin dir
#   hack/build-control-plane.sh --check    # print the bin dir; fail if a binary is missing (no build)
#   LOOPGUARD_BIN_CACHE=/x hack/...        # cache root (default ~/.cache/loopguard)
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
pins="$(cd "$(dirname "${BASH_SOURCE[0]}")/control-plane" && pwd)"

module_version() { (cd "$pins/$1" && go list -m -f '{{.Version}}' "$2"); }

k8s_version="$(module_version kubernetes k8s.io/kubernetes)"
etcd_version="$(module_version etcd go.etcd.io/etcd/server/v3)"
helm_version="$(module_version helm helm.sh/helm/v4)"
pin_hash="$( (cat "$pins"/*/go.mod "$pins"/*/go.sum; go version) | sha256sum | cut -c1-12)"
cache_dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/k8s-$k8s_version-$pin_hash"
bin="$cache_dir/bin"

if [[ "${1:-}" == "--check" ]]; then
  echo "$bin"
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy helm; do
    [[ -x "$bin/$name" ]] || exit 1
  done
  exit 0
fi
mkdir -p "$bin"

# One build at a time per cache folder (parallel test binaries may all call `cluster.sh up`).
exec 9>"$cache_dir/.lock"
flock 9

# The module's publication time stands in for the build date, so rebuilding gives the same binary.
module_time() { (cd "$pins/$1" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' "$2"); }

k8s_ldflags() {
  local minor="${k8s_version#v1.}"
  minor="${minor%%.*}"
  local flags=(-s -w)
  local key_value key value
  for key_value in "gitVersion=$k8s_version" gitMajor=1 "gitMinor=$minor" gitTreeState=archive \
    "buildDate=$(module_time kubernetes k8s.io/kubernetes)"; do
    key="${key_value%%=*}" value="${key_value#*=}"
    flags+=("-X=k8s.io/component-base/version.$key=$value" "-X=k8s.io/client-go/pkg/version.$key=$value")
  done
  echo "${flags[*]}"
}

# build MODULE LDFLAGS NAME=PACKAGE...: builds the missing ones into a temp dir, then moves them in place,
# so an interrupted build never leaves a half-written binary behind.
build() {
  local module="$1" ldflags="$2"
  shift 2
  local name package tmp
  tmp="$(mktemp -d "$cache_dir/.build.XXXXXX")"
  for name_package in "$@"; do
    name="${name_package%%=*}" package="${name_package#*=}"
    [[ -x "$bin/$name" ]] && continue
    echo "building $name ($package) ..." >&2
    local started=$SECONDS
    (cd "$pins/$module" && CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$tmp/$name" "$package")
    mv "$tmp/$name" "$bin/$name"
    echo "built $name in $((SECONDS - started))s" >&2
  done
  rmdir "$tmp"
}

build kubernetes "$(k8s_ldflags)" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubectl=k8s.io/kubernetes/cmd/kubectl \
  kubelet=k8s.io/kubernetes/cmd/kubelet \
  kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
build etcd "-s -w" etcd=go.etcd.io/etcd/server/v3
build helm "-s -w -X=helm.sh/helm/v4/internal/version.version=$helm_version -X=helm.sh/helm/v4/internal/version.gitTreeState=clean" \
  helm=helm.sh/helm/v4/cmd/helm

printf 'kubernetes %s\netcd %s\nhelm %s\n' "$k8s_version" "$etcd_version" "$helm_version" >"$cache_dir/VERSIONS"
echo "$bin"
