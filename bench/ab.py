"""Interleaved A/B runs: what one feature costs, measured against plain meshproxy in the same minutes.

    python3 bench/ab.py --variants meshproxy-authz,meshproxy-tls,meshproxy-mirror --rounds 6

On a shared 2-core VM the speed drifts by ±20% over minutes, more than the
cost of a filter; bench/run.py measures targets one after the other, so its
ratios carry that drift. Here every target runs at once (idle but one) and
the measurements alternate, baseline, variant, baseline, variant...; each
ratio compares a variant's run with the baseline runs next to it, and the
median over the rounds is reported. Same origin, pinning and h2load as
bench/run.py (see bench/README.md).

A variant may name its own baseline as VARIANT/BASELINE: e.g. the current
tree against an older commit's (meshproxy-base runs meshproxy from the git
worktree given by --base-tree):

    git worktree add /tmp/mp-base d8e0261
    python3 bench/ab.py --variants meshproxy/meshproxy-base,meshproxy-governance --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
    ap.add_argument("--base-tree", type=Path, default=h.BASE_TREE,
                    help="the tree meshproxy-base runs from (a git worktree of an older commit)")
    o = ap.parse_args()
    h.BASE_TREE = o.base_tree
    # "VARIANT/BASELINE" compares VARIANT with BASELINE; a bare VARIANT is compared with --baseline.
    pairs = {}
    for spec in filter(None, o.variants.split(",")):
        v, _, base = spec.partition("/")
        pairs[spec] = (v, base or o.baseline)
    variants = list(pairs)
    names = list(dict.fromkeys(n for pair in pairs.values() for n in pair))
    results: dict[str, dict[str, list[float]]] = {n: {"rps_small": [], "rps_16k": [], "p50": [], "p99": []}
                                                  for n in names}
    ratios: dict[str, dict[str, list[float]]] = {v: {k: [] for k in ("rps_small", "rps_16k", "p50", "p99")}
                                                 for v in variants}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    loadavg_before = h.loadavg()
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
            for spec in variants:
                v, base = pairs[spec]
                row: dict[str, dict[str, float]] = {}
                # The baseline gets the variant's request headers too: the same requests, only the filter differs.
                hdr = h.TARGET_HEADERS.get(v, h.TARGET_HEADERS.get(base, []))
                # baseline, variant, baseline: the variant is compared with the mean of the two around it
                for who in (base, v, base):
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
                for k in ratios[spec]:
                    ratios[spec][k].append(row[v][k] / row[base][k])
                r = {k: f"{x[-1]:.3f}" for k, x in ratios[spec].items()}
                print(f"round {rnd + 1} {v}/{base}: {r}", flush=True)
        base_rev = b.base_rev
    loadavg_after = h.loadavg()
    print(f"\nmedians over {o.rounds} rounds, [min-max] (variant / baseline; rps higher is better, latency lower):")
    summary, spread = {}, {}
    for spec in variants:
        v, base = pairs[spec]
        summary[spec] = {k: round(statistics.median(x), 3) for k, x in ratios[spec].items()}
        spread[spec] = {k: [round(min(x), 3), round(max(x), 3)] for k, x in ratios[spec].items()}
        print(f"  {v + '/' + base:36s} " + ", ".join(f"{k} {x:.3f}x [{spread[spec][k][0]:.3f}-{spread[spec][k][1]:.3f}]"
                                                   for k, x in summary[spec].items()))
    print("\nabsolute medians:")
    for n in names:
        print(f"  {n:36s} " + ", ".join(f"{k} {statistics.median(x):,.0f}" for k, x in results[n].items()))
    if o.json:
        git = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
        method = {**vars(o), "base_tree": str(o.base_tree), "pairs": pairs,
                  "configs": {n: h.DESCRIPTIONS.get(n, "") for n in names}}
        Path(o.json).write_text(json.dumps({"started": started, "method": method,
                                            "versions": {"git": git, "base_git": base_rev},
                                            "loadavg_before": loadavg_before, "loadavg_after": loadavg_after,
                                            "ratios": summary, "spread": spread,
                                            "ratio_rounds": ratios, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
