#!/usr/bin/env bash
# Builds the release tools pinned in hack/release/tools/go.mod (go-containerregistry's crane, whose
# `crane registry serve` is the local OCI registry, and cosign) into a cache folder outside the
# checkout and prints its bin/ path. The folder's name carries cosign's version and a hash of go.mod,
# go.sum and the Go version: a changed pin builds afresh.
#
#   hack/build-release-tools.sh        build what is missing (cold: about 5 minutes), print the bin dir
#   LOOPGUARD_BIN_CACHE=/x hack/...    cache root (default ~/.cache/loopguard)
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-release-tools: go not found: install Go 1.26 into /usr/local/go" >&2; exit 2; }
pins="$(cd "$(dirname "${BASH_SOURCE[0]}")/release/tools" && pwd)"
cosign_version="$(cd "$pins" && go list -m -f '{{.Version}}' github.com/sigstore/cosign/v3)"
pin_hash="$( (cat "$pins/go.mod" "$pins/go.sum"; go version) | sha256sum | cut -c1-12)"
cache_dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/release-tools-$cosign_version-$pin_hash"
bin="$cache_dir/bin"
mkdir -p "$bin"
exec 9>"$cache_dir/.lock"
flock 9

tmp="$(mktemp -d "$cache_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for name_package in crane=github.com/google/go-containerregistry/cmd/crane \
  cosign=github.com/sigstore/cosign/v3/cmd/cosign; do
  name="${name_package%%=*}" package="${name_package#*=}"
  [[ -x "$bin/$name" ]] && continue
  echo "build-release-tools: building $name ($package) ..." >&2
  started=$SECONDS
  (cd "$pins" && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$tmp/$name" "$package")
  mv "$tmp/$name" "$bin/$name"
  echo "build-release-tools: built $name in $((SECONDS - started))s" >&2
done
echo "$bin"
