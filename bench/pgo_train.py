#!/usr/bin/env python3
"""The training run of a profile-guided build (scripts/pgo-build.sh): traffic through an instrumented fencegate.

The compiler lays out and inlines the optimised build by the branch and call counts this run records, so the run
takes the paths users' traffic takes. It includes the benchmark's own cases (so the bench shows the profiled build
at its best on them) and more:
  * app -> sidecar -> filter -> store, HTTP/1.1 kept-alive at 1 and 32 connections, GETs and 1 KiB PUTs; GETs on a
    new connection each; the same over h2c;
  * a filter with `--store s3` (path-style object GETs and PUTs, the S3 routing) behind a second sidecar;
  * the WebDAV methods that name a second path (COPY, MOVE with `Destination`), DELETE and MKCOL, a few hundred each;
  * a stale token refused at the filter, and an app's own fencing headers, which the sidecar strips;
  * the filter's other modes: `--protect-file` rules with writes spread over a thousand locks (the bench's 100k-locks
    case), two replicas sharing marks through etcd (`--shared-marks`: new tokens raised, then steady writes), and a
    filter verifying its sidecar's raise with etcd (`--etcd`).
Functions this run never enters are laid out as cold code: still correct, but not tuned (TLS to etcd, the injector,
the demo). Any request that fails, or any answer other than the expected one, stops the run: a profile of error paths
would tune the wrong code.

Every fencegate process is stopped with SIGTERM and must exit 0: the profile is written when the process exits, so a
killed process records nothing. Usage (the binary must be built with -Cprofile-generate=DIR):
  BENCH_BIN=target/pgo/gen/<host triple>/release/fencegate python3 bench/pgo_train.py
PGO_TRAIN_SECONDS (default 3) per wrk or h2load case.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import http.client as httpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SECONDS = int(os.environ.get("PGO_TRAIN_SECONDS", "3"))


def expect(what, ok):
    if not ok:
        sys.exit(f"training: {what} went wrong; no profile is built from it")


def wrk(port, method, conns, env=None, what=None):
    """wrk for SECONDS (env as for bench/wrk.lua); no failed request allowed."""
    r = bench.wrk(port, method, conns, SECONDS, env, path="/bench/small" if method == "GET" else "/bench/put")
    errors = r["socket_errors"] + r["status_errors"]
    what = what or f"{method} c={conns}"
    print(f"  {what}: {r['requests']} requests, {errors} errors", flush=True)
    expect(f"wrk {what}", r["requests"] > 0 and errors == 0)


def closed_loop(port):
    for method in ("GET", "PUT"):
        for conns in (1, 32):
            wrk(port, method, conns)


def h2c(port, method, work):
    args = ["h2load", "-c", "4", "-m", "8", "-D", str(SECONDS)]
    if method == "PUT":
        body = os.path.join(work, "body-1k")
        with open(body, "wb") as fh:
            fh.write(b"x" * 1024)
        args += ["-d", body, "-H", ":method: PUT"]
    path = "/bench/small" if method == "GET" else "/bench/put"
    out = subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         timeout=SECONDS + 60)
    done = [line.strip() for line in out.stdout.splitlines() if line.startswith("requests:")]
    print(f"  h2c {method}: {done[0] if done else out.stdout[-300:]}", flush=True)
    # "requests: N total, N started, N done, N succeeded, 0 failed, 0 errored, 0 timeout"
    words = done[0].replace(",", "").split() if done else []
    counts = {words[i + 1]: int(words[i]) for i in range(1, len(words) - 1, 2)} if words else {}
    expect(f"h2c {method}", counts.get("succeeded", 0) > 0 and counts.get("succeeded") == counts.get("total"))


def dav(port, n=300):
    """COPY, MOVE, DELETE and MKCOL through one kept-alive connection; the answers' codes, counted."""
    c = httpc.HTTPConnection("127.0.0.1", port, timeout=10)
    codes = {}
    try:
        for i in range(n):
            for method, path, headers in (
                    ("PUT", f"/bench/d/{i}", {}),
                    ("COPY", f"/bench/d/{i}", {"Destination": f"/bench/d/{i}.copy"}),
                    ("MOVE", f"/bench/d/{i}.copy", {"Destination": f"/bench/d/{i}.moved"}),
                    ("DELETE", f"/bench/d/{i}.moved", {}),
                    ("MKCOL", f"/bench/c{i}/", {})):
                c.request(method, path, body=b"y" * 64 if method == "PUT" else None, headers=headers)
                r = c.getresponse()
                r.read()
                codes[r.status] = codes.get(r.status, 0) + 1
    finally:
        c.close()
    print(f"  WebDAV methods: answers {dict(sorted(codes.items()))}", flush=True)
    expect("WebDAV methods", set(codes) <= {201, 204})


