#!/usr/bin/env bash
# Builds the previous release (the commit in hack/release/previous) for the upgrade test: its source
# from git (`git archive`, no worktree left behind), its loopguard binary (debug profile, a target
# folder of its own) and its chart, cached under ~/.cache/loopguard/previous-<commit>/ and reused
# while the commit is unchanged. Prints that folder: bin/loopguard and src/charts/loopguard.
#
#   hack/build-previous.sh           build what is missing, print the folder
#   hack/build-previous.sh --check   print the folder; fail when it is not built (no build)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'build-previous: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
for tool in cargo git tar; do
  command -v "$tool" >/dev/null || die "$tool not found: install it (Rust with rustup), then run this again"
done

commit="$(sed -e 's/#.*//' -e '/^\s*$/d' "$repo/hack/release/previous" | head -n1 | tr -d '[:space:]')"
[[ -n "$commit" ]] || die "hack/release/previous names no commit"
full="$(git -C "$repo" rev-parse --verify --quiet "$commit^{commit}")" ||
  die "the previous release $commit is not in this clone (a shallow clone? git fetch --unshallow), so the upgrade test cannot build it"
dir="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/previous-${full:0:12}"
if [[ "${1:-}" == "--check" ]]; then
  echo "$dir"
  [[ -x "$dir/bin/loopguard" && -f "$dir/src/charts/loopguard/Chart.yaml" ]]
  exit
fi
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [[ ! -f "$dir/src/charts/loopguard/Chart.yaml" ]]; then
  log "extracting $commit"
  rm -rf "$dir/src.tmp"
  mkdir -p "$dir/src.tmp"
  git -C "$repo" archive "$full" | tar -x -C "$dir/src.tmp"
  rm -rf "$dir/src"
  mv "$dir/src.tmp" "$dir/src"
fi
if [[ ! -x "$dir/bin/loopguard" ]]; then
  log "building loopguard at $commit (first time: a few minutes)"
  started=$SECONDS
  (cd "$dir/src" && CARGO_TARGET_DIR="$dir/target" cargo build --quiet --locked --bin loopguard)
  mkdir -p "$dir/bin"
  cp "$dir/target/debug/loopguard" "$dir/bin/loopguard.tmp"
  mv "$dir/bin/loopguard.tmp" "$dir/bin/loopguard"
  # Only the binary is used again: its build tree (about 2 GiB) would only take the disk the tests need.
  rm -rf "$dir/target"
  log "built in $((SECONDS - started)) s"
fi
echo "$dir"
