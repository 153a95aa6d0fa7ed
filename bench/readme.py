#!/usr/bin/env python3
"""Writes the README's "Where it stands" block from the committed run (bench/results/bench.json).

The block sits between two marker lines in README.md; everything between them is replaced, nothing else is touched.
Each goal's verdict ("met" / "not met") is computed here from the run's figures against issue 16's goals, so the
README cannot claim what the run does not show. bench/run.sh runs this after the bench; by hand:
  python3 bench/readme.py [bench.json] [README.md]
"""
import json
import math
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN = "<!-- bench-table:begin (written by bench/readme.py from bench/results/bench.json; edit that script) -->"
END = "<!-- bench-table:end -->"
CASES = ("GET c=1", "GET c=32", "PUT c=1", "PUT c=32", "GET c=8 new conn")
# The cases issue 16's req/s, latency and CPU goals name; the new-connection case is reported beside them.
GOAL_CASES = CASES[:4]
LABEL = {"GET c=1": "GET, 1 conn", "GET c=32": "GET, 32 conns", "PUT c=1": "PUT 1 KiB, 1 conn",
         "PUT c=32": "PUT 1 KiB, 32 conns", "GET c=8 new conn": "GET, 8 conns, a new one per request"}


def ratios(s, key, cases=GOAL_CASES, path="fencegate"):
    """fencegate's figure over nginx's for each case, or None unless every case has both figures (a goal is not
    "met" over the cases that happen to be there)."""
    try:
        out = {c: s[path][c][key] / s["nginx"][c][key] for c in cases}
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return out if all(s[path][c][key] for c in cases) else None


# A figure is printed rounded towards the side of its limit it is on, so that it never reads as the verdict's
# opposite: 0.996x is "0.99x, not met" (not "1.00x"), 14.99 MiB against "under 15" is "14.9".
def floor(v, digits=2):
    return math.floor(v * 10**digits + 1e-9) / 10**digits


def ceil(v, digits=2):
    return math.ceil(v * 10**digits - 1e-9) / 10**digits


def listed(rs, at_most):
    """Ratios by case: at_most (goal <= 1) rounds up, else (goal >= 1) down."""
    return ", ".join(f"{c} {(ceil(v) if at_most else floor(v)):.2f}x" for c, v in rs.items())


def verdict(ok):
    return "**met**" if ok else "**not met**"


NOT_MEASURED = "**not measured** in this run"


def main_table(r):
    s = r["summary"]
    plain = "fencegate-plain" in s
    head = ("| case | fencegate req/s | nginx req/s | HAProxy req/s | fencegate / nginx | p50 µs fg / nginx | "
            "p99 µs fg / nginx | CPU µs/req fg / nginx | of it user fg / nginx |"
            + (" plain build / nginx |" if plain else ""))
    out = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for c in CASES:
        f, n, h = s["fencegate"][c], s["nginx"][c], s["haproxy"][c]
        user = (f"{f['user_us_per_req']:.1f} / {n['user_us_per_req']:.1f}"
                if f.get("user_us_per_req") and n.get("user_us_per_req") else "-")
        row = (f"| {LABEL[c]} | {f['rps']:.0f} | {n['rps']:.0f} | {h['rps']:.0f} | {f['rps'] / n['rps']:.2f} | "
               f"{f['p50_us']:.0f} / {n['p50_us']:.0f} | {f['p99_us']:.0f} / {n['p99_us']:.0f} | "
               f"{f['cpu_us_per_req']:.0f} / {n['cpu_us_per_req']:.0f} | {user} |")
        if plain:
            row += f" {s['fencegate-plain'][c]['rps'] / n['rps']:.2f} |"
        out.append(row)
    return out


def rounds(r):
    """Each round's fencegate / nginx req/s (the rounds alternate the paths)."""
    raw = r["raw"]
    per = {c: [f["rps"] / n["rps"] for f, n in zip(raw["fencegate"][c], raw["nginx"][c])] for c in CASES}
    text = "; ".join(f"{c} " + ", ".join(f"{x:.2f}" for x in xs) for c, xs in per.items())
    met = sum(x >= 1.0 for c in GOAL_CASES for x in per[c])
    return text, met, sum(len(per[c]) for c in GOAL_CASES)


