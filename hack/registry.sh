#!/usr/bin/env bash
# A local OCI registry for releases and the real nodes: go-containerregistry's (`crane registry serve`,
# built by hack/build-release-tools.sh), listening on 127.0.0.1 only, blobs on disk under the state dir.
# Manifests and tags live in its memory: `down` forgets what was pushed.
#
#   hack/registry.sh up [--owner-pid PID]
#                            start it (or find it running); print `export LOOPGUARD_REGISTRY=127.0.0.1:PORT`;
#                            with PID, take it down once that process exits (a test that dies)
#   hack/registry.sh env     print that export for the running registry
#   hack/registry.sh down    stop it and remove its state
#
#   LOOPGUARD_REGISTRY_DIR   state dir (default ~/.cache/loopguard/registry; one per dev run or test)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LOOPGUARD_REGISTRY_DIR:-$HOME/.cache/loopguard/registry}"
log() { printf 'registry: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 2
}

command -v curl >/dev/null || die "curl not found: install it (apt-get install curl), then run this again"

# The registry's pid, only while that process still runs with our state dir in its command line.
running() {
  local pid
  [[ -f "$dir/pid" ]] || return 1
  pid="$(<"$dir/pid")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/blobs" && echo "$pid"
}

port() { sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$dir/registry.log" | tail -1; }

cmd_env() {
  running >/dev/null || die "no registry runs with state in $dir: hack/registry.sh up"
  echo "export LOOPGUARD_REGISTRY=127.0.0.1:$(port)"
}

cmd_up() {
  local owner=""
  case "${1:-}" in
    --owner-pid) owner="${2:?--owner-pid PID}" ;;
    "") ;;
    *) die "up: unknown argument $1" ;;
  esac
  if running >/dev/null; then
    cmd_env
    return
  fi
  local tools
  tools="$("$repo/hack/build-release-tools.sh")"
  mkdir -p "$dir/blobs"
  : >"$dir/registry.log"
  setsid "$tools/crane" registry serve --address 127.0.0.1:0 --disk "$dir/blobs" \
    </dev/null >>"$dir/registry.log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 100); do
    if [[ -n "$(port)" ]] && curl -fsS -o /dev/null "http://127.0.0.1:$(port)/v2/"; then
      log "up on 127.0.0.1:$(port) (state in $dir)"
      if [[ -n "$owner" ]]; then
        # The watchdog names the state dir in its command line, as the registry does.
        setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" down' \
          watchdog "$owner" "$0" "$dir/blobs" </dev/null >/dev/null 2>&1 &
      fi
      cmd_env
      return
    fi
    running >/dev/null || break
    sleep 0.1
  done
  cat "$dir/registry.log" >&2
  cmd_down
  die "the registry did not start (its log is above)"
}

cmd_down() {
  local pid
  if pid="$(running)"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      [[ -d "/proc/$pid" ]] || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
  log "down: removed $dir"
}

case "${1:-}" in
  up) shift && cmd_up "$@" ;;
  env) cmd_env ;;
  down) cmd_down ;;
  *) die "usage: hack/registry.sh up|env|down" ;;
esac