def refusals(sidecar_port, filter_port, n=300):
    """Stale tokens at the filter (409), and the app's own fencing headers at the sidecar (stripped; its own sent).
    A connection each: after refusing a write on its head, fencegate may close the connection before its body."""
    for port, headers, want in ((filter_port, {"Fencing-Lock": "bench", "Fencing-Token": "1"}, {409}),
                                (sidecar_port, {"Fencing-Lock": "another", "Fencing-Token": "999"}, {201, 204})):
        codes = {}
        for _ in range(n):
            status, _ = bench.call("PUT", port, "/bench/put", body=b"z" * 64, headers=headers, timeout=10)
            codes[status] = codes.get(status, 0) + 1
        print(f"  refusals: answers {dict(sorted(codes.items()))}", flush=True)
        expect("the refusals", set(codes) <= want)


def filter_modes(work, store_port, etcd):
    """The filter's modes beside the plain one. Returns the fencegate processes, to be stopped with the others."""
    procs = []
    rules = os.path.join(work, "rules.txt")
    with open(rules, "w") as fh:
        fh.writelines(f"/k/{i}/=lock{i}\n" for i in range(1000))
    f, fport, _ = bench.start_filter(work, store_port, ["--protect-file", rules])
    procs.append(f)
    time.sleep(1.2)  # writes wait out the start-up barrier (--abort-grace, 1 s): train the pass, not the wait
    print("--protect-file, writes spread over 1000 locks", flush=True)
    wrk(fport, "PUT", 32, {"WRK_LOCKS": "1000", "WRK_BODY": "1024"}, "spread PUT c=32")
    wrk(fport, "PUT", 32, {"WRK_LOCKS": "1", "WRK_BODY": "1024"}, "one lock PUT c=32")
    print("--shared-marks, two replicas", flush=True)
    reps = bench.start_replicas(work, store_port, etcd, 2, "/pgo/replicas")
    procs += [p for p, _, _ in reps]
    lat = bench.raise_latency(reps[0][1], runs=40)  # raises and refuses nothing: fails on any answer >= 300
    print(f"  40 raises: new token p50 {lat['new_token_p50_us']:.0f} us", flush=True)
    for _, port, _ in reps:
        wrk(port, "PUT", 32, {"WRK_FENCE": f"{bench.LOCK}:40", "WRK_BODY": "1024"}, "steady PUT c=32")
    print("--etcd (the filter verifying raises)", flush=True)
    vport, _, verified = bench.start_pair(work, store_port, etcd, "bench-verify", ["--etcd", etcd])
    procs += verified
    wrk(vport, "PUT", 32)
    return procs


def main():
    # A SIGTERM or SIGHUP (timeout, a closed terminal) unwinds through the `finally` below like Ctrl-C does, so the
    # parts are stopped then too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="fg-pgo-train-")
    os.chmod(work, 0o755)
    stopped, data, ok = [], None, False
    try:
        _, store_port, data = bench.start_store(work)
        etcd = bench.start_etcd(work)
        sport, fport, plain = bench.start_pair(work, store_port, etcd, "bench", ["--store", "plain"])
        print("plain store, HTTP/1.1", flush=True)
        closed_loop(sport)
        wrk(sport, "GET", 8, {"WRK_CLOSE": "1"}, "GET c=8 (a new connection each)")
        print("plain store, h2c", flush=True)
        for method in ("GET", "PUT"):
            h2c(sport, method, work)
        dav(sport)
        refusals(sport, fport)
        s3port, _, s3 = bench.start_pair(work, store_port, etcd, "bench-s3", ["--store", "s3"])
        print("--store s3, HTTP/1.1", flush=True)
        closed_loop(s3port)
        modes = filter_modes(work, store_port, etcd)
        for p in plain + s3 + modes:
            os.kill(p.pid, signal.SIGTERM)
        for p in plain + s3 + modes:
            rc = p.wait(timeout=60)
            stopped.append(p)
            if rc != 0:
                sys.exit(f"a fencegate process exited {rc}: its profile may not be written")
        ok = True
    finally:
        bench.stop_all()
        if data:
            shutil.rmtree(data, ignore_errors=True)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"training failed: the parts' logs are in {work}", file=sys.stderr, flush=True)
    print(f"training done: {len(stopped)} fencegate processes exited 0", flush=True)


if __name__ == "__main__":
    main()