def hops(r):
    s = r["summary"]
    out = {}
    for mine, theirs in (("sidecar-1hop", "nginx-1hop-headers"), ("filter-1hop", "nginx-1hop")):
        if mine not in s:
            continue
        rps = [s[mine][c]["rps"] / s[theirs][c]["rps"] for c in CASES if s[theirs][c].get("rps")]
        cpu = [s[mine][c]["cpu_us_per_req"] / s[theirs][c]["cpu_us_per_req"] for c in CASES
               if s[mine][c].get("cpu_us_per_req") and s[theirs][c].get("cpu_us_per_req")]
        if rps and cpu:
            out[mine.split("-")[0]] = (min(rps), max(rps), min(cpu), max(cpu))
    return out


def open_loop(r, frac):
    paths = r.get("open_loop", {}).get("paths", {})
    if frac not in paths.get("fencegate", {}):
        return None
    f, n = paths["fencegate"][frac], paths["nginx"][frac]
    return (f"{f['p50_us']:.0f}/{f['p99_us']:.0f}/{f['p999_us']:.0f}",
            f"{n['p50_us']:.0f}/{n['p99_us']:.0f}/{n['p999_us']:.0f}",
            all(f[k] <= n[k] for k in ("p50_us", "p99_us", "p999_us")))


def failed_requests(s, cases=GOAL_CASES):
    """Failed requests (socket errors and non-2xx answers) of fencegate's and nginx's paths in these cases: a proxy
    that answers errors fast would otherwise beat nginx on req/s."""
    return {p: sum(s.get(p, {}).get(c, {}).get("errors", 0) for c in cases) for p in ("fencegate", "nginx")}


def against_nginx(r):
    """The goals measured against nginx's two hops: req/s, latency, CPU."""
    s = r["summary"]
    errors = failed_requests(s)
    clean = not any(errors.values())
    note = "" if clean else (f" ({errors['fencegate']} failed requests through fencegate, {errors['nginx']} "
                             "through nginx)")
    rows = []
    rps = ratios(s, "rps")
    if rps is None:
        rows.append(("req/s >= nginx's two hops, GET and PUT at 1 and 32 connections", NOT_MEASURED))
    else:
        _, met_rounds, n_rounds = rounds(r)
        rows.append(("req/s >= nginx's two hops, GET and PUT at 1 and 32 connections",
                     f"{verdict(clean and all(v >= 1.0 for v in rps.values()))}{note} by the medians: "
                     f"{listed(rps, False)}; {met_rounds} of {n_rounds} single rounds at or above nginx's"))
    p50, p99 = ratios(s, "p50_us"), ratios(s, "p99_us")
    if p50 is None or p99 is None:
        rows.append(("p50 and p99 <= nginx's", NOT_MEASURED))
    else:
        ok = clean and all(v <= 1.0 for v in list(p50.values()) + list(p99.values()))
        ol = open_loop(r, "0.50")
        rows.append(("p50 and p99 <= nginx's",
                     f"{verdict(ok)}{note} by the closed-loop medians: p50 {listed(p50, True)}; p99 {listed(p99, True)}"
                     + (f"; open loop at 50% of nginx's best rate, p50/p99/p99.9 µs: fencegate {ol[0]} against "
                        f"nginx's {ol[1]} ({'all lower or equal' if ol[2] else 'not all lower'})" if ol else "")))
    cpu, user = ratios(s, "cpu_us_per_req"), ratios(s, "user_us_per_req")
    if cpu is None:
        rows.append(("CPU per request <= nginx's", NOT_MEASURED))
    else:
        rows.append(("CPU per request <= nginx's",
                     f"{verdict(clean and all(v <= 1.0 for v in cpu.values()))}{note}: {listed(cpu, True)}"
                     + (f"; the user-space part alone {listed(user, True)}" if user else "")))
    h = hops(r)
    rows.append(("each hop against one nginx hop", ("measured: " + "; ".join(
        f"the {k} {a:.2f}-{b:.2f}x req/s at {c:.2f}-{d:.2f}x CPU per request" for k, (a, b, c, d) in h.items()))
        if h else NOT_MEASURED))
    return rows


