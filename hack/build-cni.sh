#!/usr/bin/env bash
# Builds the CNI plugins the real cluster's nodes use (bridge, host-local, loopback), pinned in
# hack/tools/cni-plugins/go.mod, into a cache folder outside the checkout and prints that folder's
# bin/ path. The folder name carries the version and a hash of go.mod, go.sum and the Go version;
# binaries already there are reused. A module of their own, so that their netlink and x/sys versions
# never move the control plane's.
#
#   hack/build-cni.sh                   # build what is missing, print the bin dir
#   LOOPGUARD_BIN_CACHE=/x hack/...     # cache root (default ~/.cache/loopguard)
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
pins="$(cd "$(dirname "${BASH_SOURCE[0]}")/tools/cni-plugins" && pwd)"
module=github.com/containernetworking/plugins
version="$(cd "$pins" && go list -m -f '{{.Version}}' "$module")"
# What upstream's build_linux.sh stamps into every plugin (`bridge --version`).
ldflags="-s -w -X=$module/pkg/utils/buildversion.BuildVersion=$version"
hash="$( (cat "$pins/go.mod" "$pins/go.sum"; go version; echo "$ldflags") | sha256sum | cut -c1-12)"
cache_dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/cni-plugins-$version-$hash"
bin="$cache_dir/bin"
mkdir -p "$bin"
exec 9>"$cache_dir/.lock"
flock 9

for package in main/bridge main/loopback ipam/host-local; do
  name="${package#*/}"
  [[ -x "$bin/$name" ]] && continue
  echo "building $name ($version) ..." >&2
  started=$SECONDS
  tmp="$(mktemp -d "$cache_dir/.build.XXXXXX")"
  (cd "$pins" && CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$tmp/$name" "$module/plugins/$package")
  mv "$tmp/$name" "$bin/$name"
  rmdir "$tmp"
  echo "built $name in $((SECONDS - started))s" >&2
done
echo "$bin"
