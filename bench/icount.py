#!/usr/bin/env python3
"""Instructions per request of fencegate's sidecar and filter, counted by callgrind.

Wall-clock figures on a shared machine are noise; instruction counts are not. This starts the nginx store, etcd, the
filter and the sidecar (both under `valgrind --tool=callgrind`), warms up, zeroes the counters, sends exactly N requests
per case with h2load (HTTP/1.1, keep-alive) through app -> sidecar -> filter -> store, dumps the counters and prints
instructions per request for each process.
  python3 bench/icount.py                      # target/release/fencegate
  FG_BIN=/tmp/fencegate-old python3 bench/icount.py   # another build, for a before/after
  python3 bench/icount.py --nginx              # nginx's two hops (the bench's configuration), single-process
  python3 bench/icount.py --many-locks         # the filter alone, PUTs spread over 100k locks against the same
                                               # paths under one lock (the bench's 100k-locks case), with
                                               # callgrind's cache simulation: instructions, L1 and last-level misses
ICOUNT_FILTER_ARGS adds flags to the filter's command line (`{etcd}` in them is etcd's address), e.g. a replica
sharing marks: ICOUNT_FILTER_ARGS='--etcd {etcd} --trust-tokens --shared-marks --replica-id r0'.
ICOUNT_N (default 2000) requests per case; then GETs on a new connection each (wrk, `Connection: close`) for
ICOUNT_CLOSE_SECONDS (default 3), divided by the requests wrk made. ICOUNT_PROFILE=1 writes the dumps with full names, so that
`callgrind_annotate <work>/cg-filter.out.1` (one dump per case, in CASES' order) shows where each hop's instructions go;
the work folder is printed at the end. With --many-locks it also prints, for each case, the ten functions with the most
last-level misses of their own per request (parsed here: callgrind_annotate 3.19 put all of these dumps' cost under
`__libc_start_main`).
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

BIN = os.environ.get("FG_BIN", bench.BIN)
N = int(os.environ.get("ICOUNT_N", "2000"))
CASES = [("GET", 1), ("PUT", 1), ("GET", 8), ("PUT", 8)]
CLOSE_SECONDS = int(os.environ.get("ICOUNT_CLOSE_SECONDS", "3"))
# ICOUNT_CACHE=1: callgrind's cache simulation as well (slower), and each case's first-level instruction and data
# cache misses per request printed beside the instructions: how much of the hop's code and data stays in cache.
CACHE = bool(os.environ.get("ICOUNT_CACHE"))


def under_callgrind(name, args, work, env, cache=CACHE):
    out = os.path.join(work, f"cg-{name}.out")
    full = ["--compress-strings=no", "--compress-pos=no"] if os.environ.get("ICOUNT_PROFILE") else []
    # The last level simulated is a 2 MiB L2 (ICOUNT_LL=size,ways,line to change it): a server's L3 (480 MiB on the
    # machine this was tuned on) holds every lock's state, so what costs is what misses the core's own L2.
    sim = ["--cache-sim=yes", f"--LL={os.environ.get('ICOUNT_LL', '2097152,16,64')}"] if cache else []
    p = bench.start(name, ["valgrind", "--tool=callgrind", *full, *sim, f"--callgrind-out-file={out}", *args], work,
                    env)
    return p, out


def control(opt, pid):
    subprocess.run(["callgrind_control", opt, str(pid)], check=True, capture_output=True, timeout=120)


def newest_dump(prefix):
    """The newest of callgrind's dumps named prefix.N."""
    return max(glob.glob(prefix + ".*"), key=os.path.getmtime)


def events(prefix):
    """Every event's total in the newest dump of prefix: {"Ir": instructions, ...; with the cache simulation also
    "D1mr"/"D1mw", first-level data cache read/write misses, "DLmr"/"DLmw", last-level ones}."""
    newest = newest_dump(prefix)
    names = ["Ir"]
    with open(newest) as f:
        for line in f:
            if line.startswith("events:"):
                names = line.split()[1:]
            if line.startswith(("totals:", "summary:")):
                return dict(zip(names, (int(x) for x in line.split()[1:])))
    raise RuntimeError(f"no totals in {newest}")


