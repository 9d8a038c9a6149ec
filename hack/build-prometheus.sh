#!/usr/bin/env bash
# Builds Prometheus and promtool, pinned in hack/tools/prometheus/go.mod, into a cache folder outside
# the checkout and prints that folder's bin/ path. The folder name carries the version and a hash of
# go.mod, go.sum and the Go version; binaries already there are reused. The observability tests run
# them: promtool tests the chart's alerts, Prometheus scrapes the local cluster.
#
#   hack/build-prometheus.sh            # build what is missing, print the bin dir
#   LOOPGUARD_BIN_CACHE=/x hack/...     # cache root (default ~/.cache/loopguard)
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
pins="$(cd "$(dirname "${BASH_SOURCE[0]}")/tools/prometheus" && pwd)"
version="$(cd "$pins" && go list -m -f '{{.Version}}' github.com/prometheus/prometheus)"
# Prometheus 3.x.y is tagged v0.3xx.y in its Go module: v0.316.0 is Prometheus 3.16.0.
minor="${version#v0.}" && patch="${minor#*.}" && minor="${minor%%.*}"
release="$((minor / 100)).$((minor % 100)).$patch"
ldflags="-s -w -X=github.com/prometheus/common/version.Version=$release -X=github.com/prometheus/common/version.Branch=module"
hash="$( (cat "$pins/go.mod" "$pins/go.sum"; go version; echo "$ldflags") | sha256sum | cut -c1-12)"
cache_dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/prometheus-$version-$hash"
bin="$cache_dir/bin"
mkdir -p "$bin"
exec 9>"$cache_dir/.lock"
flock 9

for name in prometheus promtool; do
  [[ -x "$bin/$name" ]] && continue
  echo "building $name ($version) ..." >&2
  started=$SECONDS
  tmp="$(mktemp -d "$cache_dir/.build.XXXXXX")"
  (cd "$pins" && CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$tmp/$name" \
    "github.com/prometheus/prometheus/cmd/$name")
  mv "$tmp/$name" "$bin/$name"
  rmdir "$tmp"
  echo "built $name in $((SECONDS - started))s" >&2
done
echo "$bin"
