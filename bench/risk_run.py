"""risk_control's cost: what enforce mode adds beyond the risk service's own time, and report mode's cost.

    python3 bench/risk_run.py --rounds 5 --json risk.json

The risk service is the origin nginx answering a fixed JSON verdict to
`POST /v1/risk/check` (bench/harness.py), so its own latency is small and
measured directly with h2load in the same rounds. meshproxy (no filter),
meshproxy-risk (enforce, JSON, timeout 50ms) and meshproxy-risk-report run
at once; each round measures, interleaved: the risk service directly, then
every proxy, at concurrency 1 (p50 and p99 of 2,000 requests). Then:

    added by enforce = p50(meshproxy-risk) - p50(meshproxy) - p50(risk service)
    report           = p50(meshproxy-risk-report) / p50(meshproxy), and the same for p99

Medians over the rounds. See bench/README.md for pinning and the origin.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import urllib.request
from pathlib import Path

import harness as h

RISK_BODY = b'{"caller": "bench", "destination": "origin", "path": "/small"}'


def p50_p99(url: str, b: h.Bench, n: int, extra: list[str], name: str) -> tuple[int, int]:
    log = b.dir / f"lat-{name}.log"
    log.unlink(missing_ok=True)
    r, out = h.h2load([*extra, "-n", str(n), "-c", "1", "-m", "1", "--log-file", str(log), url], timeout=120)
    if r.get("exit") != 0 or not log.exists():
        raise RuntimeError(f"{name}: h2load failed\n{out}")
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines())
    statuses = {line.split("\t")[1] for line in log.read_text().splitlines()}
    if statuses != {"200"}:
        raise RuntimeError(f"{name}: statuses {statuses}\n{out}")
    return lat[len(lat) // 2], lat[len(lat) * 99 // 100]


def verdicts(svc: h.Service) -> dict[str, float]:
    """The proxy's risk counters: a fail-open check costs nothing and would flatter the figures."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.admin}/metrics", timeout=5).read().decode()
    got: dict[str, float] = {}
    for m in re.finditer(r'^meshproxy_risk_(verdicts|failures)_total\{[^}]*(?:verdict|reason)="(\w+)"[^}]*\} (\S+)$',
                         text, re.M):
        got[f"{m[1]}:{m[2]}"] = got.get(f"{m[1]}:{m[2]}", 0) + float(m[3])
    return {k: v for k, v in got.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--json", metavar="FILE")
    o = ap.parse_args()
    names = ["meshproxy", "meshproxy-risk", "meshproxy-risk-report"]
    got: dict[str, list[int]] = {n: [] for n in ["risk-service", *names]}
    got_p99: dict[str, list[int]] = {n: [] for n in ["risk-service", *names]}
    added: list[int] = []
    report: list[float] = []
    report_p99: list[float] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with h.Bench(nofile=65536) as b:
        origin = b.start_origin()
        body = b.dir / "risk-request.json"
        body.write_bytes(RISK_BODY)
        risk_url = f"http://127.0.0.1:{origin.port}/v1/risk/check"
        risk_args = ["-d", str(body), "-H", "content-type: application/json"]
        svcs = {n: b.start_target(n, origin) for n in names}
        for n, svc in svcs.items():
            assert svc is not None
            bad = h.check_bodies(svc.port)
            if bad:
                raise SystemExit(f"{n}: {bad}")
        for rnd in range(o.rounds):
            b.refresh_origin()
            both = {"risk-service": p50_p99(risk_url, b, o.latency_n, risk_args, "risk")}
            for n, svc in svcs.items():
                assert svc is not None
                both[n] = p50_p99(f"http://127.0.0.1:{svc.port}/small", b, o.latency_n, [], n)
            row = {k: v[0] for k, v in both.items()}
            for k, (v50, v99) in both.items():
                got[k].append(v50)
                got_p99[k].append(v99)
            added.append(row["meshproxy-risk"] - row["meshproxy"] - row["risk-service"])
            report.append(row["meshproxy-risk-report"] / row["meshproxy"])
            report_p99.append(both["meshproxy-risk-report"][1] / both["meshproxy"][1])
            print(f"round {rnd + 1}: p50 µs {row}; enforce adds {added[-1]} µs beyond the risk service; "
                  f"report/plain {report[-1]:.3f} (p99 {report_p99[-1]:.3f})", flush=True)
        checks = {n: verdicts(svc) for n, svc in svcs.items() if n != "meshproxy" and svc is not None}
    print("risk counters:", json.dumps(checks))
    failed = {n: c for n, c in checks.items() if any(k.startswith("failures:") for k in c)}
    summary = {
        "risk_counters": checks,
        "p50_us": {k: statistics.median(v) for k, v in got.items()},
        "enforce_added_us_beyond_risk_service": statistics.median(added),
        "report_p50_ratio": round(statistics.median(report), 3),
        "p99_us": {k: statistics.median(v) for k, v in got_p99.items()},
        "report_p99_ratio": round(statistics.median(report_p99), 3),
    }
    print("\nmedians:", json.dumps(summary))
    if o.json:
        Path(o.json).write_text(json.dumps({"started": started, "method": vars(o), "summary": summary,
                                            "rounds": {"p50_us": got, "p99_us": got_p99, "added_us": added,
                                                       "report_ratio": report, "report_p99_ratio": report_p99}},
                                           indent=1))
    if failed:
        print(f"PROBLEM: risk checks failed (the figures are not valid): {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
