#!/usr/bin/env bash
# Builds a Debian 12 host root with ufw, iptables, nftables and procps (ufw runs sysctl) installed (minbase, by mmdebstrap
# from Debian's packages), for the ufw tests: loopguard runs that root's own ufw through chroot,
# as the agent runs a node's. Kept in a cache folder outside the checkout, keyed by the pinned
# versions and this script; prints the root's path.
#
#   hack/build-ufw-root.sh        build what is missing, print the root
set -euo pipefail

ufw_version="0.36.2-1"
iptables_version="1.8.9-2"
nftables_version="1.0.6-2+deb12u2"
procps_version="2:4.0.2-3"
script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
root="${LOOPGUARD_BIN_CACHE:-$HOME/.cache/loopguard}/ufw-root-$ufw_version-$script_hash"

[[ $EUID -eq 0 ]] || { echo "build-ufw-root: needs root (mmdebstrap)" >&2; exit 2; }
if [[ ! -x "$root/usr/sbin/ufw" ]]; then
  command -v mmdebstrap >/dev/null || {
    echo "build-ufw-root: installing mmdebstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  }
  tmp="$(mktemp -d "${root}.XXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "build-ufw-root: mmdebstrap bookworm with ufw $ufw_version into $root" >&2
  mmdebstrap --quiet --variant=minbase \
    --include="ufw=$ufw_version,iptables=$iptables_version,nftables=$nftables_version,procps=$procps_version" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$tmp/root"
  # Installed as Debian installs it: inactive (ENABLED=no). The tests enable it in their own
  # namespaces; nothing here runs it.
  grep -q '^ENABLED=no' "$tmp/root/etc/ufw/ufw.conf"
  rm -rf "$root"
  mv "$tmp/root" "$root"
fi
echo "$root"