def many_locks(r):
    ml = r.get("many_locks")
    goal = "100k locks at >= 0.95x the one-lock rate"
    try:
        spread, one = ml["put_c32_spread_over_locks"], ml["put_c32_one_lock"]
        ratio = spread["rps"] / one["rps"]
    except (KeyError, TypeError, ZeroDivisionError):
        return goal, NOT_MEASURED
    same = (ml.get("put_c32_one_lock_same_paths") or {}).get("rps")
    errors = sum(x.get("socket_errors", 0) + x.get("status_errors", 0) for x in (spread, one))
    short = ml.get("locks_known", 0) < ml["locks"]
    why = (f" ({errors} failed requests)" if errors else "") + (
        f" (only {ml.get('locks_known', 0)} of the {ml['locks']} locks had records)" if short else "")
    return (f"{ml['locks'] // 1000}k locks at >= 0.95x the one-lock rate",
            f"{verdict(ratio >= 0.95 and not errors and not short)}{why}: PUTs spread over {ml['locks']} locks at "
            f"{floor(ratio, 3):.3f}x the one-lock, one-path rate ({spread['rps']:.0f} vs {one['rps']:.0f} req/s)"
            + (f"; {floor(spread['rps'] / same, 3):.3f}x the same paths under one lock" if same else ""))


def goals(r):
    rows = against_nginx(r)
    rows.append(many_locks(r))
    idle, peak = r["sidecar_idle_rss_kib"] / 1024, r["peak_rss_kib_fencegate"]["fencegate-sidecar"] / 1024
    both = r["peak_rss_kib"]
    rows.append(("sidecar idles under 15 MiB RSS, stays under 30 MiB at load",
                 f"{verdict(idle < 15 and peak < 30)}: {floor(idle, 1):.1f} MiB idle, {floor(peak, 1):.1f} MiB "
                 f"peak; both hops {both['fencegate'] / 1024:.1f} MiB peak against nginx's "
                 f"{both['nginx'] / 1024:.1f} MiB"))
    fo, fv = r["failover_ms"], r["failover_verified_ms"]
    worst_term = max(fo["sigterm_ms"]["max"], fv["sigterm_ms"]["max"])
    rows.append(("graceful handoff under 100 ms",
                 f"{verdict(worst_term < 100)}: {fo['sigterm_ms']['median']:.0f} ms median trusting tokens (max "
                 f"{floor(fo['sigterm_ms']['max'], 0):.0f}), {fv['sigterm_ms']['median']:.0f} ms verifying raises "
                 f"with etcd (max {floor(fv['sigterm_ms']['max'], 0):.0f})"))
    ttl_ms = duration_ms(r["settings"]["ttl"])
    worst = max(fo["kill9_ms"]["max"], fv["kill9_ms"]["max"])
    rows.append(("crash failover within TTL + 500 ms",
                 f"{verdict(worst <= ttl_ms + 500)}: TTL {ttl_ms / 1000:g} s, median "
                 f"{fo['kill9_ms']['median'] / 1000:.2f} s ({fv['kill9_ms']['median'] / 1000:.2f} s verifying), "
                 f"max {ceil(worst / 1000):.2f} s"))
    return ["| goal | where it stands |", "|---|---|"] + [f"| {g} | {w} |" for g, w in rows]


def duration_ms(text):
    """The bench's TTL setting ("2s", "500ms") in milliseconds."""
    return float(text[:-2]) if text.endswith("ms") else float(text.rstrip("s")) * 1000


