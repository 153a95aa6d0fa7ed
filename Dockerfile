# fencegate: one binary for the injector, the sidecar and the filter.
#   docker build -t fencegate .
FROM rust:1-bookworm AS build
# etcd-client generates its gRPC code at build time with protoc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin fencegate \
 && strip target/release/fencegate

# Small runtime: glibc and CA certificates, no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fencegate /usr/local/bin/fencegate
USER 65532:65532
# filter 8080/9090, sidecar 7850/7851/7852 (proxy/admin/health: outside Istio's
# and Linkerd's port ranges), injector 8443
EXPOSE 8080 9090 7850 7851 7852 8443
ENTRYPOINT ["/usr/local/bin/fencegate"]
