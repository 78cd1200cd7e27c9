#!/usr/bin/env python3
"""Side-by-side HTTP/2 proxy benchmark: direct, meshproxy, naive forwarder, nginx, haproxy.

    python3 bench/run.py [--quick] [--targets direct,meshproxy,...] [--json out.json]

One run starts one h2c origin (nginx, 100-byte /small and 16 KiB /16k) pinned to CPU 1,
then for each target in turn starts it pinned to CPU 0, checks both bodies arrive whole,
and measures with h2load (pinned to CPU 1):

  throughput  h2load -c 16 -m 32 -D SECONDS --warm-up-time W  for /small and /16k,
              median of 3 runs (1 with --quick)
  latency     h2load -n 5000 -c 1 -m 1 --log-file F  on /small; p50 / p99 by nearest rank
              over the log's per-request latency column

Every h2load run must have 0 failed / errored / timed-out requests and only 2xx; any
violation is flagged loudly, recorded in the JSON and makes the exit status 1.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness as h

CLIENTS, STREAMS = 16, 32


def nearest_rank(sorted_vals: list[int], pct: float) -> int:
    k = max(1, math.ceil(pct / 100 * len(sorted_vals)))
    return sorted_vals[k - 1]


def run_h2load_probed(args: list[str], timeout: float, pid: int | None, probe_after: float):
    """Run h2load; sample the proxy's CPU time when the warm-up ends and when h2load ends."""
    argv, pre = h.pinned(["h2load", *args], h.LOAD_CPU)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pre)
    try:
        t0 = c0 = None
        if pid is not None:
            time.sleep(probe_after)
            t0, c0 = time.monotonic(), h.cpu_seconds(pid)
        out, _ = proc.communicate(timeout=timeout)
        cpu = None
        if pid is not None:
            t1, c1 = time.monotonic(), h.cpu_seconds(pid)
            cpu = (c1 - c0) / max(t1 - t0, 1e-9)  # fraction of one CPU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = h.parse_h2load(out)
    r["exit"] = proc.returncode
    if cpu is not None:
        r["proxy_cpu"] = cpu
        if r.get("rps"):
            r["proxy_cpu_us_per_req"] = cpu / r["rps"] * 1e6
    return r, out


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, target: str, what: str, probs: list[str], out: str = "") -> None:
        for p in probs:
            msg = f"{target}: {what}: {p}"
            self.items.append(msg)
            h.loud(msg)
        if probs and out:
            print(out[-1500:], file=sys.stderr)


