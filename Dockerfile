# syntax=docker/dockerfile:1
# amibus container image: build with the Rust toolchain, run on distroless (glibc, libgcc,
# libssl3 and CA certificates; no shell, no package manager), as a non-root user.
#
#   docker build -t amibus .
#   docker run --rm -v ./amibus.toml:/etc/amibus/amibus.toml:ro -p 9898:9898 amibus
#   docker run --rm amibus run          # the embedded demo (no config file)
#
# The Helm chart in helm/amibus runs this image.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# Headers for native dependencies: OpenSSL and zlib for librdkafka (the Kafka sink), pkg-config
# to find them. The AMI/NATS TLS stack is rustls with ring and needs none of them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin amibus \
 && install -D -m 0755 target/release/amibus /out/usr/local/bin/amibus
# Directories the image provides, owned by the runtime user (distroless has no shell to make
# them later).
RUN install -d -m 0750 /out/var/lib/amibus/spool \
 && install -d -m 0755 /out/etc/amibus

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/amibus /usr/local/bin/amibus
COPY --from=build --chown=65532:65532 /out/var/lib/amibus /var/lib/amibus
COPY --from=build /out/etc/amibus /etc/amibus
# 65532 is "nonroot" in distroless; the Helm chart runs as the same user.
USER 65532:65532
# Spooled records survive a restart only if this is a persistent volume.
VOLUME ["/var/lib/amibus/spool"]
# /metrics, /healthz, /readyz (set metrics.listen = "0.0.0.0:9898" in the config).
EXPOSE 9898
ENTRYPOINT ["amibus"]
CMD ["run", "--config", "/etc/amibus/amibus.toml"]
