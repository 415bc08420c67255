# syntax=docker/dockerfile:1
# plugca container image. Not built on the project's machines (no container
# engine there): build it where you have one, e.g.
#   docker build -t registry.example.com/plugca:0.1.0 .
# and set the chart's image.repository / image.tag to match.

# Build stage: the toolchain of rust-version in Cargo.toml. aws-lc-sys and
# ring need only the C compiler this image has (no cmake); protox compiles the
# proto without protoc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
RUN cargo build --release --locked --bin plugca \
 && install -D -m 0755 target/release/plugca /out/plugca

# Runtime: glibc and libgcc only (what a Rust binary links), no shell, no
# package manager. The nonroot tag runs as uid/gid 65532, the ids the chart's
# securityContext and fsGroup use.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/plugca /usr/local/bin/plugca
USER 65532:65532
# 15012: gRPC CA (TLS); 15014: /ready, /healthz, /metrics.
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/plugca"]
CMD ["serve"]
