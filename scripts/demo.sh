#!/usr/bin/env bash
# Builds fencegate and runs the demo (no etcd needed). A fresh Debian machine with Rust lacks only what etcd-client's
# build needs (protoc and the protobuf well-known types); the shared installer adds and checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh build
cargo run --release --locked --quiet -- demo "$@"