def self_costs(prefix):
    """Each function's own events (not its callees') in the newest dump of prefix: {name: {"Ir": ..., ...}}. Needs
    the dump's names uncompressed (ICOUNT_PROFILE=1). A call's lines (`calls=` and the line after it) are its
    callee's inclusive cost, so they are skipped; a cost line may leave trailing zero events out."""
    names, fn, skip, costs = ["Ir"], None, False, {}
    with open(newest_dump(prefix)) as f:
        for line in f:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("calls="):
                skip = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip:
                    skip = False
                    continue
                mine = costs.setdefault(fn, [0] * len(names))
                for i, v in enumerate(line.split()[1:]):
                    mine[i] += int(v)
    return {fn: dict(zip(names, v)) for fn, v in costs.items()}


def print_top(prefix, requests, keys, n=10):
    """The n functions with the most of keys' events summed, per request (ICOUNT_PROFILE=1)."""
    costs = self_costs(prefix)
    top = sorted(costs.items(), key=lambda kv: -sum(kv[1].get(k, 0) for k in keys))[:n]
    for fn, ev in top:
        figures = "  ".join(f"{k} {ev.get(k, 0) / requests:6.2f}" for k in keys)
        print(f"    {figures}  {fn[:110]}")


def totals(prefix):
    """Total instructions in the newest dump of prefix."""
    return events(prefix)["Ir"]


def h2load(port, method, conns, n, work, headers=()):
    args = ["h2load", "--h1", "-n", str(n), "-c", str(conns), "-m", "1", "-T", "120", "-N", "120"]
    if method == "PUT":
        body = os.path.join(work, "body-1k")
        with open(body, "wb") as f:
            f.write(b"x" * 1024)
        args += ["-d", body, "-H", ":method: PUT"]
    for h in headers:
        args += ["-H", h]
    path = "/bench/small" if method == "GET" else "/bench/put"
    out = subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=900)
    ok = [l for l in out.stdout.splitlines() if "status codes:" in l or l.startswith("requests:")]
    return ok


def nginx_under_callgrind(work, name, upstream, add_headers):
    """One of the bench's nginx proxy hops, as a single process (`master_process off`) under callgrind."""
    port = bench.free_port()
    hdrs = f"proxy_set_header Fencing-Lock {bench.LOCK}; proxy_set_header Fencing-Token 1;" if add_headers else ""
    d = bench.nginx_conf(work, name, port, f"""upstream up {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{ listen 127.0.0.1:{port}; client_max_body_size 0;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; {hdrs}
      proxy_request_buffering off; proxy_buffering off; }} }}""")
    p, out = under_callgrind(name, ["nginx", "-c", f"{d}/nginx.conf", "-p", d, "-e", f"{d}/error.log",
                                    "-g", "master_process off;"], work, None)
    bench.wait_port(port, 60)
    return p, out, port


def print_misses(case, procs, n):
    if not CACHE:
        return
    for name, _, out in procs:
        e = events(out)
        print(f"  {case} {name}: L1 instruction misses {e['I1mr'] / n:.0f}, L1 data misses "
              f"{(e['D1mr'] + e['D1mw']) / n:.0f} per request", flush=True)


