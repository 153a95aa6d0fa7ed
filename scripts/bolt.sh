# Sourced by scripts/install-deps.sh (which installs BOLT) and scripts/pgo-build.sh (which runs it): where the newest
# llvm-bolt is. Debian names its package after the LLVM version (bolt-15 in bookworm, bolt-22 later), and each
# installs under /usr/lib/llvm-N, so the newest one present is taken; nothing is printed when none is.
bolt_bin() { ls /usr/lib/llvm-*/bin/llvm-bolt 2>/dev/null | sort -V | tail -1 || true; }
