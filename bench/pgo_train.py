#!/usr/bin/env python3
"""The training run of a profile-guided build (scripts/pgo-build.sh): traffic through an instrumented fencegate.

The compiler lays out and inlines the optimised build by the branch and call counts this run records, so the run
takes the paths users' traffic takes, not the benchmark's cases alone:
  * app -> sidecar -> filter -> store, HTTP/1.1 kept-alive at 1 and 32 connections, GETs and 1 KiB PUTs; GETs on a
    new connection each; the same over h2c;
  * a filter with `--store s3` (path-style object GETs and PUTs, the S3 routing) behind a second sidecar;
  * the WebDAV methods that name a second path (COPY, MOVE with `Destination`), DELETE and MKCOL, a few hundred each;
  * a stale token refused at the filter, and an app's own fencing headers, which the sidecar strips.
Functions this run never enters are laid out as cold code: still correct, but not tuned.

Every fencegate process is stopped with SIGTERM and must exit 0: the profile is written when the process exits, so a
killed process records nothing. Usage (the binary must be built with -Cprofile-generate=DIR):
  BENCH_BIN=target/pgo-gen/.../fencegate python3 bench/pgo_train.py
PGO_TRAIN_SECONDS (default 3) per wrk or h2load case.
"""
import os
import signal
import subprocess
import sys
import tempfile
import http.client as httpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SECONDS = int(os.environ.get("PGO_TRAIN_SECONDS", "3"))


def pair(work, etcd, store_port, name, store):
    """A filter (`--store store`) and a sidecar in front of it, holding lock `name`."""
    f, fport, fadmin = bench.start_filter(work, store_port, ["--lock", name, "--store", store])
    sc, sport, sadmin = bench.start_sidecar(work, etcd, f"pgo-{name}", fport, fadmin, lock=name)
    bench.wait_holding(sadmin, 30)
    return [sc, f], sport, fport


def closed_loop(port):
    for method in ("GET", "PUT"):
        for conns in (1, 32):
            r = bench.wrk(port, method, conns, SECONDS, path="/bench/small" if method == "GET" else "/bench/put")
            print(f"  {method} c={conns}: {r['requests']} requests, {r['socket_errors'] + r['status_errors']} errors",
                  flush=True)


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


def refusals(sidecar_port, filter_port, n=300):
    """Stale tokens at the filter (409), and the app's own fencing headers at the sidecar (stripped; its own sent).
    A connection each: after refusing a write on its head, fencegate may close the connection before its body."""
    codes = {}
    for port, headers in ((filter_port, {"Fencing-Lock": "bench", "Fencing-Token": "1"}),
                          (sidecar_port, {"Fencing-Lock": "another", "Fencing-Token": "999"})):
        for _ in range(n):
            status, _ = bench.call("PUT", port, "/bench/put", body=b"z" * 64, headers=headers, timeout=10)
            codes[status] = codes.get(status, 0) + 1
    print(f"  refusals: answers {dict(sorted(codes.items()))}", flush=True)


def main():
    work = tempfile.mkdtemp(prefix="fg-pgo-train-")
    os.chmod(work, 0o755)
    stopped = []
    try:
        _, store_port, _ = bench.start_store(work)
        etcd = bench.start_etcd(work)
        plain, sport, fport = pair(work, etcd, store_port, "bench", "plain")
        print("plain store, HTTP/1.1", flush=True)
        closed_loop(sport)
        r = bench.wrk(sport, "GET", 8, SECONDS, {"WRK_CLOSE": "1"})
        print(f"  GET, a new connection each: {r['requests']} requests", flush=True)
        print("plain store, h2c", flush=True)
        for method in ("GET", "PUT"):
            h2c(sport, method, work)
        dav(sport)
        refusals(sport, fport)
        s3, s3port, _ = pair(work, etcd, store_port, "bench-s3", "s3")
        print("--store s3, HTTP/1.1", flush=True)
        closed_loop(s3port)
        for p in plain + s3:
            os.kill(p.pid, signal.SIGTERM)
        for p in plain + s3:
            rc = p.wait(timeout=60)
            stopped.append(p)
            if rc != 0:
                sys.exit(f"a fencegate process exited {rc}: its profile may not be written (logs in {work})")
    finally:
        bench.stop_all()
    print(f"training done: {len(stopped)} fencegate processes exited 0", flush=True)


if __name__ == "__main__":
    main()
