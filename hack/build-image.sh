#!/usr/bin/env bash
# Builds the loopguard image from the Dockerfile, as it is, with buildah (no Docker engine), and
# writes it as an OCI archive:
#
#   hack/build-image.sh                 build (or reuse) the image; print the archive's path and size
#   hack/build-image.sh --path          print the archive's path only (build first when missing)
#   hack/build-image.sh --verify-bases  rebuild both base images from their lock in a storage of their
#                                       own and compare their digests with hack/release/base-images.lock
#   hack/build-image.sh --refresh-lock  build both base images from what bookworm serves today and write
#                                       hack/image/bookworm.lock and hack/release/base-images.lock anew
#
# No registry is reachable here, so the two base images the Dockerfile names are made locally
# first, under the same names, and kept in buildah's storage and as archives in the cache:
#   debian:12.11-slim          bookworm, minbase, by mmdebstrap from Debian's packages, without
#                              documentation and locales (as the official slim images are)
#   rust:1.95.0-slim-bookworm  that base plus gcc and libc6-dev (the official image's), and the
#                              Rust toolchain of this machine, which is the version the Dockerfile
#                              pins (checked), laid out like the official image (/usr/local/rustup,
#                              /usr/local/cargo). No machine's CA certificates: the loopguard
#                              image's build lends this machine's /etc/ssl/certs to its RUN steps
#                              (read-only, in no layer), so that the digest is the same on every
#                              machine with the same toolchain (a machine's extra CA differs).
# Both base images are reproducible: every Debian package is pinned in hack/image/bookworm.lock
# (LOOPGUARD_BASE_LOCK overrides the path), which also holds the SOURCE_DATE_EPOCH their files and
# metadata carry; a rebuild from the same lock gives the same image. Their digests (the image ID, the
# digest of the image's config, which names every layer's uncompressed content and stays the same
# through a registry's compression) are recorded in hack/release/base-images.lock; an image in storage
# or in the cache whose digest differs from it is built again. When bookworm no longer serves a pinned
# version, the build fails naming it: refresh the lock (--refresh-lock), review the diff, commit both.
# The image is rebuilt only when its inputs change (the Dockerfile, what .dockerignore lets in,
# this script); the archive is ~/.cache/loopguard/images/loopguard-<version>-<inputs hash>.tar.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LOOPGUARD_CACHE:-$HOME/.cache/loopguard}/images"
log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

[[ $EUID -eq 0 ]] || die "needs root (buildah with the root storage)"
# buildah's RUN steps need an OCI runtime, which `--no-install-recommends` leaves out: without one
# the Dockerfile's first RUN fails with "exec: no command".
missing=()
for p in buildah mmdebstrap; do
  command -v "$p" >/dev/null || missing+=("$p")
done
command -v runc >/dev/null || command -v crun >/dev/null || missing+=(runc)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      die "could not install ${missing[*]} with apt-get: install them, then run this again"
  }
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)"
image="ghcr.io/loopguard/loopguard:$version"
debian="docker.io/library/debian:12.11-slim"
rust_version="$(sed -n 's/^FROM rust:\([0-9.]*\)-slim-bookworm.*/\1/p' "$repo/Dockerfile")"
rust="docker.io/library/rust:$rust_version-slim-bookworm"

# The build context, as .dockerignore has it: the files hashed for the cache key.
inputs() {
  cd "$repo"
  {
    echo Dockerfile .dockerignore hack/build-image.sh Cargo.toml Cargo.lock hack/build-release.sh
    git ls-files src benches hack/hollow
  } | xargs -n1 | sort | xargs sha256sum | sha256sum | cut -c1-16
}
archive="$cache/loopguard-$version-$(inputs).tar"

lock="${LOOPGUARD_BASE_LOCK:-$repo/hack/image/bookworm.lock}"
digests="$repo/hack/release/base-images.lock"
mode=build
case "${1:-}" in
  --refresh-lock) mode=refresh ;;
  --verify-bases) mode=verify ;;
  --path | "") ;;
  *) die "unknown argument $1 (see the top of hack/build-image.sh)" ;;
