#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs them.
# Tests start their own nginx, etcd and fencegate processes on free loopback
# ports; a missing part fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Builds the examples too: the end-to-end tests run examples/append_worker.
cargo build --locked --all-targets
log=$(mktemp)
set +e
cargo test --locked --lib --bins --tests -- --test-threads="${FENCEGATE_TEST_THREADS:-4}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ | bc)
rm -f "$log"
echo
echo "fencegate: ${passed:-0} passed, ${failed:-0} failed"
exit "$rc"
