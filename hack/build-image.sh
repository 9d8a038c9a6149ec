#!/usr/bin/env bash
# Builds the loopguard image from the Dockerfile, as it is, with buildah (no Docker engine), and
# writes it as an OCI archive:
#
#   hack/build-image.sh            build (or reuse) the image; print the archive's path and size
#   hack/build-image.sh --path     print the archive's path only (build first when missing)
#
# No registry is reachable here, so the two base images the Dockerfile names are made locally
# first, under the same names, and kept in buildah's storage and as archives in the cache:
#   debian:12.11-slim          bookworm, minbase, by mmdebstrap from Debian's packages, without
#                              documentation and locales (as the official slim images are)
#   rust:1.95.0-slim-bookworm  that base plus gcc and libc6-dev (the official image's), and the
#                              Rust toolchain of this machine, which is the version the Dockerfile
#                              pins (checked), laid out like the official image (/usr/local/rustup,
#                              /usr/local/cargo); and this machine's extra CA certificates
#                              (/usr/local/share/ca-certificates: its way to the package registries
#                              inspects TLS), so that the build stage's cargo reaches crates.io.
#                              Only this stand-in carries them; the loopguard image does not.
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

has_image() { buildah images --quiet "$1" >/dev/null 2>&1; }

# An image from its cached archive, else built by `make_it` and archived.
ensure() {
  local name="$1" tar="$2" make_it="$3" started
  if has_image "$name"; then return; fi
  if [[ -f "$tar" ]]; then
    buildah tag "$(buildah pull --quiet "oci-archive:$tar")" "$name"
    return
  fi
  started=$SECONDS
  "$make_it"
  buildah push --quiet "$name" "oci-archive:$tar:$name" >/dev/null
  log "$name built in $((SECONDS - started))s"
}

make_debian() {
  local work="$tmp/debian"
  mkdir -p "$work"
  mmdebstrap --quiet --variant=minbase \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$work/rootfs.tar"
  local ctr
  ctr="$(buildah from scratch)"
  buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
  buildah config --cmd '["bash"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet "$ctr" "$debian" >/dev/null
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
  # The toolchain of this machine's architecture (the image is built for the machine's own).
  local host
  host="$("$toolchain/bin/rustc" -vV | sed -n 's/^host: //p')"
  mkdir -p "$work/rustup/toolchains/$rust_version-$host" "$work/cargo/bin"
  tar -C "$toolchain" --exclude=./share/doc -cf - . |
    tar -C "$work/rustup/toolchains/$rust_version-$host" -xf -
  printf 'version = "12"\ndefault_toolchain = "%s-%s"\nprofile = "minimal"\n' \
    "$rust_version" "$host" >"$work/rustup/settings.toml"
  mkdir -p "$work/ca"
  cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true
  cp "$(command -v rustup)" "$work/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc; do ln -s rustup "$work/cargo/bin/$proxy"; done
  cat >"$work/Containerfile" <<EOF
FROM $debian
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$rust_version
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
COPY ca /usr/local/share/ca-certificates
RUN update-ca-certificates
EOF
  buildah bud --quiet --network host --pull=never -t "$rust" "$work" >/dev/null
}

make_loopguard() {
  # The Dockerfile as a user with a registry runs it; only the base images come from here.
  buildah bud --network host --pull=never --layers \
    --build-arg "VERSION=$version" -t "$image" -f "$repo/Dockerfile" "$repo" >&2
}

if [[ ! -f "$archive" ]]; then
  ensure "$debian" "$cache/debian-12.11-slim.tar" make_debian
  ensure "$rust" "$cache/rust-$rust_version-slim-bookworm.tar" make_rust
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
