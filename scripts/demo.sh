#!/usr/bin/env bash
# Builds fencegate and runs the demo. The only thing a fresh Debian machine
# with Rust lacks is protoc (etcd-client generates its gRPC code at build time).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null
fi
cargo run --release --locked --quiet -- demo "$@"