def measure(front_port, procs, work):
    """Instructions per request of each (name, proc, callgrind out) for every case, through front_port."""
    res = {}
    for method, conns in CASES:
        h2load(front_port, method, conns, 100, work)  # warm-up: connections open, paths taken once
        for _, p, _ in procs:
            control("-z", p.pid)
        t0 = time.time()
        summary = h2load(front_port, method, conns, N, work)
        for _, p, _ in procs:
            control("-d", p.pid)
        time.sleep(0.5)
        case = f"{method} c={conns}"
        res[case] = {name: totals(out) / N for name, _, out in procs}
        figures = "  ".join(f"{name} {v:9.0f}" for name, v in res[case].items())
        print(f"{case:9} {figures}  instr/req ({time.time() - t0:.0f}s; {' | '.join(x.strip() for x in summary)})",
              flush=True)
        print_misses(case, procs, N)
    # A new connection per request (`Connection: close`, wrk connecting again): what a connection costs. wrk runs
    # for a time, not a count, so this divides by the requests it reports.
    case = "GET c=8 new conn"
    bench.wrk(front_port, "GET", 8, 1, {"WRK_CLOSE": "1"})
    for _, p, _ in procs:
        control("-z", p.pid)
    done = bench.wrk(front_port, "GET", 8, CLOSE_SECONDS, {"WRK_CLOSE": "1"})
    for _, p, _ in procs:
        control("-d", p.pid)
    time.sleep(0.5)
    n = max(done["requests"], 1)
    res[case] = {name: totals(out) / n for name, _, out in procs}
    figures = "  ".join(f"{name} {v:9.0f}" for name, v in res[case].items())
    print_misses(case, procs, n)
    print(f"{case} {figures}  instr/req ({n} requests, {done['socket_errors'] + done['status_errors']} errors)",
          flush=True)
    return res


def main_nginx(work):
    """The same cases through nginx's two hops (the bench's configuration), for a like-for-like target."""
    try:
        _, store_port, _ = bench.start_store(work)
        h2, h2out, h2port = nginx_under_callgrind(work, "nginx-hop2", store_port, False)
        h1, h1out, h1port = nginx_under_callgrind(work, "nginx-hop1", h2port, True)
        res = measure(h1port, [("hop1", h1, h1out), ("hop2", h2, h2out)], work)
    finally:
        bench.stop_all()
    print(json.dumps(res))


def main_many_locks(work):
    """The filter alone (one event loop): PUTs (1 KiB, 8 connections) spread over ICOUNT_LOCKS (default 100000)
    locks, each with a durable record first, against the same paths all under one lock in a second filter, so that
    the store does the same work and what differs is the filter's per-lock state. Instructions and first-level data
    cache misses per request, and last-level ones (DLmr/DLmw, with a 2 MiB last level, a core's L2; the bench's
    wall-clock ratio for this case moves by ±10% from run to run)."""
    n = int(os.environ.get("ICOUNT_LOCKS", "100000"))
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else work
    res, filters = {}, {}
    try:
        _, store_port, _ = bench.start_store(work)
        rules = os.path.join(work, "rules.txt")
        with open(rules, "w") as fh:
            fh.writelines(f"/k/{i}/=lock{i}\n" for i in range(n))
        env = {"RUST_LOG": "warn", "FENCEGATE_WORKER_THREADS": "1"}
        for name, flags in (("many", ["--protect-file", rules]), ("one", ["--protect", "/k/=lock0"])):
            port, admin = bench.free_port(), bench.free_port()
            state = tempfile.mkdtemp(prefix="fg-icount-state-", dir=shm)
            p, out = under_callgrind(name, [BIN, "filter", "--listen", f"127.0.0.1:{port}", "--admin-listen",
                                            f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{store_port}",
                                            "--state-dir", state, *flags], work, env, cache=True)
            filters[name] = (p, out, port, admin, state)
        for _, _, _, admin, _ in filters.values():
            bench.wait_port(admin, 120)
        time.sleep(2)  # the start-up barrier (--abort-grace)
        _, _, port, admin, _ = filters["many"]
        known = bench.touch_locks(port, admin, n, within=900, step=10)  # slower under callgrind
        if known < n:
            sys.exit(f"only {known} of {n} locks written")
        for case, name, env_ in (("spread over the locks", "many", {"WRK_LOCKS": str(n)}),
                                 ("the same paths, one lock", "one", {"WRK_LOCKS": str(n), "WRK_ONE_LOCK": "1"})):
            p, out, port, _, _ = filters[name]
            bench.wrk(port, "PUT", 8, 2, dict(env_, WRK_BODY="1024"))
            control("-z", p.pid)
            done = bench.wrk(port, "PUT", 8, CLOSE_SECONDS + 2, dict(env_, WRK_BODY="1024"))
            control("-d", p.pid)
            time.sleep(0.5)
            if done["socket_errors"] + done["status_errors"]:
                sys.exit(f"{case}: {done['socket_errors'] + done['status_errors']} errors")
            per = {k: v / max(done["requests"], 1) for k, v in events(out).items() if k in ("Ir", "D1mr", "D1mw", "DLmr", "DLmw")}
            res[case] = per
            print(f"{case:26} " + "  ".join(f"{k} {v:8.0f}" for k, v in per.items()) + f"  per request "
                  f"({done['requests']} requests)", flush=True)
            if os.environ.get("ICOUNT_PROFILE"):
                # Where the last-level misses are: the lock state's, or others' (the allocator's, say).
                print_top(out, max(done["requests"], 1), ("DLmr", "DLmw"))
    finally:
        bench.stop_all()
        for f in filters.values():
            shutil.rmtree(f[4], ignore_errors=True)
    print(json.dumps(res))


