#!/usr/bin/env bash
# A release build of fencegate tuned by profile (PGO): build it instrumented, run traffic through it
# (bench/pgo_train.py: the sidecar and the filter in front of nginx, with etcd, wrk and h2load), then build it again
# with the recorded counts: the same code, compiled with other inlining and layout. Counted by callgrind, 27-29% fewer
# instructions per kept-alive request on each hop than `cargo build --release` (bench/README.md, "A profile-guided
# build"). Takes two release builds (about 8 minutes on 2 cores) plus a minute of traffic. Then, where BOLT is
# installed, the binary is laid out again by a second profile (see "BOLT" below: a second training run, and a
# minute of BOLT's own work).
#
#   bash scripts/pgo-build.sh            # -> target/pgo/fencegate (and target/pgo/fencegate.build: what it is)
#   PGO_REBUILD=1 bash scripts/pgo-build.sh   # build it even if nothing it is built from has changed
#   PGO_BOLT=0 bash scripts/pgo-build.sh      # the profile-guided build without BOLT's layout (any other value: with)
#
# Nothing is rebuilt when target/pgo/fencegate was built from the same inputs: the sources, Cargo's files and
# settings, the training run's scripts and settings, rustc's version, and BOLT's version and PGO_BOLT (hashed into
# target/pgo/fencegate.inputs; a build whose BOLT step failed is stamped too: PGO_REBUILD=1 tries again),
# so a bench run after a bench run, or a BENCH_ONLY one, does not spend eight minutes on the same binary.
#
# Needs what the bench needs (`scripts/install-deps.sh bench` installs what is missing, as for bench/run.sh) and
# rustup's llvm-tools component for llvm-profdata (added if missing: it must match rustc's LLVM, which a
# distribution's llvm-profdata rarely does).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# bolt_bin: the newest llvm-bolt installed, or nothing (shared with install-deps.sh, which installs it).
source scripts/bolt.sh

# What the build and its training are made from: the files, Cargo's configuration, rustc, and the environment
# variables that change a build (Cargo's, rustc's) or the training (its length, the loops per hop). Outside a git
# checkout the hash is left empty, and every run builds. (The load tools', nginx's and etcd's versions are not in it:
# PGO_REBUILD=1 after upgrading them.)
inputs_hash() {
  git rev-parse --git-dir >/dev/null 2>&1 || return 0
  {
    git ls-files -z -co --exclude-standard -- src Cargo.toml Cargo.lock .cargo bench/pgo_train.py bench/bench.py \
      bench/wrk.lua scripts/pgo-build.sh scripts/install-deps.sh scripts/bolt.sh | sort -z | xargs -0 -r sha256sum
    cat "${CARGO_HOME:-$HOME/.cargo}"/config "${CARGO_HOME:-$HOME/.cargo}"/config.toml 2>/dev/null || true
    "${RUSTC:-rustc}" -vV
    # BOLT's version (it lays the binary out), and whether it is asked for (unset is the same as 1).
    echo "PGO_BOLT=$([ "${PGO_BOLT:-1}" = 0 ] && echo 0 || echo 1)"
    local bolt; bolt=$(bolt_bin)
    [ -z "$bolt" ] || "$bolt" --version 2>/dev/null | grep -i version || true
    env | grep -E '^(CARGO_[A-Z_]*|RUSTC[A-Z_]*|RUSTFLAGS|PGO_TRAIN_SECONDS|BENCH_WORKERS|BENCH_SIDECAR_WORKERS)=' |
      grep -v '^CARGO_HOME=' | LC_ALL=C sort || true
  } | sha256sum | cut -c1-16
}
# Installed first: what it installs (BOLT) is part of the hash.
bash scripts/install-deps.sh bench
inputs=$(inputs_hash) || inputs=""
if [ "${PGO_REBUILD:-0}" != 1 ] && [ -n "$inputs" ] && [ -x target/pgo/fencegate ] &&
  [ "$(cat target/pgo/fencegate.inputs 2>/dev/null)" = "$inputs" ]; then
  echo "target/pgo/fencegate is up to date (inputs $inputs; PGO_REBUILD=1 builds it anyway)"
  exit 0
fi
rm -f target/pgo/fencegate.inputs

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  rustup component add llvm-tools
fi
[ -x "$profdata" ] || { echo "no llvm-profdata at $profdata" >&2; exit 1; }

# --target keeps RUSTFLAGS off build scripts and proc macros (they run at build time and would write profiles of
# their own); both builds have their own target dir, so neither invalidates `cargo build --release`'s.
raw="$root/target/pgo/raw"
rm -rf "$raw"
mkdir -p "$raw"
echo "=== instrumented build ==="
RUSTFLAGS="-Cprofile-generate=$raw" cargo build --release --locked --bin fencegate --target "$host" \
  --target-dir target/pgo/gen