def measure(b: h.Bench, target: str, origin: h.Service, o, problems: Problems) -> dict:
    res: dict = {"description": h.DESCRIPTIONS[target]}
    t_start = time.monotonic()
    try:
        svc = b.start_target(target, origin)
    except Exception as e:
        problems.add(target, "start", [str(e)])
        res["error"] = f"did not start: {e}"
        return res
    port = svc.port if svc else origin.port
    pid = svc.pid if svc and svc.proc is not origin.proc else None
    scheme = svc.scheme if svc else "http"
    base = f"{scheme}://127.0.0.1:{port}"
    hdr = h.TARGET_HEADERS.get(target, [])

    def alive(what: str) -> bool:
        if svc is not None and not svc.alive():
            problems.add(target, what, [f"process exited ({svc.proc.returncode})"], svc.log_tail())
            res["error"] = f"exited during {what}"
            return False
        return True

    try:
        bad = h.check_bodies(port, b.certs["ca"] if scheme == "https" else None)
        problems.add(target, "body check", bad)
        if bad or not alive("body check"):
            res.setdefault("error", "body check failed")
            return res

        # warm-up: connections, upstream pools, caches
        r, out = h.h2load([*hdr, "-n", str(o.warm_n), "-c", str(CLIENTS), "-m", str(STREAMS), base + "/small"],
                          timeout=o.timeout)
        problems.add(target, "warm-up", h.h2load_problems(r, expect_n=o.warm_n, size=100), out)
        if not alive("warm-up"):
            return res

        for size_name in h.SIZES:
            runs = []
            for i in range(o.reps):
                b.refresh_origin()
                args = [*hdr, "-c", str(CLIENTS), "-m", str(STREAMS), "-D", str(o.duration),
                        "--warm-up-time", str(o.warmup), base + "/" + size_name]
                r, out = run_h2load_probed(args, o.timeout, pid, o.warmup + 0.2)
                runs.append(r)
                problems.add(target, f"/{size_name} run {i + 1}",
                             h2p := h.h2load_problems(r, slack=CLIENTS * STREAMS), out)
                cpu = f", proxy CPU {r['proxy_cpu'] * 100:.0f}%" if "proxy_cpu" in r else ""
                print(f"  {target:14s} /{size_name:5s} run {i + 1}: {r.get('rps', 0):10,.0f} req/s"
                      f"{cpu}{'  (INVALID)' if h2p else ''}", flush=True)
                if not alive(f"/{size_name} run {i + 1}"):
                    return res
            rps = statistics.median(r.get("rps", 0.0) for r in runs)
            entry = {"rps": rps, "runs": runs}
            cpus = [r["proxy_cpu_us_per_req"] for r in runs if "proxy_cpu_us_per_req" in r]
            if cpus:
                entry["proxy_cpu_us_per_req"] = statistics.median(cpus)
                entry["proxy_cpu_util"] = statistics.median(r["proxy_cpu"] for r in runs)
            res[size_name] = entry

        # latency at concurrency 1
        b.refresh_origin()
        r, out = h.h2load([*hdr, "-n", "500", "-c", "1", "-m", "1", base + "/small"], timeout=o.timeout)
        problems.add(target, "latency warm-up", h.h2load_problems(r, expect_n=500, size=100), out)
        log = b.dir / f"latency-{target}.log"
        n = o.latency_n
        r, out = h.h2load([*hdr, "-n", str(n), "-c", "1", "-m", "1", "--log-file", str(log), base + "/small"],
                          timeout=o.timeout)
        lp = h.h2load_problems(r, expect_n=n, size=100)
        lat, statuses = [], []
        for line in log.read_text().splitlines() if log.exists() else []:
            cols = line.split("\t")
            if len(cols) >= 3:
                statuses.append(int(cols[1]))
                lat.append(int(cols[2]))
        if len(lat) != n:
            lp.append(f"latency log has {len(lat)} rows, expected {n}")
        if any(not 200 <= s < 300 for s in statuses):
            lp.append(f"{sum(not 200 <= s < 300 for s in statuses)} non-2xx rows in the latency log")
        problems.add(target, "latency", lp, out)
        lat.sort()
        if lat:
            res["latency_us"] = {"n": len(lat), "p50": nearest_rank(lat, 50), "p99": nearest_rank(lat, 99),
                                 "min": lat[0], "max": lat[-1], "mean": round(statistics.fmean(lat), 1)}
        alive("latency")
    except subprocess.TimeoutExpired as e:
        problems.add(target, "h2load", [f"timed out: {e}"])
        res["error"] = "h2load timed out"
    finally:
        if svc is not None and svc.proc is not origin.proc:
            b.stop(svc)
        res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


def ratios(results: dict) -> dict:
    out = {}
    m = results.get("meshproxy", {})
    for base in ("naive", "nginx", "direct"):
        bres = results.get(base, {})
        r = {}
        for size in h.SIZES:
            if m.get(size, {}).get("rps") and bres.get(size, {}).get("rps"):
                r[f"rps_{size}"] = m[size]["rps"] / bres[size]["rps"]
        for p in ("p50", "p99"):
            if "latency_us" in m and "latency_us" in bres:
                r[f"latency_{p}"] = m["latency_us"][p] / bres["latency_us"][p]
        if r:
            out[f"meshproxy/{base}"] = r
    # What a feature costs: each variant against its plain counterpart in the same run.
    for t, plain in (("meshproxy-mirror", "meshproxy"), ("meshproxy-mirror-redis", "meshproxy"),
                     ("meshproxy-mirror-stalled", "meshproxy"), ("meshproxy-authz", "meshproxy"),
                     ("meshproxy-tls", "meshproxy"), ("nginx-tls", "nginx"), ("direct-tls", "direct")):
        tres, pres = results.get(t, {}), results.get(plain, {})
        r = {f"rps_{size}": tres[size]["rps"] / pres[size]["rps"]
             for size in h.SIZES if tres.get(size, {}).get("rps") and pres.get(size, {}).get("rps")}
        for p in ("p50", "p99"):
            if "latency_us" in pres and "latency_us" in tres:
                r[f"latency_{p}"] = tres["latency_us"][p] / pres["latency_us"][p]
        if r:
            out[f"{t}/{plain}"] = r
    return out


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(results: dict, rat: dict) -> None:
    head = (f"{'target':25s} {'req/s small':>12s} {'req/s 16k':>11s} {'p50 µs':>8s} {'p99 µs':>8s}"
            f" {'proxy CPU µs/req small':>23s} {'proxy CPU% small':>17s}")
    print("\n" + head)
    print("-" * len(head))
    for t, r in results.items():
        lat = r.get("latency_us", {})
        small = r.get("small", {})
        util = small.get("proxy_cpu_util")
        print(f"{t:25s} {fmt(small.get('rps'), '12,.0f'):>12s} {fmt(r.get('16k', {}).get('rps'), '11,.0f'):>11s}"
              f" {fmt(lat.get('p50'), '8d'):>8s} {fmt(lat.get('p99'), '8d'):>8s}"
              f" {fmt(small.get('proxy_cpu_us_per_req'), '23.1f'):>23s}"
              f" {fmt(None if util is None else util * 100, '17.0f'):>17s}"
              + (f"   ({r['error']})" if "error" in r else ""))
    if rat:
        print("\nratios (meshproxy = metrics on, access log off; req/s: higher is better for meshproxy,"
              " latency: lower is better)")
        for name, r in rat.items():
            parts = [f"{k} {v:.2f}x" for k, v in r.items()]
            print(f"  {name:34s} " + ", ".join(parts))


