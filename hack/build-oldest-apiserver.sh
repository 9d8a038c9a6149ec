#!/usr/bin/env bash
# Builds kube-apiserver of the oldest Kubernetes loopguard claims (hack/control-plane/kubernetes-oldest)
# into a cache folder outside the checkout, keyed by its version and a hash of the pin and the Go
# version, and prints the binary's path. hack/test.sh starts the API-server tests against it too
# (LOOPGUARD_KUBE_APISERVER, read by hack/cluster.sh).
#
#   hack/build-oldest-apiserver.sh           build when missing, print the binary's path
#   hack/build-oldest-apiserver.sh --check   print the path; fail when it is not built
set -euo pipefail
export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-oldest-apiserver: go not found: install Go 1.26 into /usr/local/go" >&2; exit 2; }
pins="$(cd "$(dirname "${BASH_SOURCE[0]}")/control-plane/kubernetes-oldest" && pwd)"
version="$(cd "$pins" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
hash="$( (cat "$pins/go.mod" "$pins/go.sum"; go version) | sha256sum | cut -c1-12)"
dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/k8s-oldest-$version-$hash"
bin="$dir/kube-apiserver"
if [[ "${1:-}" == "--check" ]]; then
  echo "$bin"
  [[ -x "$bin" ]]
  exit
fi
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [[ ! -x "$bin" ]]; then
  minor="${version#v1.}" minor="${minor%%.*}"
  time="$(cd "$pins" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  flags=(-s -w)
  for kv in "gitVersion=$version" gitMajor=1 "gitMinor=$minor" gitTreeState=archive "buildDate=$time"; do
    flags+=("-X=k8s.io/component-base/version.${kv%%=*}=${kv#*=}")
  done
  echo "building kube-apiserver $version ..." >&2
  started=$SECONDS
  (cd "$pins" && CGO_ENABLED=0 go build -trimpath -ldflags="${flags[*]}" -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$bin.tmp" "$bin"
  echo "built kube-apiserver $version in $((SECONDS - started))s" >&2
fi
echo "$bin"
