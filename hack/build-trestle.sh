#!/usr/bin/env bash
# Installs compliance-trestle (the OSCAL models, from PyPI) into a cached virtualenv and prints its
# python: tests/controller.rs validates `loopguard report -o oscal` with it, offline.
#
#   hack/build-trestle.sh          print the python, installing it once
#   hack/build-trestle.sh --check  print it, or fail if it is not installed
#
# Cached in ~/.cache/loopguard/trestle-py<python>-<version>, keyed by both; a finished install is
# marked by .complete, and a lock keeps parallel callers from installing it twice.
set -euo pipefail

TRESTLE_VERSION=5.2.0

log() { printf 'build-trestle: %s\n' "$*" >&2; }
python="$(command -v python3)" || {
  log "python3 not found"
  exit 2
}
py_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopguard"
venv="$cache/trestle-py$py_version-$TRESTLE_VERSION"

if [[ "${1:-}" == "--check" ]]; then
  [[ -f "$venv/.complete" ]] || {
    log "not installed: run hack/build-trestle.sh"
    exit 1
  }
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/trestle-venv.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
  rm -rf "$venv"
  if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
      log "installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
      log "python3 has no venv module: install python3-venv"
      exit 2
    fi
  fi
  log "installing compliance-trestle $TRESTLE_VERSION into $venv (once)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "compliance-trestle==$TRESTLE_VERSION"
  touch "$venv/.complete"
fi
flock -u 9
echo "$venv/bin/python"
