#!/usr/bin/env bash
# Releases loopguard VERSION from the checked-out commit into an OCI registry:
#
#   LOOPGUARD_REGISTRY=127.0.0.1:5000 COSIGN_KEY=cosign.key COSIGN_PASSWORD=... hack/release.sh 0.1.0
#
# 1. checks first and changes nothing when one fails: VERSION is what Cargo.toml and the chart say, the
#    working tree is clean, the key exists, the registry answers and holds no VERSION yet (a released
#    version is never overwritten);
# 2. builds the image from the Dockerfile (hack/build-image.sh) and pushes it:
#      REGISTRY/loopguard/loopguard:VERSION
#    packages the chart and pushes it (`helm install oci://REGISTRY/charts/loopguard --version VERSION`):
#      REGISTRY/charts/loopguard:VERSION
# 3. writes the image's SBOM (SPDX 2.3: every crate of Cargo.lock and every Debian package installed in
#    the pushed image) and an SLSA v1 provenance statement, signs the image and the chart with cosign
#    and attaches both as signed attestations (offline: no transparency log, the key is the trust root);
# 4. verifies what it pushed with the public key, and writes release.json (references and digests),
#    the SBOM, the provenance and the chart archive to LOOPGUARD_RELEASE_DIR
#    (default ~/.cache/loopguard/releases/VERSION).
#
# Environment:
#   LOOPGUARD_REGISTRY   registry host[:port][/prefix]; plain HTTP for 127.0.0.1 and localhost (a local
#                        registry: hack/registry.sh up), HTTPS anywhere else
#   COSIGN_KEY           cosign private key file (cosign generate-key-pair); COSIGN_PASSWORD its password
#   COSIGN_PUBLIC_KEY    public key to verify with (default: COSIGN_KEY with .key replaced by .pub)
# The tools (crane, cosign) are built from hack/release/tools/go.mod and cached (hack/build-release-tools.sh).
set -Eeuo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf 'release: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 2
}

for tool in git curl python3 tar; do
  command -v "$tool" >/dev/null || die "$tool not found: install it (apt-get install $tool), then run this again"
