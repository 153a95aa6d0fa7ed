#!/usr/bin/env bash
# fencegate's benchmark: what two extra hops cost, side by side with nginx and
# HAProxy doing the same two hops, measured in one run on one machine.
#   bash bench/run.sh                       # full run (~25 min on 2 cores, with the profile-guided build)
#   BENCH_SECONDS=3 BENCH_ROUNDS=1 bash bench/run.sh   # quick look
#   BENCH_PGO=0 bash bench/run.sh           # the plain release build only (no profile-guided build)
# Results: bench/results/bench.json, bench/results/bench.md and bench/results/latency.png; then, after a full run,
# bench/readme.py rewrites the README's "Where it stands" block from them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh bench
cargo build --release --locked --bin fencegate --example admission_bench
# What is measured as "fencegate" is the profile-guided build (what scripts/pgo-build.sh makes), with the plain
# release build's two hops beside it; BENCH_PGO=0 measures the plain build alone.
if [ "${BENCH_PGO:-1}" = 1 ]; then
  bash scripts/pgo-build.sh
  BENCH_BUILD=$(cat target/pgo/fencegate.build 2>/dev/null || echo profile-guided)
  export BENCH_BIN="$PWD/target/pgo/fencegate" BENCH_PLAIN_BIN="$PWD/target/release/fencegate" BENCH_BUILD
fi
python3 bench/bench.py "$@"
# The README's "Where it stands" block, from the run just written (bench/results/bench.json): after a full run only,
# not a quick look (BENCH_SECONDS, BENCH_ROUNDS) or a part (BENCH_ONLY); BENCH_README=1 or 0 decides otherwise.
full=1
[ -z "${BENCH_ONLY:-}${BENCH_SECONDS:-}${BENCH_ROUNDS:-}" ] || full=0
if [ "${BENCH_README:-$full}" = 1 ]; then
  python3 bench/readme.py
else
  echo "README.md left as it was (not a full run; BENCH_README=1 rewrites its block anyway)"
fi
