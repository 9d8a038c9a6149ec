#!/usr/bin/env bash
# Runs `loopguard demo` on a fresh machine: installs what it needs (iptables with both backends,
# iproute2), builds loopguard, and starts the guided tour in a throwaway network namespace.
# Needs root; nothing outside the demo's own namespace is touched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -ne 0 ]]; then
  echo "the demo needs root (it creates a network namespace): run sudo $0" >&2
  exit 2
fi
if ! command -v ip6tables-nft >/dev/null || ! command -v ip >/dev/null || ! command -v nft >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables iproute2 nftables >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loopguard/target}"
cargo build --release --quiet -p loopguard
exec "$CARGO_TARGET_DIR/release/loopguard" demo