echo "=== training run ==="
BENCH_BIN="$root/target/pgo/gen/$host/release/fencegate" python3 bench/pgo_train.py
ls "$raw"/*.profraw >/dev/null 2>&1 || { echo "the training run wrote no profile into $raw" >&2; exit 1; }
"$profdata" merge -o "$root/target/pgo/merged.profdata" "$raw"/*.profraw
# Cargo tracks RUSTFLAGS, not the file they name: a profile named by its hash makes a new profile rebuild every crate
# (dependencies included) instead of reusing ones optimised with the last profile.
sum=$(sha256sum "$root/target/pgo/merged.profdata" | cut -c1-16)
rm -f "$root"/target/pgo/fencegate-*.profdata
mv "$root/target/pgo/merged.profdata" "$root/target/pgo/fencegate-$sum.profdata"
echo "=== optimised build ==="
RUSTFLAGS="-Cprofile-use=$root/target/pgo/fencegate-$sum.profdata -Clink-arg=-Wl,--emit-relocs" cargo build --release --locked --bin fencegate \
  --target "$host" --target-dir target/pgo/use
pgo_bin="target/pgo/use/$host/release/fencegate"
# BOLT: the profile-guided binary laid out again after linking, from a second training run through a copy of it that
# counts its own branches. The compiler orders code within each function; BOLT also orders the functions and splits
# the cold parts of each away from the hot ones, so a request runs through fewer instruction-cache lines (the hops'
# L1i misses per request fell by 7-44% under callgrind, bench/README.md). The link above keeps its relocations
# (--emit-relocs) for that; they are not loaded, so the profile-guided binary runs the same with them, BOLT or not.
# Optional: PGO_BOLT=0, no BOLT installed (install-deps.sh bench tries), or any step of it failing leaves the
# profile-guided binary as it is, and target/pgo/fencegate.build says which it is. The bench's own requests, every
# answer checked, are what test the laid-out binary (a `--version` here only shows that it starts).
bolt_layout() {
  local bolt=$1 dir=$2
  rm -rf "$dir" && mkdir -p "$dir" || return 1
  echo "=== BOLT: instrumented copy ($bolt) ==="
  # Called by its full path: BOLT finds its runtime library beside itself (../lib).
  "$bolt" "$pgo_bin" -instrument -o "$dir/fencegate" --instrumentation-file="$dir/prof" \
    --instrumentation-file-append-pid >"$dir/instrument.log" 2>&1 || { tail "$dir/instrument.log" >&2; return 1; }
  echo "=== BOLT: training run ==="
  BENCH_BIN="$dir/fencegate" python3 bench/pgo_train.py || return 1
  compgen -G "$dir/prof.*.fdata" >/dev/null || { echo "the BOLT training run wrote no profile" >&2; return 1; }
  "$(dirname "$bolt")/merge-fdata" "$dir"/prof.*.fdata >"$dir/merged.fdata" 2>"$dir/merge.log" ||
    { tail "$dir/merge.log" >&2; return 1; }
  echo "=== BOLT: optimised layout ==="
  # hfsort+ and a numeric -icf: accepted by every BOLT from 15 on (newer ones warn, and would rather cdsort and all).
  "$bolt" "$pgo_bin" -o target/pgo/fencegate.new -data="$dir/merged.fdata" -reorder-blocks=ext-tsp \
    -reorder-functions=hfsort+ -split-functions -split-all-cold -split-eh -icf=1 -use-gnu-stack \
    >"$dir/optimise.log" 2>&1 || { tail "$dir/optimise.log" >&2; return 1; }
  target/pgo/fencegate.new --version >/dev/null || return 1
}
bolt=$(bolt_bin)
build=profile-guided
# Through a new file: a running target/pgo/fencegate cannot be written over ("Text file busy"), only replaced.
rm -f target/pgo/fencegate.new
if [ "${PGO_BOLT:-1}" != 0 ] && [ -n "$bolt" ]; then
  if bolt_layout "$bolt" "$root/target/pgo/bolt"; then
    build="profile-guided, BOLT-laid-out"
  else
    echo "pgo-build: the BOLT step failed (logs in target/pgo/bolt); keeping the profile-guided binary" >&2
    rm -f target/pgo/fencegate.new
  fi
else
  echo "=== no BOLT step (PGO_BOLT=${PGO_BOLT:-1}, llvm-bolt: ${bolt:-not installed}) ==="
fi
[ -e target/pgo/fencegate.new ] || cp "$pgo_bin" target/pgo/fencegate.new
mv -f target/pgo/fencegate.new target/pgo/fencegate
echo "$build" >target/pgo/fencegate.build
# Stamped only if nothing changed while it was built (an edit made and undone meanwhile would otherwise be stamped
# with the hash of what it was not built from).
if [ -n "$inputs" ] && [ "$(inputs_hash)" = "$inputs" ]; then echo "$inputs" >target/pgo/fencegate.inputs; fi
echo "built target/pgo/fencegate (profile: target/pgo/fencegate-$sum.profdata)"
