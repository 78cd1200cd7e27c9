#!/usr/bin/env python3
"""Side-by-side Thrift benchmark: direct, meshproxy, haproxy (TCP mode).

    python3 bench/thrift_run.py [--quick] [--targets direct,meshproxy,haproxy] [--json out.json]

Builds two C programs with gcc (bench/thrift/echo_server.c, a framed
strict-binary echo backend; bench/thrift/load.c, a pipelining load driver),
starts the echo server pinned to CPU 1, then for each target in turn starts it
pinned to CPU 0 and measures with the load driver (pinned to CPU 1):

  throughput  8 connections x 32 calls in flight each, 64-byte payloads,
              SECONDS each after a warm-up; median of 3 runs (1 with --quick)
  latency     1 connection, 1 call in flight: p50 / p99 (1 us histogram);
              the added p50 is the target's minus direct's

Every run must finish with 0 errors (a wrong seqid, type or size, a closed
connection, a TApplicationException); any violation is flagged loudly, kept in
the JSON and makes the exit status 1. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness as h

TARGETS = ["direct", "meshproxy", "haproxy"]
DESCRIPTIONS = {
    "direct": "load driver -> echo server (no proxy)",
    "meshproxy": "meshproxy thrift listener (framed, binary) -> cluster (framed, mux), metrics on, access log off",
    "haproxy": "haproxy mode tcp, nbthread 1",
}
CONNECTIONS, DEPTH, PAYLOAD = 8, 32, 64


def build(d: Path) -> tuple[Path, Path]:
    out = []
    for name in ("echo_server", "load"):
        exe = d / name
        subprocess.run(["gcc", "-O2", "-std=gnu11", "-Wall", "-o", str(exe), str(h.HERE / "thrift" / f"{name}.c")],
                       check=True)
        out.append(exe)
    return out[0], out[1]


def meshproxy_conf(port: int, admin: int, origin: int) -> str:
    return f"""node: {{service: bench}}
admin: {{address: 127.0.0.1:{admin}}}
access_log: {{enabled: false}}
listeners:
  - name: thrift-in
    direction: egress
    address: 127.0.0.1:{port}
    protocol: thrift
    thrift: {{transport: framed, protocol: binary}}
    routes:
      - match: {{}}
        cluster: echo
        timeout: 30s
clusters:
  - name: echo
    protocol: thrift
    thrift: {{transport: framed, protocol: binary, mux: true, max_requests_per_connection: 512}}
    endpoints: ["127.0.0.1:{origin}"]
"""


def haproxy_conf(d: Path, port: int, origin: int) -> str:
    return f"""global
  nbthread 1
  maxconn 8000
  pidfile {d}/haproxy-tcp.pid

defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s

frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  server origin 127.0.0.1:{origin}
"""


def start_target(b: h.Bench, target: str, origin: int) -> h.Service | None:
    if target == "direct":
        return None
    port = h.free_port()
    if target == "meshproxy":
        admin = h.free_port()
        conf = b.dir / "thrift-meshproxy.yaml"
        conf.write_text(meshproxy_conf(port, admin, origin))
        svc = b.start("meshproxy", h.meshproxy_argv(conf), port, h.PROXY_CPU, admin=admin)
        b.wait_ready(svc)
        return svc
    conf = b.dir / "haproxy-tcp.cfg"
    conf.write_text(haproxy_conf(b.dir, port, origin))
    svc = b.start("haproxy", ["haproxy", "-db", "-f", str(conf)], port, h.PROXY_CPU)
    b.wait_tcp(svc)
    return svc


def load(exe: Path, port: int, conns: int, depth: int, seconds: float, warmup: float) -> dict:
    argv, pre = h.pinned([str(exe), "127.0.0.1", str(port), str(conns), str(depth), str(seconds), str(PAYLOAD),
                          str(warmup)], h.LOAD_CPU)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 30,
                          preexec_fn=pre)  # type: ignore[arg-type]
    try:
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        r = {"errors": 1, "calls_per_s": 0.0}
    r["exit"] = proc.returncode
    if proc.returncode or r.get("errors"):
        r["stderr"] = proc.stderr[-500:]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run per measurement, shorter runs")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    o = ap.parse_args()
    targets = [t for t in o.targets.split(",") if t]
    reps, seconds, warmup = (1, 3.0, 1.0) if o.quick else (3, 5.0, 1.0)
    problems: list[str] = []
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "pinning": h.PINNING,
                     "throughput_shape": {"connections": CONNECTIONS, "depth": DEPTH, "payload_bytes": PAYLOAD,
                                          "seconds": seconds, "runs": reps},
                     "targets": {}}
    with h.Bench(keep=o.keep) as b:
        server_exe, load_exe = build(b.dir)
        origin_port = h.free_port()
        origin = b.start("echo_server", [str(server_exe), str(origin_port)], origin_port, h.LOAD_CPU)
        b.wait_tcp(origin)
        for target in targets:
            res: dict = {"description": DESCRIPTIONS[target]}
            results["targets"][target] = res
            try:
                svc = start_target(b, target, origin_port)
            except Exception as e:
                problems.append(f"{target}: did not start: {e}")
                h.loud(problems[-1])
                res["error"] = str(e)
                continue
            port = svc.port if svc else origin_port
            check = load(load_exe, port, 1, 1, 0.3, 0.0)
            if check.get("errors") or not check.get("calls"):
                problems.append(f"{target}: check call failed: {check}")
                h.loud(problems[-1])
                res["error"] = "check failed"
                if svc:
                    b.stop(svc)
                continue
            runs = []
            for i in range(reps):
                r = load(load_exe, port, CONNECTIONS, DEPTH, seconds, warmup)
                runs.append(r)
                bad = r.get("errors") or r.get("exit")
                if bad:
                    problems.append(f"{target}: throughput run {i + 1}: {r}")
                    h.loud(problems[-1])
                print(f"  {target:10s} throughput run {i + 1}: {r.get('calls_per_s', 0):10,.0f} calls/s "
                      f"p50 {r.get('p50_us', 0)} us p99 {r.get('p99_us', 0)} us{'  (INVALID)' if bad else ''}",
                      flush=True)
            res["throughput"] = {"calls_per_s": statistics.median(r.get("calls_per_s", 0.0) for r in runs),
                                 "runs": runs}
            lat = load(load_exe, port, 1, 1, seconds, warmup)
            if lat.get("errors") or lat.get("exit"):
                problems.append(f"{target}: latency run: {lat}")
                h.loud(problems[-1])
            res["latency"] = lat
            print(f"  {target:10s} latency c=1: p50 {lat.get('p50_us')} us, p99 {lat.get('p99_us')} us, "
                  f"{lat.get('calls_per_s', 0):,.0f} calls/s", flush=True)
            if svc:
                b.stop(svc)
    direct = results["targets"].get("direct", {})
    print("\ntarget      calls/s      vs direct  vs haproxy  p50 us  p99 us  added p50 us")
    hap = results["targets"].get("haproxy", {}).get("throughput", {}).get("calls_per_s")
    for t, res in results["targets"].items():
        if "throughput" not in res:
            print(f"{t:10s}  (failed: {res.get('error')})")
            continue
        rps = res["throughput"]["calls_per_s"]
        d_rps = direct.get("throughput", {}).get("calls_per_s")
        lat = res["latency"]
        added = lat["p50_us"] - direct["latency"]["p50_us"] if "latency" in direct else None
        res["ratios"] = {"vs_direct": rps / d_rps if d_rps else None, "vs_haproxy": rps / hap if hap else None,
                         "added_p50_us": added}
        print(f"{t:10s} {rps:10,.0f}  {res['ratios']['vs_direct'] or 0:9.3f}  {res['ratios']['vs_haproxy'] or 0:9.3f}"
              f"  {lat['p50_us']:6d}  {lat['p99_us']:6d}  {added if added is not None else '-':>12}")
    results["problems"] = problems
    if o.json:
        o.json.write_text(json.dumps(results, indent=2) + "\n")
    if problems:
        h.loud(f"{len(problems)} problem(s); see above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