def filter_args(etcd):
    return [a.replace("{etcd}", etcd) for a in shlex.split(os.environ.get("ICOUNT_FILTER_ARGS", ""))]


def main(work):
    res = {}
    try:
        _, store_port, _ = bench.start_store(work)
        etcd = bench.start_etcd(work)
        fport, fadmin = bench.free_port(), bench.free_port()
        state = tempfile.mkdtemp(prefix="state-", dir=work)
        env = {"RUST_LOG": "warn", "FENCEGATE_WORKER_THREADS": "1"}
        f, fout = under_callgrind("filter", [BIN, "filter", "--listen", f"127.0.0.1:{fport}", "--admin-listen",
                                             f"127.0.0.1:{fadmin}", "--upstream", f"http://127.0.0.1:{store_port}",
                                             "--state-dir", state, "--lock", bench.LOCK, *filter_args(etcd)],
                                 work, env)
        bench.wait_port(fadmin, 60)
        sport, sadmin = bench.free_port(), bench.free_port()
        sc, sout = under_callgrind("sidecar", [BIN, "sidecar", "--etcd", etcd, "--lock", bench.LOCK, "--holder", "ic",
                                               "--ttl", "20s", "--listen", f"127.0.0.1:{sport}", "--admin-listen",
                                               f"127.0.0.1:{sadmin}", "--upstream", f"http://127.0.0.1:{fport}",
                                               "--fence", f"http://127.0.0.1:{fadmin}"], work, env)
        bench.wait_port(sadmin, 60)
        bench.wait_holding(sadmin, 60)
        res = measure(sport, [("sidecar", sc, sout), ("filter", f, fout)], work)
    finally:
        bench.stop_all()
    print(json.dumps(res))
    if os.environ.get("ICOUNT_PROFILE"):
        print(f"dumps in {work}")


if __name__ == "__main__":
    modes = {"": (main, "fg-icount-"), "--nginx": (main_nginx, "fg-icount-nginx-"),
             "--many-locks": (main_many_locks, "fg-icount-locks-")}
    arg = " ".join(sys.argv[1:])
    if arg not in modes:
        sys.exit(f"usage: {sys.argv[0]} [--nginx | --many-locks]")
    fn, prefix = modes[arg]
    # The work folder holds the dumps: kept when ICOUNT_PROFILE asks for them.
    bench.run_in(prefix, fn, keep=bool(os.environ.get("ICOUNT_PROFILE")))
