#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs them.
# Tests start their own nginx, etcd and fencegate processes on free loopback
# ports; a missing part fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --locked --all-targets
cargo test --locked --all-targets -- --test-threads="${FENCEGATE_TEST_THREADS:-4}"
