"""Interleaved A/B runs: what one feature costs, measured against plain meshproxy in the same minutes.

    python3 bench/ab.py --variants meshproxy-authz,meshproxy-tls,meshproxy-mirror --rounds 6

On a shared 2-core VM the speed drifts by ±20% over minutes, more than the
cost of a filter; bench/run.py measures targets one after the other, so its
ratios carry that drift. Here every target runs at once (idle but one) and
the measurements alternate, baseline, variant, baseline, variant...; each
ratio compares a variant's run with the baseline runs next to it, and the
median over the rounds is reported. Same origin, pinning and h2load as
bench/run.py (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import harness as h

HERE = Path(__file__).resolve().parent
CLIENTS, STREAMS = 10, 10


def throughput(svc: h.Service, size: str, seconds: int, hdr: list[str]) -> float:
    url = f"{svc.scheme}://127.0.0.1:{svc.port}/{size}"
    r, out = h.h2load([*hdr, "-c", str(CLIENTS), "-m", str(STREAMS), "-D", str(int(seconds)), "--warm-up-time", "1", url],
                      timeout=seconds + 60)
    bad = h.h2load_problems(r, slack=CLIENTS * STREAMS)
    if bad:
        raise RuntimeError(f"{svc.name} /{size}: {bad}\n{out}")
    return float(r["rps"])


def latency(svc: h.Service, b: h.Bench, n: int, hdr: list[str]) -> tuple[int, int]:
    """(p50, p99) in µs of n sequential requests."""
    url = f"{svc.scheme}://127.0.0.1:{svc.port}/small"
    log = b.dir / f"lat-{svc.name}.log"
    log.unlink(missing_ok=True)
    r, out = h.h2load([*hdr, "-n", str(n), "-c", "1", "-m", "1", "--log-file", str(log), url], timeout=120)
    bad = h.h2load_problems(r, expect_n=n, size=100)
    if bad:
        raise RuntimeError(f"{svc.name} latency: {bad}\n{out}")
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines())
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="meshproxy")
    ap.add_argument("--variants", default="meshproxy-authz,meshproxy-tls,meshproxy-mirror")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=4, help="per throughput run")
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--json", metavar="FILE")
    o = ap.parse_args()
    variants = [v for v in o.variants.split(",") if v]
    names = [o.baseline, *variants]
    results: dict[str, dict[str, list[float]]] = {n: {"rps_small": [], "rps_16k": [], "p50": [], "p99": []}
                                                  for n in names}
    ratios: dict[str, dict[str, list[float]]] = {v: {k: [] for k in ("rps_small", "rps_16k", "p50", "p99")}
                                                 for v in variants}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with h.Bench(nofile=65536) as b:
        origin = b.start_origin()
        svcs = {n: b.start_target(n, origin) for n in names}
        for n, svc in svcs.items():
            assert svc is not None, n
            bad = h.check_bodies(svc.port, b.certs["ca"] if svc.scheme == "https" else None)
            if bad:
                print(f"{n}: {bad}", file=sys.stderr)
                return 1
            throughput(svc, "small", 2, [])  # warm-up
        for rnd in range(o.rounds):
            for v in variants:
                row: dict[str, dict[str, float]] = {}
                # The baseline gets the variant's request headers too: the same requests, only the filter differs.
                hdr = h.TARGET_HEADERS.get(v, [])
                # baseline, variant, baseline: the variant is compared with the mean of the two around it
                for who in (o.baseline, v, o.baseline):
                    svc = svcs[who]
                    b.refresh_origin()
                    m = {"rps_small": throughput(svc, "small", o.seconds, hdr),
                         "rps_16k": throughput(svc, "16k", o.seconds, hdr)}
                    m["p50"], m["p99"] = latency(svc, b, o.latency_n, hdr)
                    if who in row:
                        row[who] = {k: (row[who][k] + m[k]) / 2 for k in m}
                    else:
                        row[who] = m
                    for k, val in m.items():
                        results[who][k].append(val)
                for k in ratios[v]:
                    ratios[v][k].append(row[v][k] / row[o.baseline][k])
                r = {k: f"{x[-1]:.3f}" for k, x in ratios[v].items()}
                print(f"round {rnd + 1} {v}/{o.baseline}: {r}", flush=True)
    print(f"\nmedians over {o.rounds} rounds (variant / {o.baseline}; rps higher is better, latency lower):")
    summary = {}
    for v in variants:
        summary[v] = {k: round(statistics.median(x), 3) for k, x in ratios[v].items()}
        print(f"  {v:28s} " + ", ".join(f"{k} {x:.3f}x" for k, x in summary[v].items()))
    print("\nabsolute medians:")
    for n in names:
        print(f"  {n:28s} " + ", ".join(f"{k} {statistics.median(x):,.0f}" for k, x in results[n].items()))
    if o.json:
        Path(o.json).write_text(json.dumps({"started": started, "method": vars(o), "ratios": summary,
                                            "ratio_rounds": ratios, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
