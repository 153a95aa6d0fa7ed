#!/usr/bin/env bash
# Runs bench/bench.py with the programs of a kit made by bench/device-kit.sh (copied beside it as run-bench.sh),
# from the repository root, on a machine where nothing can be installed. Env BENCH_* as for bench.py.
set -uo pipefail
here=$(dirname "$(readlink -f "$0")")
k=/tmp/fencegate-kit/kit
rm -rf /tmp/fencegate-kit && mkdir -p /tmp/fencegate-kit
tar -C /tmp/fencegate-kit -xzf "$here/kit.tar.gz" || exit 1
export PATH="$k/bin:$PATH"
# The kit's Python, whatever the machine has (or lacks).
py="$k/bin/python3-kit"
export PYTHONHOME="$k/python-home"
mkdir -p "$PYTHONHOME/lib" && ln -sfn "$k/python/python3.11" "$PYTHONHOME/lib/python3.11"
# nginx's workers run as www-data when it is started as root (bench.py).
id www-data >/dev/null 2>&1 || useradd -r -M -s /usr/sbin/nologin www-data 2>/dev/null ||
  echo 'www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin' >>/etc/passwd
getent group www-data >/dev/null 2>&1 || echo 'www-data:x:33:' >>/etc/group
mkdir -p target/release/examples
[ -e target/release/examples/admission_bench ] || ln -s "$k/bin/admission_bench" target/release/examples/admission_bench
# The profile-guided build, where the kit has one, as "fencegate" with the plain build beside it (as bench/run.sh).
if [ -x "$k/bin/fencegate-pgo" ]; then
  BENCH_BUILD=$(cat "$k/fencegate-pgo.build" 2>/dev/null || echo profile-guided)
  export BENCH_BIN="$k/bin/fencegate-pgo" BENCH_PLAIN_BIN="$k/bin/fencegate" BENCH_BUILD
else
  export BENCH_BIN="$k/bin/fencegate" BENCH_BUILD=plain
fi
echo "python: $py; $(nproc) CPUs; kernel $(uname -r)"
"$py" "${BENCH_SCRIPT:-bench/bench.py}"
rc=$?
if [ -n "${OUT:-}" ]; then cp bench/results/bench.json bench/results/bench.md "$OUT/" 2>/dev/null; fi
exit $rc
