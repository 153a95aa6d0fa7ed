#!/usr/bin/env python3
"""fencegate's benchmark harness (see bench/run.sh, which installs and builds first).

Paths, each measured with wrk for small GETs and 1 KiB PUTs at 1 and 32 connections:
  direct    wrk -> nginx store
  fencegate wrk -> fencegate sidecar -> fencegate filter -> store (etcd up, lock held, tokens injected and checked)
  nginx     wrk -> nginx proxy (adds the fencing headers) -> nginx proxy -> store
  haproxy   wrk -> haproxy (adds the fencing headers) -> haproxy -> store
Several rounds, paths alternating inside each round; medians reported. The machine is shared and noisy:
the figures that count are the ratios to nginx measured in the same run.

Single hops: the sidecar alone vs one nginx hop adding the headers; the filter alone vs one plain nginx hop.
Open loop: GETs at fixed rates (25/50/75% of nginx's best closed-loop rate) with h2load --rps, p50/p99/p99.9 per path,
drawn in bench/results/latency.png.
Also: failover times (kill -9 and SIGTERM), with the filter trusting tokens and with it verifying every raise with
etcd (`--etcd`), the filter with 100k locks, and a CPU profile of fencegate's path.
`BENCH_ONLY=failover` runs only the failover part (both ways) and prints its figures, writing no results files.
`BENCH_ONLY=replicas` or `BENCH_ONLY=many_locks` runs only that part and puts its figures into the committed
bench.json / bench.md. `BENCH_LOCKS` sets how many locks the 100k-locks part spreads over (fewer than 100000 is
reported as not meeting that goal).
Only loopback addresses are used; every loop is bounded in count and time.
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client as httpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BENCH_BIN", os.path.join(ROOT, "target/release/fencegate"))
# bench/run.sh measures the profile-guided build (scripts/pgo-build.sh) as "fencegate" and the plain
# `cargo build --release` beside it as "fencegate-plain" (two hops only), so the table shows what each build costs.
PLAIN_BIN = os.environ.get("BENCH_PLAIN_BIN")
# What the report calls BIN: BENCH_BUILD names it (run.sh: "profile-guided"); a BENCH_BIN given without a name is
# reported by its path, not as the plain build it may not be.
BUILD = os.environ.get("BENCH_BUILD") or ("plain" if "BENCH_BIN" not in os.environ else None)
WRK_LUA = os.path.join(ROOT, "bench/wrk.lua")
OUT = os.path.join(ROOT, "bench/results")
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# Worker processes / threads of each nginx and HAProxy hop and event loops of each fencegate hop (sidecar and
# filter: `--worker-threads`), the same for all, so that a machine with more CPUs compares like with like.
# BENCH_SIDECAR_WORKERS=1 measures the sidecar as it runs by default (one app instance, one loop).
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
SIDECAR_WORKERS = int(os.environ.get("BENCH_SIDECAR_WORKERS", str(WORKERS)))
TTL = "2s"
LOCK = "bench"
TICK = os.sysconf("SC_CLK_TCK")
procs = []
# Scratch folders removed by stop_all() once the processes using them are stopped: the store's files live in
# /dev/shm, which is memory, and a run leaves hundreds of MB there otherwise.
scratch = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, within=15.0):
    end = time.time() + within
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def start(name, args, work, env=None):
    log = open(os.path.join(work, f"{name}.log"), "ab")
    e = dict(os.environ)
    e.update(env or {})
    # Each part leads a process group of its own, so that stopping it stops its children too: nginx's and HAProxy's
    # workers outlive a SIGKILLed master otherwise, holding their listening sockets.
    p = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=e, start_new_session=True)
    procs.append(p)
    return p


def kill_group(p, sig=signal.SIGKILL):
    """Sends sig to p's whole process group (p leads it: start() made it so)."""
    try:
        os.killpg(p.pid, signal.SIGCONT)
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def stop_all():
    for p in procs:
        kill_group(p)
        try:
            p.wait(timeout=5)
        except Exception:
            pass
    # Forgotten once stopped: a second call (run_in's, after a caller's own) must not signal a process group whose
    # number has since been given to another process.
    procs.clear()
    for d in scratch:
        shutil.rmtree(d, ignore_errors=True)
    scratch.clear()


def run_in(prefix, body, keep=False):
    """body(work) in a new work folder (the parts' configs and logs), which is removed when body returns unless
    keep; kept, and named on stderr, when it raises or exits, so the logs can be read. Every process body started
    (start()) is stopped when it ends, however it ends: a script that forgot stop_all() once left four filters and
    their nginx stores running under a later bench run."""
    work = tempfile.mkdtemp(prefix=prefix)
    os.chmod(work, 0o755)
    try:
        out = body(work)
    except BaseException:
        print(f"the parts' logs are in {work}", file=sys.stderr, flush=True)
        raise
    finally:
        stop_all()
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def call(method, port, path, body=None, headers=None, timeout=2.0):
    c = httpc.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def tree(pid):
    """pid and its descendants (nginx and haproxy workers)."""
    out = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split():
                    out += tree(int(c))
    except OSError:
        pass
    return out


def cpu_seconds(pids):
    """(user + system, user) CPU seconds of pids. Most of a proxied request's CPU on a VM is the kernel's, spent alike
    by every proxy; the user part is what the proxy's own code costs, so the report shows both."""
    total = user = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / TICK, user / TICK