esac
if [[ $mode == refresh ]]; then
  epoch="$(date -u +%s)"
else
  [[ -r "$lock" ]] || die "no lock file $lock: write one with hack/build-image.sh --refresh-lock"
  epoch="$(sed -n 's/^SOURCE_DATE_EPOCH=\([0-9]*\)$/\1/p' "$lock")"
  [[ -n "$epoch" ]] || die "$lock has no SOURCE_DATE_EPOCH=<seconds> line"
fi
export SOURCE_DATE_EPOCH="$epoch"

# The pinned packages of one base image (debian or rust) as `NAME VERSION` lines, sorted.
pinned() { awk -v stage="$1" '$1 == stage { print $2, $3 }' "$lock" | sort; }
# The installed packages a dpkg status file (stdin) lists, as `NAME VERSION` lines, sorted.
installed() {
  awk '/^Package:/ { p = $2 } /^Version:/ { v = $2 } /^Status:.* installed$/ { ok = 1 }
    /^$/ { if (ok) print p, v; ok = 0 } END { if (ok) print p, v }' | sort
}
# check_pins STAGE GOT: the packages installed are exactly the lock's.
check_pins() {
  [[ $mode == refresh ]] && return
  local diff
  if ! diff="$(diff <(pinned "$1") "$2")"; then
    die "the $1 base image did not get the packages $lock pins (< pinned, > installed):
$diff
bookworm no longer serves those versions: refresh the lock (hack/build-image.sh --refresh-lock), review, commit"
  fi
}
# apt's error for a pinned version the mirror no longer has, named.
explain_apt_failure() {
  local log="$1" missing
  missing="$(sed -n "s/.*Version '\([^']*\)' for '\([^']*\)' was not found.*/\2 \1/p" "$log" | sort -u)"
  if [[ -n "$missing" ]]; then
    die "bookworm no longer serves these versions that $lock pins:
$missing
refresh the lock (hack/build-image.sh --refresh-lock), review the diff, commit it"
  fi
  cat "$log" >&2
  die "building a base image failed (apt's output is above)"
}
image_id() { buildah images --no-trunc --format '{{.ID}}' "$1" 2>/dev/null | head -1 | sed 's/^sha256://'; }
recorded_id() { awk -v n="$1" '$1 == n { sub(/^sha256:/, "", $2); print $2 }' "$digests" 2>/dev/null; }

has_image() { buildah images --quiet "$1" >/dev/null 2>&1; }

# A base image from storage or its cached archive while its digest is the recorded one, else built
# by `make_it` (from the lock) and archived.
ensure() {
  local name="$1" tar="$2" make_it="$3" short="${1#docker.io/library/}" started want
  want="$(recorded_id "$short")"
  if has_image "$name" && [[ "$(image_id "$name")" == "$want" ]]; then return; fi
  if [[ -f "$tar" ]]; then
    buildah tag "$(buildah pull --quiet "oci-archive:$tar")" "$name"
    [[ "$(image_id "$name")" == "$want" ]] && return
    rm -f "$tar"
  fi
  started=$SECONDS
  "$make_it"
  if [[ -n "$want" && "$(image_id "$name")" != "$want" && $mode == build ]]; then
    log "warning: $short built from $lock is sha256:$(image_id "$name"), not the recorded sha256:$want" \
      "(hack/build-image.sh --verify-bases says more)"
  fi
  buildah push --quiet "$name" "oci-archive:$tar:$name" >/dev/null
  log "$name built in $((SECONDS - started))s"
}

make_debian() {
  local work="$tmp/debian"
  rm -rf "$work" && mkdir -p "$work"
  local include=()
  [[ $mode == refresh ]] || include=(--include="$(pinned debian | tr ' ' = | paste -sd,)")
  # The host's resolv.conf and hostname, which mmdebstrap copies in, would differ from host to host.
  mmdebstrap --variant=minbase "${include[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    bookworm "$work/rootfs.tar" >"$work/mmdebstrap.log" 2>&1 || explain_apt_failure "$work/mmdebstrap.log"
  tar -xOf "$work/rootfs.tar" ./var/lib/dpkg/status | installed >"$work/debian.installed"
  check_pins debian "$work/debian.installed"
  local ctr
  ctr="$(buildah from scratch)"
  buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
  buildah config --cmd '["bash"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet --timestamp "$epoch" "$ctr" "$debian" >/dev/null
  buildah rm "$ctr" >/dev/null
}

make_rust() {
  local toolchain work
  toolchain="$(rustup which rustc --toolchain "$rust_version" 2>/dev/null | xargs -r dirname | xargs -r dirname)"
  [[ -n "$toolchain" && -x "$toolchain/bin/rustc" ]] ||
    die "Rust $rust_version (the Dockerfile's) is not installed here: rustup toolchain install $rust_version"
  "$toolchain/bin/rustc" --version | grep -q "^rustc $rust_version " ||
    die "the $rust_version toolchain here is $("$toolchain/bin/rustc" --version)"
  work="$tmp/rust"
  rm -rf "$work"
  # The toolchain of this machine's architecture (the image is built for the machine's own).
  local host
  host="$("$toolchain/bin/rustc" -vV | sed -n 's/^host: //p')"
  mkdir -p "$work/rustup/toolchains/$rust_version-$host" "$work/cargo/bin"
  tar -C "$toolchain" --exclude=./share/doc -cf - . |
    tar -C "$work/rustup/toolchains/$rust_version-$host" -xf -
  printf 'version = "12"\ndefault_toolchain = "%s-%s"\nprofile = "minimal"\n' \
    "$rust_version" "$host" >"$work/rustup/settings.toml"
  cp "$(command -v rustup)" "$work/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc; do ln -s rustup "$work/cargo/bin/$proxy"; done
  local packages="ca-certificates gcc libc6-dev"
  [[ $mode == refresh ]] || packages="$(pinned rust | tr ' ' = | paste -sd' ')"
  # apt's and dpkg's logs and caches carry the time of the build: left out.
  cat >"$work/Containerfile" <<EOF
FROM $debian
RUN apt-get update && apt-get install -y --no-install-recommends $packages \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \\
      /var/log/alternatives.log /var/cache/ldconfig/aux-cache
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$rust_version
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
EOF
  buildah bud --quiet --network host --pull=never --timestamp "$epoch" -t "$rust" "$work" \
    >"$work/bud.log" 2>&1 || explain_apt_failure "$work/bud.log"
  local ctr mnt
  ctr="$(buildah from "$rust")"
  mnt="$(buildah mount "$ctr")"
  # What the stand-in adds to the Debian base.
  installed <"$mnt/var/lib/dpkg/status" | comm -13 "$tmp/debian/debian.base" - >"$work/rust.installed"
  buildah umount "$ctr" >/dev/null
  buildah rm "$ctr" >/dev/null
  check_pins rust "$work/rust.installed"
}

# The Debian base's packages (for the stand-in's additions), read from the image itself.
debian_packages() {
  local ctr mnt
  mkdir -p "$tmp/debian"
  ctr="$(buildah from "$debian")"
  mnt="$(buildah mount "$ctr")"
  installed <"$mnt/var/lib/dpkg/status" >"$tmp/debian/debian.base"
  buildah umount "$ctr" >/dev/null
  buildah rm "$ctr" >/dev/null
}

# The two base images, each from storage, its archive or the lock.
bases() {
  local key=refresh
  [[ $mode == refresh ]] || key="$(sha256sum "$lock" | cut -c1-12)"
  ensure "$debian" "$cache/debian-12.11-slim-$key.tar" make_debian
  debian_packages
  ensure "$rust" "$cache/rust-$rust_version-slim-bookworm-$key.tar" make_rust
}

write_locks() {
  {
    echo "# The Debian packages of the base images hack/build-image.sh builds: debian (debian:12.11-slim)"
    echo "# and rust (what the rust:$rust_version-slim-bookworm stand-in adds), and the time their files"
    echo "# and metadata carry. Written by hack/build-image.sh --refresh-lock; review the diff, commit."
    echo "SOURCE_DATE_EPOCH=$epoch"
    sed 's/^/debian /' "$tmp/debian/debian.base"
    sed 's/^/rust /' "$tmp/rust/rust.installed"
  } >"$lock"
}

record_digests() {
  {
    echo "# The base images the Dockerfile's FROM lines name, as hack/build-image.sh builds them from"
    echo "# hack/image/bookworm.lock, by digest (the image ID: the digest of the image's config). A rebuild"
    echo "# from the same lock gives the same digests: hack/build-image.sh --verify-bases checks it."
    echo "debian:12.11-slim sha256:$(image_id "$debian")"
    echo "rust:$rust_version-slim-bookworm sha256:$(image_id "$rust")"
  } >"$digests"
}

if [[ $mode == refresh ]]; then
  # No recorded digest, so that nothing in storage (an image still in use cannot be removed) or in
  # the cache counts as already built.
  buildah rmi "$debian" "$rust" >/dev/null 2>&1 || true
  : >"$digests"
  bases
  write_locks
  rm -f "$cache"/*-refresh.tar
  # Built again from the lock just written, as every later build is (apt marks pinned packages as
  # installed by hand, so the unpinned build's images differ), and those digests recorded.
  mode=build
  buildah rmi "$debian" "$rust" >/dev/null 2>&1 || true
  : >"$digests"
  bases
  record_digests
  log "wrote $lock and $digests: review the diff and commit them"
  exit 0
fi
if [[ $mode == verify ]]; then
  # A storage of its own: nothing of the machine's images or caches is reused.
  store="$(mktemp -d /var/tmp/loopguard-verify-bases.XXXXXX)"
  trap 'buildah --root "$store/root" --runroot "$store/run" rm --all >/dev/null 2>&1 || true
    buildah --root "$store/root" --runroot "$store/run" rmi --all --force >/dev/null 2>&1 || true
    umount -R "$store" 2>/dev/null || true; rm -rf "$store" "$tmp"' EXIT
  buildah() { command buildah --root "$store/root" --runroot "$store/run" "$@"; }
  cache="$store/cache"
  mkdir -p "$cache"
  bases
  failed=0
  for pair in "debian:12.11-slim=$debian" "rust:$rust_version-slim-bookworm=$rust"; do
    got="$(image_id "${pair#*=}")" want="$(recorded_id "${pair%%=*}")"
    if [[ "$got" == "$want" ]]; then
      echo "${pair%%=*}: sha256:$got, as recorded"
    else
      echo "${pair%%=*}: rebuilt as sha256:$got; $digests records sha256:${want:-nothing}" >&2
      failed=1
    fi
  done
  exit "$failed"
fi

make_loopguard() {
  # The Dockerfile as a user with a registry runs it; only the base images come from here.
  # This machine's CA certificates (its way to the package registries inspects TLS) are lent to
  # the build's RUN steps, read-only, so that cargo reaches the crate registry: no layer keeps them.
  buildah bud --network host --pull=never --layers \
    --volume /etc/ssl/certs:/etc/ssl/certs:ro \
    --build-arg "VERSION=$version" -t "$image" -f "$repo/Dockerfile" "$repo" >&2
}

if [[ ! -f "$archive" ]]; then
  bases
  started=$SECONDS
  make_loopguard
  buildah push --quiet "$image" "oci-archive:$archive.tmp:$image" >/dev/null
  mv "$archive.tmp" "$archive"
  log "$image built in $((SECONDS - started))s"
  # Older archives of this version are stale.
  find "$cache" -maxdepth 1 -name "loopguard-$version-*.tar" ! -path "$archive" -delete
fi

if [[ "${1:-}" == --path ]]; then
  echo "$archive"
  exit 0
fi
log "$image: $archive ($(du -h "$archive" | cut -f1))"
echo "$archive"