done
[[ $# -eq 1 && "$1" != -* ]] || die "usage: LOOPGUARD_REGISTRY=HOST:PORT COSIGN_KEY=FILE hack/release.sh VERSION"
version="$1"
[[ "$version" =~ ^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$ ]] ||
  die "VERSION '$version' is not a semantic version like 0.2.0 or 0.2.0-rc.1 (no leading v)"

# --- checks: nothing is built or pushed before all of them pass -----------------------------------
cargo_version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
chart_version="$(sed -n 's/^version: *//p' charts/loopguard/Chart.yaml)"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/loopguard/Chart.yaml)"
for pair in "Cargo.toml (version)=$cargo_version" "charts/loopguard/Chart.yaml (version)=$chart_version" \
  "charts/loopguard/Chart.yaml (appVersion)=$app_version"; do
  [[ "${pair#*=}" == "$version" ]] ||
    die "${pair%%=*} says '${pair#*=}', not $version: bump Cargo.toml, Cargo.lock and the chart's version and appVersion to $version in one commit, then run this again"
done

git rev-parse --git-dir >/dev/null 2>&1 || die "$repo is not a git checkout: a release is built from a commit"
dirty="$(git status --porcelain --untracked-files=normal)"
[[ -z "$dirty" ]] || die "the working tree has changes that no commit holds; commit or stash them, then run this again:
$dirty"
commit="$(git rev-parse HEAD)"

registry="${LOOPGUARD_REGISTRY:-}"
[[ -n "$registry" ]] || die "LOOPGUARD_REGISTRY is not set: name the registry to push to (a local one: eval \"\$(hack/registry.sh up)\")"
[[ "$registry" != *://* ]] || die "LOOPGUARD_REGISTRY '$registry' must be host[:port][/prefix], without a scheme"
key="${COSIGN_KEY:-}"
[[ -n "$key" ]] || die "COSIGN_KEY is not set: name the cosign private key file (make a pair with: cosign generate-key-pair)"
[[ -r "$key" ]] || die "COSIGN_KEY '$key' cannot be read: no such file, or no permission"
public_key="${COSIGN_PUBLIC_KEY:-${key%.key}.pub}"
[[ -r "$public_key" ]] || die "the public key '$public_key' cannot be read: set COSIGN_PUBLIC_KEY to the key pair's .pub file"
export COSIGN_PASSWORD="${COSIGN_PASSWORD:-}"

host="${registry%%/*}"
insecure=()
scheme=https
case "${host%:*}" in
  127.0.0.1 | localhost | "[::1]") insecure=(--insecure) scheme=http ;;
esac

tools="$(hack/build-release-tools.sh)"
crane() { "$tools/crane" "${insecure[@]}" "$@"; }
cosign() {
  local http=()
  ((${#insecure[@]})) && http=(--allow-http-registry)
  "$tools/cosign" "$1" "${http[@]}" "${@:2}"
}
helm_bin="$(hack/build-control-plane.sh)/helm"
# logged WHAT COMMAND...: runs COMMAND with its output kept aside; shown, and the release stopped,
# when it fails.
logged() {
  local what="$1"
  shift
  "$@" >"$tmp/step.log" 2>&1 || {
    cat "$tmp/step.log" >&2
    die "$what failed"
  }
}

curl -fsS -o /dev/null --max-time 10 "$scheme://$host/v2/" ||
  die "the registry $host does not answer on $scheme://$host/v2/: start it (hack/registry.sh up) or fix LOOPGUARD_REGISTRY"

image_repo="$registry/loopguard/loopguard"
chart_repo="$registry/charts/loopguard"
for ref in "$image_repo:$version" "$chart_repo:$version"; do
  if existing="$(crane digest "$ref" 2>/dev/null)"; then
    die "$ref is already released ($existing); a released version is never overwritten: bump the version"
  fi
done

out="${LOOPGUARD_RELEASE_DIR:-$HOME/.cache/loopguard/releases/$version}"
[[ ! -e "$out/release.json" ]] ||
  die "$out already holds a release ($out/release.json): move it away or set LOOPGUARD_RELEASE_DIR"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The commit's time, not the clock: the same commit and image give the same SBOM.
created="$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ)"
started_on="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# --- build and push --------------------------------------------------------------------------------
log "building the image (hack/build-image.sh)"
archive="$(hack/build-image.sh --path)"
mkdir "$tmp/layout"
tar -xf "$archive" -C "$tmp/layout"
logged "pushing the image to $image_repo:$version" crane push "$tmp/layout" "$image_repo:$version"
image_digest="$(crane digest "$image_repo:$version")"
image="$image_repo@$image_digest"
log "image: $image"

"$helm_bin" package charts/loopguard --destination "$tmp" >/dev/null
chart_archive="$tmp/loopguard-$version.tgz"
plain_http=()
((${#insecure[@]})) && plain_http=(--plain-http)
logged "pushing the chart to oci://$chart_repo" \
  "$helm_bin" push "$chart_archive" "oci://${chart_repo%/loopguard}" "${plain_http[@]}"
chart_digest="$(crane digest "$chart_repo:$version")"
chart="$chart_repo@$chart_digest"
log "chart: $chart"

# --- SBOM and provenance ---------------------------------------------------------------------------
crane export "$image" - | tar -xOf - var/lib/dpkg/status >"$tmp/dpkg-status" ||
  die "could not read var/lib/dpkg/status from the pushed image $image"
python3 hack/release/sbom.py --cargo-lock Cargo.lock --dpkg-status "$tmp/dpkg-status" --image "$image" \
  --version "$version" --created "$created" >"$out/sbom.spdx.json"
python3 hack/release/provenance.py --image "$image" --chart "$chart" --commit "$commit" \
  --version "$version" --dockerfile Dockerfile --base-images hack/release/base-images.lock \
  --started "$started_on" --finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$out/provenance.json"

# --- sign and attest (offline: the key pair is the trust root, nothing goes to a transparency log) --
offline=(--key "$key" --use-signing-config=false --tlog-upload=false --yes)
for subject in "$image" "$chart"; do
  logged "signing $subject" cosign sign "${offline[@]}" "$subject"
done
logged "attaching the SBOM to $image" \
  cosign attest "${offline[@]}" --type spdxjson --predicate "$out/sbom.spdx.json" "$image"
logged "attaching the provenance to $image" \
  cosign attest "${offline[@]}" --type slsaprovenance1 --predicate "$out/provenance.json" "$image"

# --- verify what was pushed, as a user would ---------------------------------------------------------
for subject in "$image" "$chart"; do
  logged "verifying the signature of $subject with $public_key" \
    cosign verify --key "$public_key" --insecure-ignore-tlog "$subject"
done
for type in spdxjson slsaprovenance1; do
  logged "verifying the $type attestation of $image with $public_key" \
    cosign verify-attestation --key "$public_key" --insecure-ignore-tlog --type "$type" "$image"
done

cp "$chart_archive" "$out/"
python3 - "$out/release.json" <<EOF
import json, sys
json.dump({"version": "$version", "commit": "$commit", "image": "$image", "chart": "$chart",
           "chartInstall": "helm install loopguard oci://$chart_repo --version $version --set image.registry=$registry --set image.digest=$image_digest"},
          open(sys.argv[1], "w"), indent=2)
EOF
log "released $version from $commit into $registry; files in $out"
cat <<EOF
image=$image
chart=$chart
verify: cosign verify --key $public_key --insecure-ignore-tlog ${insecure:+--allow-http-registry }$image
install: helm install loopguard oci://$chart_repo --version $version ${plain_http[*]:+--plain-http }--set image.registry=$registry --set image.digest=$image_digest
EOF
