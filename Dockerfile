# syntax=docker/dockerfile:1
#
# The loopguard image: one binary, `loopguard controller` and `loopguard agent`, on a small Debian with
# iptables (both the legacy and the nft backends: the agent uses whichever the node uses) and nft.
#
#   docker build -t ghcr.io/loopguard/loopguard:0.1.0 .
#
# Base images are pinned by exact tag, not by digest: this project's machines reach no registry that
# serves them, so hack/build-image.sh builds both here, reproducibly, from the Debian packages pinned in
# hack/image/bookworm.lock, and records their digests in hack/release/base-images.lock (which a
# release's provenance names). Where the upstream images are used, pin them by their index digest:
#   docker buildx imagetools inspect debian:12.11-slim
#   FROM debian:12.11-slim@sha256:<digest>
# CI builds this Dockerfile with buildah (hack/build-image.sh) and runs the image on real nodes.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Everything the workspace needs to load (hack/hollow is a member), nothing more.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY hack/hollow ./hack/hollow
COPY hack/build-release.sh ./hack/build-release.sh
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    ./hack/build-release.sh /out/loopguard

FROM debian:12.11-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="loopguard" \
      org.opencontainers.image.description="Enforces the CIS/PCI-DSS IPv6 loopback firewall baseline on every Kubernetes node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/loopguard/loopguard" \
      org.opencontainers.image.base.name="docker.io/library/debian:12.11-slim"
# iptables brings iptables/ip6tables with both backends (-legacy and -nft) and their -save/-restore;
# nftables brings nft, to list the input-hook chains as ComplianceAsCode reads them (loopguard writes
# its own table over netlink).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 nftables=1.0.6-2+deb12u2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/loopguard /usr/local/bin/loopguard
# Non-root by default: the controller runs so. The agent's Pod runs it as uid 0 with NET_ADMIN and
# NET_RAW only (see charts/loopguard/README.md).
USER 65532:65532
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the chart's liveness and readiness probes use /healthz and /readyz
ENTRYPOINT ["/usr/local/bin/loopguard"]