def versions() -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return ((cp.stdout or "") + (cp.stderr or "")).strip().splitlines()[0]
        except Exception as e:
            return f"unavailable: {e}"
    v = {"python": platform.python_version(), "nginx": first_line(["nginx", "-v"]),
         "haproxy": first_line(["haproxy", "-v"]), "h2load": first_line(["h2load", "--version"]),
         "kernel": platform.release(), "pinning": h.PINNING}
    try:
        import h2
        import trio
        v["h2"], v["trio"] = h2.__version__, trio.__version__
    except ImportError:
        pass
    v["meshproxy_git"] = first_line(["git", "-C", str(h.ROOT), "describe", "--always", "--dirty"])
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="HTTP/2 proxy benchmark (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="1 run of 3 s per measurement instead of 3 of 10 s")
    ap.add_argument("--targets", default=",".join(h.TARGETS),
                    help=f"comma-separated subset of {','.join(h.TARGETS)}")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--duration", type=float, help="seconds per throughput run (default 10, quick 3)")
    ap.add_argument("--reps", type=int, help="throughput runs per size, median reported (default 3, quick 1)")
    ap.add_argument("--latency-n", type=int, default=5000, help="requests in the c=1 latency run")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    o = ap.parse_args(argv)
    targets = [t.strip() for t in o.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in h.TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {h.TARGETS}")
    o.duration = o.duration or (3 if o.quick else 10)
    o.warmup = 1 if o.quick else 2
    o.reps = o.reps or (1 if o.quick else 3)
    o.warm_n = 5000 if o.quick else 20000
    o.timeout = max(120.0, 3 * (o.duration + o.warmup) + 60)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if inherited ignored
    if h.PINNING == "none":
        h.loud("cannot pin to CPUs 0 and 1 (need taskset or sched_setaffinity and 2 CPUs): unpinned run")
    h.raise_nofile(65536)
    load0 = h.loadavg()
    if load0[0] > 0.5:
        h.loud(f"load average {load0[0]:.2f} before starting: something else is using the CPUs; "
               "numbers will be noisy")
    problems = Problems()
    results: dict = {}
    started = time.time()
    try:
        with h.Bench(keep=o.keep, nofile=65536) as b:
            origin = b.start_origin()
            print(f"origin nginx on 127.0.0.1:{origin.port} (CPU {h.LOAD_CPU}), proxies on CPU {h.PROXY_CPU},"
                  f" pinning: {h.PINNING}; work dir {b.dir}", flush=True)
            for t in targets:
                print(f"== {t}: {h.DESCRIPTIONS[t]}", flush=True)
                results[t] = measure(b, t, origin, o, problems)
                if not origin.alive():
                    problems.add("origin", "after " + t, ["origin nginx exited"], origin.log_tail())
                    break
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130

    rat = ratios(results)
    print_table(results, rat)
    if problems.items:
        h.loud(f"{len(problems.items)} PROBLEM(S): the numbers above are not valid as they stand:\n    "
               + "\n    ".join(problems.items))
    else:
        print("\nall h2load runs: 0 failed / errored / timeout, all 2xx; bodies checked byte for byte")
    if o.json:
        doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "method": {"clients": CLIENTS, "streams": STREAMS, "duration_s": o.duration,
                          "warmup_s": o.warmup, "reps": o.reps, "latency_n": o.latency_n,
                          "proxy_cpu": h.PROXY_CPU, "load_cpu": h.LOAD_CPU, "quick": o.quick},
               "versions": versions(), "loadavg_before": load0, "loadavg_after": h.loadavg(),
               "results": results, "ratios": rat, "problems": problems.items}
        Path(o.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {o.json}")
    return 1 if problems.items else 0


if __name__ == "__main__":
    sys.exit(main())
