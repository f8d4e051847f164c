# syntax=docker/dockerfile:1
#
# The Cairn image, in three stages:
#   build    compiles `cairn` with cargo (rust:bookworm)
#   runtime  debian:bookworm-slim with the binary: CAS, AC and scheduler roles
#   worker   runtime plus a C/C++ toolchain for the actions a worker runs (the default target)
#
#   docker build --target runtime -t cairn .
#   docker build --target worker -t cairn-worker .
#   docker run --rm -p 50051:50051 cairn                          # all-in-one, data in a volume
#   docker run --rm -v $PWD/my.json5:/etc/cairn/my.json5:ro cairn run /etc/cairn/my.json5
#
# deployment-examples/kubernetes/ runs these images with the configs of its ConfigMap.

FROM rust:bookworm AS build
WORKDIR /src
# Only what `cargo build -p cairn` reads; the build context's target/ is never sent.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cairn \
    && install -D -m 0755 target/release/cairn /out/cairn

FROM debian:bookworm-slim AS runtime
# ca-certificates: for TLS to cloud stores and collectors; tini: PID 1 that forwards SIGTERM
# (Cairn drains in-flight requests on SIGTERM) and reaps the processes actions leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cairn \
    && useradd --system --uid 10001 --gid cairn --home-dir /var/lib/cairn --shell /usr/sbin/nologin cairn \
    && install -d -o cairn -g cairn /var/lib/cairn /var/lib/cairn-worker /etc/cairn
COPY --from=build /out/cairn /usr/local/bin/cairn
USER 10001:10001
# The built-in all-in-one config (`cairn` with no arguments), reachable from outside the
# container; its worker API stays on 127.0.0.1:50061, inside.
ENV CAIRN_DATA=/var/lib/cairn \
    CAIRN_LISTEN=0.0.0.0:50051 \
    RUST_LOG=info
VOLUME ["/var/lib/cairn"]
# 50051 CAS/AC (and all-in-one), 50052 scheduler, 50061 worker API (never publish it).
EXPOSE 50051 50052 50061
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cairn"]

FROM runtime AS worker
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
