#!/usr/bin/env bash
# The release build, exactly as the Dockerfile's build stage runs it (the Dockerfile calls this script),
# so that CI, which has no container engine, keeps the Dockerfile honest by running it too:
#
#   hack/build-release.sh [OUT]    cargo build --release --locked -p loopguard; check the binary;
#                                  copy it to OUT when given
#
# Checks: `loopguard --version` prints Cargo.toml's version, and the binary needs no shared library
# beyond those of the runtime image's base (glibc and libgcc_s from debian:12-slim).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
binary="$target_dir/release/loopguard"

cargo build --release --locked -p loopguard

want="loopguard $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
got="$("$binary" --version)"
if [[ "$got" != "$want" ]]; then
  echo "build-release: \`loopguard --version\` printed '$got', expected '$want'" >&2
  exit 1
fi

# Shared libraries the runtime image is sure to have.
allowed='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1)$'
needed="$(ldd "$binary" | awk '{print $1}' | xargs -n1 basename)"
if unexpected="$(grep -Ev "$allowed" <<<"$needed")"; then
  echo "build-release: the binary needs libraries the runtime image lacks:" >&2
  echo "$unexpected" >&2
  exit 1
fi

if [[ $# -ge 1 ]]; then
  install -D -m 0755 "$binary" "$1"
fi
echo "build-release: $got ok ($binary)" >&2