def status_kib(pids, key):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def wrk(port, method, conns, seconds, env=None, path="/bench/small", threads=None):
    threads = threads or (1 if conns == 1 else 2)
    e = dict(os.environ)
    e["WRK_METHOD"] = method
    e.update(env or {})
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "5s", "-s", WRK_LUA,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, env=e, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk said: {out.stdout} {out.stderr}")


# ----------------------------------------------------------------- the parts

def nginx_conf(work, name, port, body):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    user = "user www-data www-data;" if os.geteuid() == 0 else ""
    # WebDAV's PROPFIND and friends, where the module is installed (the bench itself sends GETs and PUTs only).
    dav_ext = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"
    load = f"load_module {dav_ext};" if os.path.exists(dav_ext) else ""
    conf = f"""{user}
{load}
daemon off;
worker_processes {WORKERS};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  keepalive_requests 1000000;
  {body}
}}
"""
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(conf)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "www-data:www-data", d], check=True)
    return d


def start_store(work):
    port = free_port()
    data = tempfile.mkdtemp(prefix="fg-bench-store-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    scratch.append(data)
    os.makedirs(os.path.join(data, "bench"), exist_ok=True)
    with open(os.path.join(data, "bench/small"), "w") as f:
        f.write("x" * 100)
    if os.geteuid() == 0:
        os.chmod(data, 0o755)
        subprocess.run(["chown", "-R", "www-data:www-data", data], check=True)
    d = nginx_conf(work, "store", port, f"""server {{ listen 127.0.0.1:{port}; root {data}; client_max_body_size 0;
    location / {{ dav_methods PUT DELETE MKCOL COPY MOVE; create_full_put_path on; dav_access user:rw group:rw all:r; }} }}""")
    p = start("store", ["nginx", "-c", f"{d}/nginx.conf", "-p", d, "-e", f"{d}/error.log"], work)
    wait_port(port)
    return p, port, data


def start_nginx_proxy(work, name, upstream, add_headers):
    port = free_port()
    hdrs = f"proxy_set_header Fencing-Lock {LOCK}; proxy_set_header Fencing-Token 1;" if add_headers else ""
    d = nginx_conf(work, name, port, f"""upstream up {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{ listen 127.0.0.1:{port}; client_max_body_size 0;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; {hdrs}
      proxy_request_buffering off; proxy_buffering off; }} }}""")
    p = start(name, ["nginx", "-c", f"{d}/nginx.conf", "-p", d, "-e", f"{d}/error.log"], work)
    wait_port(port)
    return p, port


def start_haproxy(work, name, upstream, add_headers):
    port = free_port()
    hdrs = f"  http-request set-header Fencing-Lock {LOCK}\n  http-request set-header Fencing-Token 1\n" if add_headers else ""
    conf = f"""global
  nbthread {WORKERS}
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
{hdrs}  default_backend b
backend b
  server s 127.0.0.1:{upstream}
"""
    path = os.path.join(work, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(conf)
    p = start(name, ["haproxy", "-db", "-f", path], work)
    wait_port(port)
    return p, port


def start_etcd(work):
    cport, pport = free_port(), free_port()
    c, pe = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    start("etcd", ["etcd", "--name", "b", "--data-dir", os.path.join(work, "etcd"), "--listen-client-urls", c,
                   "--advertise-client-urls", c, "--listen-peer-urls", pe, "--initial-advertise-peer-urls", pe,
                   "--initial-cluster", f"b={pe}", "--log-level", "error"], work)
    wait_port(cport)
    time.sleep(1.0)
    return c


def start_filter(work, store_port, extra=(), state=None, bin=None):
    port, admin = free_port(), free_port()
    state = state or tempfile.mkdtemp(prefix="fg-bench-state-", dir=work)
    args = [bin or BIN, "filter", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{store_port}", "--state-dir", state, "--worker-threads", str(WORKERS), *extra]
    p = start(f"filter-{port}", args, work, {"RUST_LOG": "warn"})
    wait_port(admin)
    return p, port, admin


def start_sidecar(work, etcd, holder, upstream_port, fence_admin, ports=None, lock=LOCK, bin=None):
    port, admin = ports or (free_port(), free_port())
    args = [bin or BIN, "sidecar", "--etcd", etcd, "--lock", lock, "--holder", holder, "--ttl", TTL,
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{upstream_port}", "--worker-threads", str(SIDECAR_WORKERS)]
    if fence_admin:
        args += ["--fence", f"http://127.0.0.1:{fence_admin}"]
    p = start(f"sidecar-{holder}", args, work, {"RUST_LOG": "warn"})
    wait_port(admin)
    return p, port, admin


def holding(admin):
    try:
        s, b = call("GET", admin, "/v1/lock", timeout=0.5)
        return s == 200 and json.loads(b).get("holding") is True
    except OSError:
        return False


def wait_holding(admin, within=15.0):
    end = time.time() + within
    while time.time() < end:
        if holding(admin):
            return
        time.sleep(0.02)
    raise RuntimeError("sidecar never held the lock")


# ----------------------------------------------------------------- measurements

def throughput(work, store_port, etcd):
    f, fport, fadmin = start_filter(work, store_port, ["--lock", LOCK])
    sc, sport, sadmin = start_sidecar(work, etcd, "bench-a", fport, fadmin)
    wait_holding(sadmin)
    time.sleep(0.5)
    idle_rss = status_kib([sc.pid], "VmRSS")
    na2, na2port = start_nginx_proxy(work, "nginx-hop2", store_port, False)
    na1, na1port = start_nginx_proxy(work, "nginx-hop1", na2port, True)
    ha2, ha2port = start_haproxy(work, "haproxy-hop2", store_port, False)
    ha1, ha1port = start_haproxy(work, "haproxy-hop1", ha2port, True)
    # Single hops: a second sidecar (its own lock) straight to the store vs one nginx hop adding the headers; the
    # filter alone vs one plain nginx hop, wrk sending the headers to both.
    sc1, sc1port, sc1admin = start_sidecar(work, etcd, "bench-1hop", store_port, None, lock=f"{LOCK}-1hop")
    wait_holding(sc1admin)
    n1h, n1hport = start_nginx_proxy(work, "nginx-1hop", store_port, True)
    plain = start_plain_pair(work, store_port, etcd) if PLAIN_BIN else None
    paths = {
        "direct": (store_port, []),
        "fencegate": (sport, [sc.pid, f.pid]),
        **({"fencegate-plain": (plain[0], [p.pid for p in plain[1]])} if plain else {}),
        "nginx": (na1port, [na1.pid, na2.pid]),
        "haproxy": (ha1port, [ha1.pid, ha2.pid]),
        "sidecar-1hop": (sc1port, [sc1.pid]),
        "nginx-1hop-headers": (n1hport, [n1h.pid]),
        "filter-1hop": (fport, [f.pid]),
        "nginx-1hop": (na2port, [na2.pid]),
    }
    # Direct PUTs carry the headers too, so every path sends the same bytes to the store.
    fence_env = {"WRK_FENCE": f"{LOCK}:1"}
    # The filter alone gets the sidecar's current token (it has seen it: older ones are stale).
    token = json.loads(call("GET", sadmin, "/v1/lock")[1])["token"]
    filter_env = {"WRK_FENCE": f"{LOCK}:{token}"}
    extra_env = {"direct": fence_env, "filter-1hop": filter_env, "nginx-1hop": fence_env}
    # Check every path works before measuring.
    for name, (port, _) in paths.items():
        h = {}
        if name in extra_env:
            lock, tok = extra_env[name]["WRK_FENCE"].split(":")
            h = {"Fencing-Lock": lock, "Fencing-Token": tok}
        s, _ = call("PUT", port, "/bench/put", body=b"x" * 1024, headers=h)
        assert s in (201, 204), f"{name}: PUT answered {s}"
    # (method, connections, a new connection per request): the last case is a client that does not keep its
    # connections open (`Connection: close` on every request; wrk connects again), so each request costs the proxy
    # an accept and a close, and a proxy that opened an upstream connection per client connection a connect too.
    cases = [(m, c, False) for m in ("GET", "PUT") for c in (1, 32)] + [("GET", 8, True)]
    case_name = lambda m, c, close: f"{m} c={c}" + (" new conn" if close else "")  # noqa: E731
    raw = {n: {case_name(*k): [] for k in cases} for n in paths}
    for r in range(ROUNDS):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for method, conns, close in cases:
            for name in order:
                port, pids = paths[name]
                all_pids = [p for pid in pids for p in tree(pid)]
                cpu0, user0 = cpu_seconds(all_pids)
                path = "/bench/small" if method == "GET" else "/bench/put"
                env = dict(extra_env.get(name, {}), **({"WRK_CLOSE": "1"} if close else {}))
                res = wrk(port, method, conns, SECONDS, env, path)
                cpu, user = (a - b for a, b in zip(cpu_seconds(all_pids), (cpu0, user0)))
                res["cpu_us_per_req"] = (cpu * 1e6 / res["requests"]) if res["requests"] and pids else None
                res["user_us_per_req"] = (user * 1e6 / res["requests"]) if res["requests"] and pids else None
                res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
                raw[name][case_name(method, conns, close)].append(res)
                print(f"  round {r + 1} {name:9} {case_name(method, conns, close):16} {res['rps']:9.0f} req/s  p50 {res['p50_us']:6d}us  "
                      f"p99 {res['p99_us']:6d}us  errors {res['socket_errors'] + res['status_errors']}", flush=True)
    rss = {n: status_kib([p for pid in pids for p in tree(pid)], "VmHWM") for n, (_, pids) in paths.items()
           if n in ("fencegate", "nginx", "haproxy")}
    rss_each = {"fencegate-sidecar": status_kib([sc.pid], "VmHWM"), "fencegate-filter": status_kib([f.pid], "VmHWM")}
    print("open loop: GET at fixed rates (fractions of nginx's best closed-loop GET rate in this run)", flush=True)
    best = max(r["rps"] for m in ("GET c=1", "GET c=32") for r in raw["nginx"][m])
    two_hops = {n: paths[n] for n in ("direct", "nginx", "haproxy", "fencegate")}
    open_loop = {n: {} for n in two_hops}
    for frac in OPEN_LOOP_FRACTIONS:
        rate = max(int(best * frac), OPEN_LOOP_CONNS)
        for name, (port, _) in two_hops.items():
            res = h2load_rate(work, port, rate, SECONDS)
            res["offered_rps"] = rate
            open_loop[name][f"{frac:.2f}"] = res
            print(f"  {frac:.0%} of {best:.0f} = {rate} req/s  {name:9} p50 {res['p50_us']:6.0f}us  p99 {res['p99_us']:6.0f}us  "
                  f"p99.9 {res['p999_us']:6.0f}us  errors {res['errors']}", flush=True)
    for p in (f, sc, na1, na2, ha1, ha2, sc1, n1h, *(plain[1] if plain else ())):
        kill_group(p)
    return raw, rss, rss_each, idle_rss, {"nginx_best_rps": best, "paths": open_loop}


def start_pair(work, store_port, etcd, lock, extra=(), bin=None):
    """A filter (with extra flags) and a sidecar holding lock in front of it, both of bin (default BIN), on a lock
    of their own: (the sidecar's port, the filter's port, [sidecar, filter])."""
    f, fport, fadmin = start_filter(work, store_port, ["--lock", lock, *extra], bin=bin)
    sc, sport, sadmin = start_sidecar(work, etcd, f"bench-{lock}", fport, fadmin, lock=lock, bin=bin)
    wait_holding(sadmin, 30)
    return sport, fport, [sc, f]


def start_plain_pair(work, store_port, etcd):
    """The plain build's two hops: (the sidecar's port, [sidecar, filter])."""
    sport, _, procs = start_pair(work, store_port, etcd, f"{LOCK}-plain", bin=PLAIN_BIN)
    return sport, procs


OPEN_LOOP_FRACTIONS = (0.25, 0.5, 0.75)
OPEN_LOOP_CONNS = 32


def h2load_rate(work, port, rate, seconds, path="/bench/small"):
    """An open-loop run: h2load sends `rate` GETs per second for `seconds` over OPEN_LOOP_CONNS keep-alive connections
    whatever the answers' pace, logging each request's latency. Percentiles from the log."""
    log = os.path.join(work, f"h2load-{port}-{rate}.log")
    n = int(rate * seconds)
    per_conn = max(rate // OPEN_LOOP_CONNS, 1)
    out = subprocess.run(["h2load", "--h1", "-c", str(OPEN_LOOP_CONNS), "-m", "1", "-n", str(n), "--rps", str(per_conn),
                          "--log-file", log, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds * 4 + 60)
    lat = []
    errors = 0
    try:
        with open(log) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 3:
                    if not parts[1].startswith("2"):
                        errors += 1
                    lat.append(int(parts[2]))
    except OSError:
        pass
    if not lat:
        raise RuntimeError(f"h2load said: {out.stdout} {out.stderr}")
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"requests": len(lat), "errors": errors + max(n - len(lat), 0), "p50_us": pct(0.50), "p99_us": pct(0.99),
            "p999_us": pct(0.999), "achieved_rps": len(lat) / max(seconds, 1)}


def draw_latency(open_loop, path):
    """bench/results/latency.png: open-loop p50/p99/p99.9 by offered rate, one line per path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no latency.png (bench/run.sh installs it)", flush=True)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (key, title) in zip(axes, (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))):
        for name, runs in open_loop["paths"].items():
            fr = sorted(runs)
            ax.plot([float(x) * 100 for x in fr], [runs[x][key] / 1000 for x in fr], marker="o", label=name)
        ax.set_title(f"{title} latency, GET, open loop")
        ax.set_xlabel(f"offered rate, % of nginx's best ({open_loop['nginx_best_rps']:.0f} req/s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def failover(work, store_port, etcd, runs=5, verify=False):
    # verify: the filter checks each new holder's raise with etcd (issue 13),
    # so the handoff pays one linearizable read on top.
    f, fport, fadmin = start_filter(work, store_port, ["--lock", LOCK] + (["--etcd", etcd] if verify else []))
    sides = []
    for h in ("fo-a", "fo-b"):
        p, port, admin = start_sidecar(work, etcd, h, fport, fadmin)
        sides.append([p, port, admin, h])
    results = {"kill9_ms": [], "sigterm_ms": []}
    for kind, sig in (("kill9_ms", signal.SIGKILL), ("sigterm_ms", signal.SIGTERM)):
        for _ in range(runs):
            end = time.time() + 20
            while not any(holding(s[2]) for s in sides):
                if time.time() > end:
                    raise RuntimeError("no holder")
                time.sleep(0.02)
            time.sleep(0.3)
            hi = 0 if holding(sides[0][2]) else 1
            holder, other = sides[hi], sides[1 - hi]
            done = threading.Event()
            got = {}

            def writer():
                t_end = time.time() + 15
                while not done.is_set() and time.time() < t_end:
                    try:
                        s, _ = call("PUT", other[1], "/failover", body=b"x", timeout=1.0)
                        if s in (201, 204):
                            got["t"] = time.monotonic()
                            return
                    except OSError:
                        pass
                    time.sleep(0.002)

            t0 = time.monotonic()
            holder[0].send_signal(sig)
            th = threading.Thread(target=writer)
            th.start()
            th.join(timeout=20)
            done.set()
            if "t" not in got:
                raise RuntimeError(f"{kind}: no write admitted after the holder went")
            results[kind].append((got["t"] - t0) * 1000)
            holder[0].wait(timeout=10)
            p, port, admin = start_sidecar(work, etcd, holder[3], fport, fadmin, ports=(holder[1], holder[2]))
            holder[0] = p
            print(f"  {kind}: {results[kind][-1]:.0f} ms", flush=True)
    for s in sides:
        kill_group(s[0])
    kill_group(f)
    return results


def touch_locks(port, admin, n, within, step=5):
    """Writes every one of n locks once (/k/{i}/obj under lock{i}; one wrk thread walks them in order) so that each
    has a durable record, for at most `within` seconds. Returns how many locks the filter knows."""
    known, t_end = 0, time.time() + within
    while known < n and time.time() < t_end:
        wrk(port, "PUT", 32, step, {"WRK_LOCKS": str(n), "WRK_SEQ": "1", "WRK_BODY": "16", "WRK_OFFSET": str(known)},
            threads=1)
        known = len(json.loads(call("GET", admin, "/v1/locks", timeout=60)[1])["locks"])
    return known


def many_locks(work, store_port, n=int(os.environ.get("BENCH_LOCKS", "100000"))):
    rules = os.path.join(work, "rules.txt")
    with open(rules, "w") as fh:
        for i in range(n):
            fh.write(f"/k/{i}/=lock{i}\n")
    shm = tempfile.mkdtemp(prefix="fg-bench-locks-", dir="/dev/shm" if os.path.isdir("/dev/shm") else work)
    f, fport, fadmin = start_filter(work, store_port, ["--protect-file", rules], state=shm)
    time.sleep(0.5)
    rss_rules = status_kib([f.pid], "VmRSS")
    known = touch_locks(fport, fadmin, n, within=180)
    rss_locks = status_kib([f.pid], "VmRSS")
    # The baseline with the store doing the same work: the same 100k paths, all under one lock (a second filter
    # with one rule), so what differs is only the filter's per-lock state. And the old baseline, one path.
    shm1 = tempfile.mkdtemp(prefix="fg-bench-lock-", dir="/dev/shm" if os.path.isdir("/dev/shm") else work)
    f1, f1port, _ = start_filter(work, store_port, ["--protect", "/k/=lock0"], state=shm1)
    time.sleep(1.2)
    cases = {
        "spread": (fport, {"WRK_LOCKS": str(n), "WRK_BODY": "1024"}),
        "one_lock_same_paths": (f1port, {"WRK_LOCKS": str(n), "WRK_ONE_LOCK": "1", "WRK_BODY": "1024"}),
        "one_lock_one_path": (fport, {"WRK_LOCKS": "1", "WRK_BODY": "1024"}),
    }
    runs = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for name, (port, env) in cases.items():
            # The filter's own CPU per request too: the rate moves with the store and wrk sharing the 2 cores, the
            # filter's CPU is what its per-lock state costs.
            pid = f.pid if port == fport else f1.pid
            before = cpu_seconds([pid])
            r = wrk(port, "PUT", 32, SECONDS, env)
            after = cpu_seconds([pid])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["filter_cpu_us_per_req"] = (after[0] - before[0]) * 1e6 / max(r["requests"], 1)
            r["filter_user_us_per_req"] = (after[1] - before[1]) * 1e6 / max(r["requests"], 1)
            runs[name].append(r)
    kill_group(f)
    kill_group(f1)
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(shm1, ignore_errors=True)
    pick = lambda name: sorted(runs[name], key=lambda r: r["rps"])[len(runs[name]) // 2]
    return {"locks": n, "locks_known": known, "rss_kib_rules_only": rss_rules, "rss_kib_with_locks": rss_locks,
            "bytes_per_lock": (rss_locks - rss_rules) * 1024 / max(known, 1),
            "put_c32_spread_over_locks": pick("spread"), "put_c32_one_lock": pick("one_lock_one_path"),
            "put_c32_one_lock_same_paths": pick("one_lock_same_paths"), "runs": runs}


def etcd_calls(etcd):
    """etcd's count of Txn, Range and Put calls served (its /metrics): writes in steady state must not add any."""
    port = int(etcd.rsplit(":", 1)[1])
    _, body = call("GET", port, "/metrics", timeout=5)
    n = 0
    for line in body.decode().splitlines():
        if line.startswith("grpc_server_handled_total{") and re.search(r'grpc_method="(Txn|Range|Put)"', line):
            n += int(float(line.rsplit(" ", 1)[1]))
    return n


def start_replicas(work, store_port, etcd, n, prefix):
    """n filter replicas sharing marks under `prefix`, each ready (/readyz 200)."""
    out = []
    for i in range(n):
        p, port, admin = start_filter(work, store_port, [
            "--lock", LOCK, "--etcd", etcd, "--trust-tokens", "--shared-marks", "--replica-id", f"r{i}",
            "--replica-ttl", "5s", "--marks-prefix", prefix])
        out.append((p, port, admin))
    end = time.time() + 20
    for _, _, admin in out:
        while call("GET", admin, "/readyz")[0] != 200:
            if time.time() > end:
                raise RuntimeError("replica never ready")
            time.sleep(0.05)
    return out


def raise_latency(port, runs=40):
    """Latency of a write carrying a new token (the raise: CAS in etcd, every replica's acknowledgement, the
    forward) next to a write with the token already admitted, on one kept-alive connection."""
    c = httpc.HTTPConnection("127.0.0.1", port, timeout=30)
    body = b"x" * 1024
    new, same = [], []
    try:
        for k in range(1, runs + 1):
            for bucket in (new, same):
                t0 = time.perf_counter()
                c.request("PUT", "/bench/small", body=body, headers={"Fencing-Lock": LOCK, "Fencing-Token": str(k)})
                r = c.getresponse()
                r.read()
                bucket.append((time.perf_counter() - t0) * 1e6)
                if r.status >= 300:
                    raise RuntimeError(f"write with token {k} answered {r.status}")
    finally:
        c.close()
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]
    return {"runs": runs, "new_token_p50_us": med(new), "new_token_p99_us": pct(new, 0.99),
            "same_token_p50_us": med(same), "same_token_p99_us": pct(same, 0.99)}


def replicas(work, store_port, etcd):
    """Issue 15's figures: a new token's first write with 1 and 3 shared-mark replicas (and the single filter with
    its local state file, for reference); PUT c=32 through one of 3 replicas vs the single filter."""
    out = {"first_write": {}, "put_c32": {"single_filter": [], "one_of_3_replicas": []}}
    f, fport, _ = start_filter(work, store_port, ["--lock", LOCK])
    time.sleep(1.2)  # the start-up barrier (--abort-grace 1s)
    out["first_write"]["single_filter"] = raise_latency(fport)
    kill_group(f)
    for n in (1, 3):
        reps = start_replicas(work, store_port, etcd, n, f"/bench/replicas-{n}")
        out["first_write"][f"{n}_replicas"] = raise_latency(reps[0][1])
        for p, _, _ in reps:
            kill_group(p)
    f, fport, _ = start_filter(work, store_port, ["--lock", LOCK])
    reps = start_replicas(work, store_port, etcd, 3, "/bench/replicas-tp")
    time.sleep(1.2)
    fence = {"WRK_FENCE": f"{LOCK}:7", "WRK_BODY": "1024"}
    for port in (fport, reps[0][1]):
        wrk(port, "PUT", 4, 1, fence)  # admit token 7 everywhere first
    calls = []
    for _ in range(ROUNDS):
        for name, port in (("single_filter", fport), ("one_of_3_replicas", reps[0][1])):
            before = etcd_calls(etcd)
            r = wrk(port, "PUT", 32, SECONDS, fence)
            if name != "single_filter":
                calls.append(etcd_calls(etcd) - before)
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            out["put_c32"][name].append(r)
    out["etcd_calls_during_steady_writes"] = calls
    for p in [f] + [p for p, _, _ in reps]:
        kill_group(p)
    return out


def profile(work, store_port, etcd):
    if not shutil.which("perf"):
        return ["perf missing: no profile (bench/run.sh installs it)"]
    f, fport, fadmin = start_filter(work, store_port, ["--lock", LOCK])
    sc, sport, sadmin = start_sidecar(work, etcd, "prof", fport, fadmin)
    wait_holding(sadmin)
    data = os.path.join(work, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-F", "499", "-e", "cpu-clock", "-g", "-o", data,
                            "-p", f"{sc.pid},{f.pid}", "--", "sleep", str(SECONDS)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wrk(sport, "PUT", 32, SECONDS)
    rec.wait(timeout=SECONDS + 30)
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
                          "--percent-limit", "0.7"], capture_output=True, text=True, timeout=120)
    kill_group(sc)
    kill_group(f)
    lines = [re.sub(r"\s+-\s+-\s*$", "", l).rstrip() for l in rep.stdout.splitlines()
             if l.strip() and not l.startswith("#") and "%" in l.split()[0]]
    return lines[:45]


def main():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release (bench/run.sh does)")
    os.makedirs(OUT, exist_ok=True)
    run_in("fg-bench-", measure)


def measure(work):
    started = time.time()
    try:
        store, store_port, data = start_store(work)
        etcd = start_etcd(work)
        if os.environ.get("BENCH_ONLY") == "failover":
            runs = int(os.environ.get("BENCH_FAILOVER_RUNS", "5"))
            for verify in (False, True):
                print(f"failover (TTL 2s), verification {'on' if verify else 'off'}", flush=True)
                fo = failover(work, store_port, etcd, runs=runs, verify=verify)
                print(json.dumps({k: {"median": med(v), "max": max(v)} for k, v in fo.items()}), flush=True)
            return
        only = os.environ.get("BENCH_ONLY")
        if only in ("replicas", "many_locks"):
            # Runs only that part and puts its figures into the last bench.json (then bench.md is rewritten).
            part = replicas(work, store_port, etcd) if only == "replicas" else many_locks(work, store_port)
            path = os.path.join(OUT, "bench.json")
            with open(path) as fh:
                result = json.load(fh)
            result[only] = part
            rp = part
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
            with open(os.path.join(OUT, "bench.md"), "w") as fh:
                fh.write(report(result))
            print(json.dumps(rp, indent=1))
            return
        print(f"throughput and latency: {ROUNDS} rounds x {SECONDS}s per case", flush=True)
        raw, rss, rss_each, idle_rss, open_loop = throughput(work, store_port, etcd)
        draw_latency(open_loop, os.path.join(OUT, "latency.png"))
        print("failover (TTL 2s)", flush=True)
        fo = failover(work, store_port, etcd)
        print("failover (TTL 2s), the filter verifying raises with etcd", flush=True)
        fo_v = failover(work, store_port, etcd, verify=True)
        print("filter with 100k locks", flush=True)
        ml = many_locks(work, store_port)
        inproc = json.loads(subprocess.run([os.path.join(ROOT, "target/release/examples/admission_bench")],
                                           capture_output=True, text=True, timeout=300).stdout.strip().splitlines()[-1])
        print("filter replicas sharing marks through etcd", flush=True)
        rp = replicas(work, store_port, etcd)
        print("profile", flush=True)
        prof = profile(work, store_port, etcd)
    finally:
        stop_all()
    summary = {}
    for name, cases in raw.items():
        summary[name] = {}
        for case, runs in cases.items():
            summary[name][case] = {k: med([r[k] for r in runs]) for k in ("rps", "p50_us", "p99_us", "p999_us", "cpu_us_per_req", "user_us_per_req")}
            summary[name][case]["errors"] = sum(r["socket_errors"] + r["status_errors"] for r in runs)
    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "settings": {"seconds_per_case": SECONDS, "rounds": ROUNDS, "ttl": TTL, "workers": WORKERS,
                     "sidecar_workers": SIDECAR_WORKERS,
                     "fencegate_build": BUILD, "fencegate_bin": BIN},
        "summary": summary, "peak_rss_kib": rss, "peak_rss_kib_fencegate": rss_each, "sidecar_idle_rss_kib": idle_rss,
        "failover_ms": {k: {"runs": v, "median": med(v), "max": max(v)} for k, v in fo.items()},
        "failover_verified_ms": {k: {"runs": v, "median": med(v), "max": max(v)} for k, v in fo_v.items()},
        "open_loop": open_loop, "many_locks": ml, "replicas": rp, "admission_in_process": inproc, "profile_top": prof, "raw": raw,
        "elapsed_s": time.time() - started,
    }
    with open(os.path.join(OUT, "bench.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    md = report(result)
    with open(os.path.join(OUT, "bench.md"), "w") as fh:
        fh.write(md)
    print(md)


def fencegate_build_line(settings, with_plain):
    build = settings.get("fencegate_build", "plain")
    line = f"fencegate: the {build} build" if build else f"fencegate: `{settings.get('fencegate_bin')}`"
    if build and build.startswith("profile-guided"):
        line += " (`scripts/pgo-build.sh`)"
    if with_plain:
        line += "; fencegate-plain: `cargo build --release`, two hops only"
    return line + ".\n"


def report(r):
    s = r["summary"]
    out = [f"# fencegate benchmark\n",
           f"{r['machine']['cpus']} CPUs, {r['settings']['rounds']} rounds x {r['settings']['seconds_per_case']} s per case, "
           "medians. wrk, keep-alive connections, loopback. Ratios are to nginx's two hops in the same run.\n",
           f"Workers per hop: nginx and HAProxy {r['settings'].get('workers', 2)}, fencegate's filter "
           f"{r['settings'].get('workers', 2)} event loops, its sidecar {r['settings'].get('sidecar_workers', 1)}.\n",
           fencegate_build_line(r["settings"], "fencegate-plain" in s),
           "| case | path | req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | CPU µs/req (both hops) | of it user | req/s vs nginx | p99 vs nginx |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in s["direct"]:
        d, n = s["direct"][case], s["nginx"][case]
        for path in ("direct", "fencegate", "fencegate-plain", "nginx", "haproxy"):
            if path not in s:
                continue
            x = s[path][case]
            added50 = x["p50_us"] - d["p50_us"]
            added99 = x["p99_us"] - d["p99_us"]
            cpu = f"{x['cpu_us_per_req']:.1f}" if x["cpu_us_per_req"] else "-"
            user = f"{x['user_us_per_req']:.1f}" if x.get("user_us_per_req") else "-"
            out.append(f"| {case} | {path} | {x['rps']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | {x['p999_us']:.0f} | "
                       f"{added50:.0f} | {added99:.0f} | {cpu} | {user} | {x['rps'] / n['rps']:.2f} | "
                       f"{x['p99_us'] / max(n['p99_us'], 1):.2f} |")
    out.append("\n## One hop each (ratios to the nginx hop doing the same job)\n")
    out.append("| case | hop | req/s | p50 µs | p99 µs | CPU µs/req | req/s vs nginx hop | p99 vs nginx hop | CPU vs nginx hop |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in s["direct"]:
        for mine, theirs in (("sidecar-1hop", "nginx-1hop-headers"), ("filter-1hop", "nginx-1hop")):
            if mine not in s:
                continue
            m, t = s[mine][case], s[theirs][case]
            for name, x in ((mine, m), (theirs, t)):
                cpu = f"{x['cpu_us_per_req']:.1f}" if x["cpu_us_per_req"] else "-"
                cpu_ratio = (f"{x['cpu_us_per_req'] / t['cpu_us_per_req']:.2f}"
                             if x["cpu_us_per_req"] and t["cpu_us_per_req"] else "-")
                out.append(f"| {case} | {name} | {x['rps']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | {cpu} | "
                           f"{x['rps'] / t['rps']:.2f} | {x['p99_us'] / max(t['p99_us'], 1):.2f} | {cpu_ratio} |")
    if r.get("open_loop"):
        ol = r["open_loop"]
        out.append(f"\n## Open loop: GET at fixed rates (h2load --rps, {OPEN_LOOP_CONNS} connections; "
                   f"fractions of nginx's best closed-loop rate, {ol['nginx_best_rps']:.0f} req/s)\n")
        out.append("![latency](latency.png)\n")
        out.append("| offered | path | req/s offered | p50 µs | p99 µs | p99.9 µs | errors |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        fracs = sorted(next(iter(ol["paths"].values())))
        for fr in fracs:
            for name, runs in ol["paths"].items():
                x = runs[fr]
                out.append(f"| {float(fr):.0%} | {name} | {x['offered_rps']} | {x['p50_us']} | {x['p99_us']} | "
                           f"{x['p999_us']} | {x['errors']} |")
    out.append("\n## Memory (peak RSS, KiB, both hops)\n")
    for k, v in r["peak_rss_kib"].items():
        out.append(f"- {k}: {v}")
    for k, v in r["peak_rss_kib_fencegate"].items():
        out.append(f"- {k} alone: {v}")
    out.append(f"- fencegate sidecar idle: {r['sidecar_idle_rss_kib']}")
    fo = r["failover_ms"]
    out.append(f"\n## Failover (TTL {r['settings']['ttl']})\n")
    out.append(f"- kill -9 of the holder -> first write admitted for the new holder: median {fo['kill9_ms']['median']:.0f} ms, "
               f"max {fo['kill9_ms']['max']:.0f} ms ({', '.join(f'{x:.0f}' for x in fo['kill9_ms']['runs'])})")
    out.append(f"- SIGTERM (graceful handoff): median {fo['sigterm_ms']['median']:.0f} ms, max {fo['sigterm_ms']['max']:.0f} ms "
               f"({', '.join(f'{x:.0f}' for x in fo['sigterm_ms']['runs'])})")
    fv = r.get("failover_verified_ms")
    if fv:
        out.append("- with the filter verifying raises with etcd (`--etcd`): "
                   f"kill -9 median {fv['kill9_ms']['median']:.0f} ms, max {fv['kill9_ms']['max']:.0f} ms; "
                   f"SIGTERM median {fv['sigterm_ms']['median']:.0f} ms, max {fv['sigterm_ms']['max']:.0f} ms")
    ml = r["many_locks"]
    out.append(f"\n## The filter with {ml['locks']} locks\n")
    out.append(f"- locks with durable records: {ml['locks_known']}; RSS with rules only {ml['rss_kib_rules_only']} KiB, "
               f"with every lock touched {ml['rss_kib_with_locks']} KiB ({ml['bytes_per_lock']:.0f} bytes per lock)")
    out.append(f"- PUT c=32 straight to the filter: {ml['put_c32_spread_over_locks']['rps']:.0f} req/s spread over all locks "
               f"(p99 {ml['put_c32_spread_over_locks']['p99_us']} µs) vs {ml['put_c32_one_lock']['rps']:.0f} req/s on one lock "
               f"and one path (p99 {ml['put_c32_one_lock']['p99_us']} µs)")
    same = ml.get("put_c32_one_lock_same_paths")
    if same:
        sp = ml["put_c32_spread_over_locks"]["rps"]
        out.append(f"- the same {ml['locks']} paths under one lock (the store doing the same work): {same['rps']:.0f} req/s "
                   f"(p99 {same['p99_us']} µs); spread over all locks at {sp / same['rps']:.2f}x that "
                   f"({ROUNDS} alternating rounds, medians)")
    if "filter_cpu_us_per_req" in ml["put_c32_spread_over_locks"]:
        fig = lambda case, k: med([x[k] for x in ml["runs"][case]])
        each = [f"{fig(c, 'filter_cpu_us_per_req'):.1f} ({fig(c, 'filter_user_us_per_req'):.1f} user) {what}"
                for c, what in (("spread", "spread over all locks"), ("one_lock_one_path", "on one lock and one path"),
                                ("one_lock_same_paths", "the same paths under one lock"))]
        out.append(f"- the filter's own CPU per PUT, µs (medians): {'; '.join(each)}")
    rp = r.get("replicas")
    if rp:
        out.append("\n## Filter replicas sharing marks through etcd (`--shared-marks`)\n")
        out.append("A write carrying a new token (the raise: CAS in etcd, then every replica's acknowledgement, then the "
                   "forward) next to a write with a token already admitted, one kept-alive connection, 1 KiB PUTs:\n")
        out.append("| filters | new token p50 µs | new token p99 µs | same token p50 µs | added by the raise p50 µs |")
        out.append("|---|---:|---:|---:|---:|")
        for name, x in rp["first_write"].items():
            out.append(f"| {name.replace('_', ' ').replace('1 replicas', '1 replica')} | {x['new_token_p50_us']:.0f} | {x['new_token_p99_us']:.0f} | "
                       f"{x['same_token_p50_us']:.0f} | {x['new_token_p50_us'] - x['same_token_p50_us']:.0f} |")
        tp = {k: med([x["rps"] for x in v]) for k, v in rp["put_c32"].items()}
        out.append(f"\nPUT 1 KiB, 32 connections, straight to the filter: one of 3 replicas {tp['one_of_3_replicas']:.0f} "
                   f"req/s vs the single filter {tp['single_filter']:.0f} req/s "
                   f"({tp['one_of_3_replicas'] / tp['single_filter']:.2f}x); etcd Txn/Range/Put calls during the "
                   f"replica's steady writes: {rp['etcd_calls_during_steady_writes']}.")
    ip = r["admission_in_process"]
    out.append("")
    out.append(f"- admission alone, in process: {ip['ns_per_write_one_lock']:.0f} ns per write on one lock, "
               f"{ip['ns_per_write_many_locks']:.0f} ns spread over {ip['locks']} locks; {ip['bytes_per_lock']:.0f} bytes per lock")
    if "ns_per_match_many_rules" in ip:
        out.append(f"- matching a write's path against the rules, in process: {ip['ns_per_match_one_rule']:.0f} ns with one "
                   f"rule, {ip['ns_per_match_many_rules']:.0f} ns spread over {ip['locks']} rules; "
                   f"{ip['bytes_per_rule']:.0f} bytes per rule")
    if "ns_per_write_via_rules_many" in ip:
        out.append(f"- both, as a write does them (its path's rule, the rule's lock entry, admission), in process: "
                   f"{ip['ns_per_write_via_rules_one']:.0f} ns with one rule, {ip['ns_per_write_via_rules_many']:.0f} ns "
                   f"spread over {ip['locks']} rules and locks")
    out.append("\n## Where fencegate's time goes (perf, cpu-clock samples, sidecar + filter, PUT c=32)\n")
    out.append("```")
    out.extend(re.sub(r"\s+-\s+-\s*$", "", l).rstrip() for l in r["profile_top"])
    out.append("```")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--report-only"]:
        # Rewrite bench.md from the last bench.json.
        with open(os.path.join(OUT, "bench.json")) as fh:
            md = report(json.load(fh))
        with open(os.path.join(OUT, "bench.md"), "w") as fh:
            fh.write(md)
        print(md)
    else:
        main()