def block(r):
    st = r["settings"]
    build = st.get("fencegate_build") or f"`{st.get('fencegate_bin')}`"
    out = [BEGIN, "",
           f"The committed run (`bench/results/bench.md`): {r['machine']['cpus']} shared CPUs, {st['rounds']} rounds x "
           f"{st['seconds_per_case']} s per case, medians. fencegate is the {build} build"
           + (" (`plain build / nginx`: `cargo build --release`'s two hops in the same run)"
              if "fencegate-plain" in r["summary"] else "")
           + f". Every hop with {st.get('workers', 2)} workers: nginx's and HAProxy's, fencegate's filter with "
           f"{st.get('workers', 2)} event loops and its sidecar with {st.get('sidecar_workers', 1)}. CPU is user + "
           "system time of both hops' processes per request; \"of it user\" is the part spent outside the kernel.", ""]
    out += main_table(r)
    text, _, _ = rounds(r)
    out += ["", f"Each round against nginx's in the same round: {text}. A round moves by up to ±15% on this shared "
            "box: "
            "read one case's ratio with that in mind; `python3 bench/icount.py`'s instruction counts are the "
            "repeatable measure of a change.", ""]
    out += goals(r)
    lines = []
    for frac in ("0.25", "0.50", "0.75"):
        ol = open_loop(r, frac)
        if ol:
            lines.append(f"at {float(frac):.0%} {ol[0]} against {ol[1]}")
    if lines:
        out += ["", "Open loop (GETs at fixed rates, fractions of nginx's best closed-loop rate, `h2load --rps`, 32 "
                "connections; the plot above), fencegate's p50/p99/p99.9 µs against nginx's: "
                + "; ".join(lines) + "."]
    a = r.get("admission_in_process")
    if a:
        out += ["", f"Admission alone, in process (`examples/admission_bench.rs`): {a['ns_per_write_one_lock']:.0f} ns "
                f"per write on one lock, {a['ns_per_write_many_locks']:.0f} ns spread over {a['locks']} locks, "
                f"{a['bytes_per_lock']} bytes per lock; matching the write's path against the rules "
                f"{a['ns_per_match_one_rule']:.0f} ns with one rule and {a['ns_per_match_many_rules']:.0f} ns spread "
                f"over {a['locks']} rules, {a['bytes_per_rule']} bytes per rule."]
        if "ns_per_write_via_rules_many" in a:
            out[-1] = out[-1][:-1] + (f"; both in a row, as a write does them, {a['ns_per_write_via_rules_one']:.0f} ns "
                                      f"and {a['ns_per_write_via_rules_many']:.0f} ns.")
    rp = r.get("replicas")
    if rp:
        fw = rp["first_write"]
        added = {k: x["new_token_p50_us"] - x["same_token_p50_us"] for k, x in fw.items()}
        tp = {k: sorted(x["rps"] for x in v)[len(v) // 2] for k, v in rp["put_c32"].items()}
        out += ["", "Filter replicas sharing marks through etcd (`--shared-marks`): a new holder's first write costs "
                f"{added['1_replicas'] / 1000:.1f} ms more than a write at the current mark with one replica and "
                f"{added['3_replicas'] / 1000:.1f} ms with three, against the single filter's local fsync at "
                f"{added['single_filter'] / 1000:.2f} ms; steady writes through one of three replicas run at "
                f"{tp['one_of_3_replicas'] / tp['single_filter']:.2f}x the single filter's rate and make "
                f"{max(rp['etcd_calls_during_steady_writes'])} etcd calls (the bench counts etcd's Txn/Range/Put calls "
                "during them)."]
    # Prose wrapped as the rest of the README is; tables and markers left whole.
    wrap = lambda line: line if line.startswith(("|", "<!--")) else textwrap.fill(  # noqa: E731
        line, 118, break_long_words=False, break_on_hyphens=False)
    return [wrap(line) for line in out] + ["", END]


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "bench.json")
    readme = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(HERE), "README.md")
    with open(src) as fh:
        r = json.load(fh)
    with open(readme) as fh:
        text = fh.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"{readme}: no single block between the bench-table markers")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    new = head + "\n".join(block(r)) + tail  # built whole first: a failure leaves the README as it was
    with open(readme + ".tmp", "w") as fh:
        fh.write(new)
    os.replace(readme + ".tmp", readme)
    print(f"{readme}: the bench-table block written from {src}")


if __name__ == "__main__":
    main()
