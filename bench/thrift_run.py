#!/usr/bin/env python3
"""Side-by-side Thrift proxy benchmark: direct, meshproxy, haproxy (TCP mode).

    python3 bench/thrift_run.py [--quick] [--targets direct,meshproxy,haproxy] [--json out.json]

Compiles bench/thrift_echo_server.c and bench/thrift_load.c (gcc -O2) into bench/.build/,
starts one echo server (framed transport, strict binary, `echo(1: binary data)`) pinned to
CPU 1, then for each target in turn starts it pinned to CPU 0, checks that calls come back
byte for byte (a 64-byte and a 1 MiB payload), and measures with thrift_load (pinned to CPU 1):

  throughput  thrift_load 8 connections x depth 32, 64-byte payload, SECONDS after a warm-up;
              median calls/s of 3 runs (1 with --quick); proxy CPU sampled over the window
  latency     thrift_load 1 connection x depth 1, 64-byte payload: p50 / p99, and the p50 / p99
              added to the direct path's

Every thrift_load run must end with 0 errors (closed connections, bad replies,
TApplicationExceptions, calls unanswered for 2 s) and at least one call; any violation is
flagged loudly, recorded in the JSON and makes the exit status 1. A target that does not start
is reported as failed and the others are still measured. See bench/README.md ("Thrift").
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import harness as h

BUILD = h.HERE / ".build"
PROGRAMS = ("thrift_echo_server", "thrift_load")

TARGETS = ["direct", "meshproxy", "haproxy"]
DESCRIPTIONS = {
    "direct": "thrift_load -> echo server (no proxy)",
    "meshproxy": "meshproxy, thrift listener (framed, binary) -> cluster (framed, binary, mux)",
    "haproxy": "haproxy mode tcp, nbthread 1",
}

THROUGHPUT = {"connections": 8, "depth": 32, "payload_bytes": 64}
LATENCY = {"connections": 1, "depth": 1, "payload_bytes": 64}
CHECK_PAYLOADS = (64, 1 << 20)


# --------------------------------------------------------------------------- build

def build() -> dict[str, Path]:
    BUILD.mkdir(exist_ok=True)
    out = {}
    for name in PROGRAMS:
        exe = BUILD / name
        argv = ["gcc", "-O2", "-std=c11", "-Wall", "-Wextra", "-o", str(exe), str(h.HERE / f"{name}.c")]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{cp.stdout}{cp.stderr}")
        if cp.stderr.strip():
            h.warn(cp.stderr)
        out[name] = exe
    return out


# --------------------------------------------------------------------------- configs

def haproxy_conf(d: Path, port: int, echo: int) -> str:
    return f"""global
  nbthread 1
  maxconn 8000
  pidfile {d}/haproxy.pid

defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s

frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  server echo 127.0.0.1:{echo}
"""


def meshproxy_conf(port: int, admin: int, echo: int) -> str:
    return f"""admin: {{address: 127.0.0.1:{admin}}}
listeners:
  - name: thrift-in
    direction: egress
    address: 127.0.0.1:{port}
    protocol: thrift
    thrift: {{transport: framed, protocol: binary}}
    routes:
      - match: {{}}
        cluster: echo
clusters:
  - name: echo
    protocol: thrift
    thrift: {{transport: framed, protocol: binary, mux: true}}
    endpoints: ["127.0.0.1:{echo}"]
"""


def start_target(b: h.Bench, target: str, echo: h.Service) -> h.Service | None:
    """Start one target (None for direct) and wait until it is ready."""
    if target == "direct":
        return None
    port = h.free_port()
    if target == "meshproxy":
        admin = h.free_port()
        conf = b.dir / "meshproxy-thrift.yaml"
        conf.write_text(meshproxy_conf(port, admin, echo.port))
        svc = b.start(target, h.meshproxy_argv(conf), port, h.PROXY_CPU, admin=admin)
        b.wait_ready(svc)
        b.wait_tcp(svc)
        return svc
    if target == "haproxy":
        conf = b.dir / "haproxy-thrift.cfg"
        conf.write_text(haproxy_conf(b.dir, port, echo.port))
        svc = b.start(target, ["haproxy", "-db", "-f", str(conf)], port, h.PROXY_CPU)
        b.wait_tcp(svc)
        return svc
    raise ValueError(f"unknown target {target!r}")


# --------------------------------------------------------------------------- checks & load

def echo_call(seqid: int, data: bytes) -> bytes:
    """Framed, strict binary CALL echo(1: binary data)."""
    msg = (struct.pack(">Ii", 0x80010001, 4) + b"echo" + struct.pack(">i", seqid)
           + b"\x0b\x00\x01" + struct.pack(">i", len(data)) + data + b"\x00")
    return struct.pack(">i", len(msg)) + msg


def echo_reply(seqid: int, data: bytes) -> bytes:
    """What the echo server sends back: REPLY, result {0: data}."""
    msg = (struct.pack(">Ii", 0x80010002, 4) + b"echo" + struct.pack(">i", seqid)
           + b"\x0b\x00\x00" + struct.pack(">i", len(data)) + data + b"\x00")
    return struct.pack(">i", len(msg)) + msg


def check_calls(port: int, timeout: float = 10.0) -> list[str]:
    """One connection, one call per payload size; every reply compared byte for byte."""
    problems = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            for i, size in enumerate(CHECK_PAYLOADS):
                data = h.body(size)
                seqid = 0x01020300 + i
                want = echo_reply(seqid, data)
                s.sendall(echo_call(seqid, data))
                got = bytearray()
                while len(got) < len(want):
                    chunk = s.recv(len(want) - len(got))
                    if not chunk:
                        break
                    got += chunk
                if bytes(got) != want:
                    kind = {1: "CALL", 2: "REPLY", 3: "EXCEPTION", 4: "ONEWAY"}.get(got[7] if len(got) > 7 else 0, "?")
                    problems.append(f"echo call with {size} bytes: got {len(got)} bytes (type {kind}), "
                                    f"expected the {len(want)}-byte REPLY; first bytes {bytes(got[:48])!r}")
    except OSError as e:
        problems.append(f"echo call: {e!r}")
    return problems


def load_problems(r: dict) -> list[str]:
    if "calls" not in r:
        return ["could not parse thrift_load output"]
    p = []
    if r["errors"]:
        p.append(f"{r['errors']} errors: {r['closed']} closed, {r['bad']} bad replies, "
                 f"{r['exceptions']} TApplicationExceptions, {r['timeouts']} unanswered for 2 s")
    if r["exit"] != 0 and not r["errors"]:
        p.append(f"thrift_load exited with {r['exit']}")
    if r["calls"] == 0:
        p.append("no call completed")
    return p


def run_load(exe: Path, port: int, params: dict, seconds: float, warmup: float,
             pid: int | None) -> tuple[dict, str]:
    """Run thrift_load on the load CPU; sample the proxy's CPU time over the measured window."""
    args = [str(exe), "127.0.0.1", str(port), str(params["connections"]), str(params["depth"]),
            str(seconds), str(params["payload_bytes"]), str(warmup)]
    argv, pre = h.pinned(args, h.LOAD_CPU)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre)
    try:
        t0 = c0 = None
        if pid is not None:
            time.sleep(warmup + 0.2)
            t0, c0 = time.monotonic(), h.cpu_seconds(pid)
        out, err = proc.communicate(timeout=seconds + warmup + 60)
        cpu = None
        if pid is not None and proc.returncode is not None:
            t1, c1 = time.monotonic(), h.cpu_seconds(pid)
            cpu = (c1 - c0) / max(t1 - t0, 1e-9)  # fraction of one CPU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r: dict = {}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                r = json.loads(line)
            except ValueError:
                pass
            break
    r["exit"] = proc.returncode
    if cpu is not None and r.get("calls_per_s"):
        r["proxy_cpu"] = cpu
        r["proxy_cpu_us_per_call"] = cpu / r["calls_per_s"] * 1e6
    return r, (out + err)


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


def measure(b: h.Bench, target: str, echo: h.Service, exes: dict, o, problems: Problems) -> dict:
    res: dict = {"description": DESCRIPTIONS[target]}
    t_start = time.monotonic()
    try:
        svc = start_target(b, target, echo)
    except Exception as e:
        problems.add(target, "start", [str(e)])
        res["error"] = f"did not start: {e}"
        return res
    port = svc.port if svc else echo.port
    pid = svc.pid if svc else None

    def alive(what: str) -> bool:
        if svc is not None and not svc.alive():
            problems.add(target, what, [f"process exited ({svc.proc.returncode})"], svc.log_tail())
            res["error"] = f"exited during {what}"
            return False
        return True

    try:
        bad = check_calls(port)
        problems.add(target, "echo check", bad, svc.log_tail() if svc else "")
        if bad or not alive("echo check"):
            res.setdefault("error", "echo check failed")
            return res

        runs = []
        for i in range(o.reps):
            r, out = run_load(exes["thrift_load"], port, THROUGHPUT, o.duration, o.warmup, pid)
            runs.append(r)
            problems.add(target, f"throughput run {i + 1}", lp := load_problems(r), out)
            cpu = f", proxy CPU {r['proxy_cpu'] * 100:.0f}%" if "proxy_cpu" in r else ""
            print(f"  {target:10s} throughput run {i + 1}: {r.get('calls_per_s', 0):10,.0f} calls/s"
                  f"  p50 {r.get('p50_us', 0)} µs  p99 {r.get('p99_us', 0)} µs{cpu}"
                  f"{'  (INVALID)' if lp else ''}", flush=True)
            if not alive(f"throughput run {i + 1}"):
                return res
        tp: dict = {"calls_per_s": statistics.median(r.get("calls_per_s", 0.0) for r in runs), "runs": runs}
        cpus = [r["proxy_cpu_us_per_call"] for r in runs if "proxy_cpu_us_per_call" in r]
        if cpus:
            tp["proxy_cpu_us_per_call"] = statistics.median(cpus)
            tp["proxy_cpu_util"] = statistics.median(r["proxy_cpu"] for r in runs if "proxy_cpu" in r)
        res["throughput"] = tp

        r, out = run_load(exes["thrift_load"], port, LATENCY, o.duration, o.warmup, pid)
        problems.add(target, "latency", lp := load_problems(r), out)
        print(f"  {target:10s} latency c=1 d=1:   p50 {r.get('p50_us', 0)} µs  p99 {r.get('p99_us', 0)} µs"
              f"  ({r.get('calls', 0):,} calls){'  (INVALID)' if lp else ''}", flush=True)
        if r.get("calls"):
            res["latency"] = {k: r[k] for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
                                                "calls", "calls_per_s")}
            res["latency"]["run"] = r
        alive("latency")
    except subprocess.TimeoutExpired as e:
        problems.add(target, "thrift_load", [f"timed out: {e}"])
        res["error"] = "thrift_load timed out"
    finally:
        if svc is not None:
            b.stop(svc)
        res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


# --------------------------------------------------------------------------- report

def ratios(results: dict) -> dict:
    """target/base for base in direct, haproxy: calls/s (above 1: faster), p50 / p99 (below 1: quicker)."""
    out = {}
    for t, tr in results.items():
        for base in ("direct", "haproxy"):
            br = results.get(base, {})
            if t == base or not br:
                continue
            r = {}
            if tr.get("throughput", {}).get("calls_per_s") and br.get("throughput", {}).get("calls_per_s"):
                r["calls_per_s"] = tr["throughput"]["calls_per_s"] / br["throughput"]["calls_per_s"]
            if "latency" in tr and "latency" in br:
                for p in ("p50_us", "p99_us"):
                    if br["latency"][p]:
                        r[f"latency_{p[:3]}"] = tr["latency"][p] / br["latency"][p]
            if r:
                out[f"{t}/{base}"] = r
    return out


def added_latency(results: dict) -> None:
    d = results.get("direct", {}).get("latency")
    if not d:
        return
    for t, r in results.items():
        if t != "direct" and "latency" in r:
            r["latency"]["added_p50_us_vs_direct"] = r["latency"]["p50_us"] - d["p50_us"]
            r["latency"]["added_p99_us_vs_direct"] = r["latency"]["p99_us"] - d["p99_us"]


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(results: dict, rat: dict) -> None:
    head = (f"{'target':10s} {'calls/s':>11s} {'x direct':>9s} {'x haproxy':>10s} {'proxy CPU%':>11s}"
            f" {'CPU µs/call':>12s} {'p50 µs':>7s} {'p99 µs':>7s} {'+p50 µs':>8s} {'+p99 µs':>8s}")
    print("\n" + head)
    print("-" * len(head))
    for t, r in results.items():
        tp, lat = r.get("throughput", {}), r.get("latency", {})
        util = tp.get("proxy_cpu_util")
        print(f"{t:10s} {fmt(tp.get('calls_per_s'), '11,.0f'):>11s}"
              f" {fmt(rat.get(f'{t}/direct', {}).get('calls_per_s'), '9.2f'):>9s}"
              f" {fmt(rat.get(f'{t}/haproxy', {}).get('calls_per_s'), '10.2f'):>10s}"
              f" {fmt(None if util is None else util * 100, '11.0f'):>11s}"
              f" {fmt(tp.get('proxy_cpu_us_per_call'), '12.2f'):>12s}"
              f" {fmt(lat.get('p50_us'), '7d'):>7s} {fmt(lat.get('p99_us'), '7d'):>7s}"
              f" {fmt(lat.get('added_p50_us_vs_direct'), '+8d'):>8s}"
              f" {fmt(lat.get('added_p99_us_vs_direct'), '+8d'):>8s}"
              + (f"   ({r['error']})" if "error" in r else ""))
    tpp, lp = THROUGHPUT, LATENCY
    print(f"\ncalls/s: {tpp['connections']} connections x depth {tpp['depth']}, {tpp['payload_bytes']}-byte payload;"
          f" p50/p99: {lp['connections']} connection x depth {lp['depth']};"
          " +p50/+p99: added to direct's; x direct / x haproxy: calls/s ratio (above 1: faster)")
    if rat:
        print("ratios (calls/s: higher is faster; latency: lower is quicker)")
        for name, r in rat.items():
            print(f"  {name:18s} " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))


def versions() -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return ((cp.stdout or "") + (cp.stderr or "")).strip().splitlines()[0]
        except Exception as e:
            return f"unavailable: {e}"
    v = {"python": platform.python_version(), "haproxy": first_line(["haproxy", "-v"]),
         "gcc": first_line(["gcc", "--version"]), "kernel": platform.release(), "pinning": h.PINNING}
    try:
        import trio
        v["trio"] = trio.__version__
    except ImportError:
        pass
    v["meshproxy_git"] = first_line(["git", "-C", str(h.ROOT), "describe", "--always", "--dirty"])
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Thrift proxy benchmark (see bench/README.md, Thrift)")
    ap.add_argument("--quick", action="store_true", help="1 throughput run instead of 3 (median)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per run, not measured (default 1, quick 0.5)")
    ap.add_argument("--reps", type=int, help="throughput runs, median reported (default 3, quick 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    o = ap.parse_args(argv)
    targets = [t.strip() for t in o.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {TARGETS}")
    o.warmup = o.warmup if o.warmup is not None else (0.5 if o.quick else 1.0)
    o.reps = o.reps or (1 if o.quick else 3)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if h.PINNING == "none":
        h.loud("cannot pin to CPUs 0 and 1 (need taskset or sched_setaffinity and 2 CPUs): unpinned run")
    h.raise_nofile(65536)
    try:
        exes = build()
    except Exception as e:
        h.loud(f"build failed: {e}")
        return 2
    load0 = h.loadavg()
    if load0[0] > 0.5:
        h.loud(f"load average {load0[0]:.2f} before starting: something else is using the CPUs; "
               "numbers will be noisy")
    problems = Problems()
    results: dict = {}
    started = time.time()
    try:
        with h.Bench(keep=o.keep, nofile=65536) as b:
            port = h.free_port()
            echo = b.start("echo", [str(exes["thrift_echo_server"]), str(port)], port, h.LOAD_CPU)
            b.wait_tcp(echo)
            print(f"echo server on 127.0.0.1:{echo.port} (CPU {h.LOAD_CPU}), proxies on CPU {h.PROXY_CPU},"
                  f" thrift_load on CPU {h.LOAD_CPU}, pinning: {h.PINNING}; work dir {b.dir}", flush=True)
            for t in targets:
                print(f"== {t}: {DESCRIPTIONS[t]}", flush=True)
                results[t] = measure(b, t, echo, exes, o, problems)
                if not echo.alive():
                    problems.add("echo server", "after " + t, ["exited"], echo.log_tail())
                    break
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130

    added_latency(results)
    rat = ratios(results)
    print_table(results, rat)
    if problems.items:
        h.loud(f"{len(problems.items)} PROBLEM(S): the numbers above are not valid as they stand:\n    "
               + "\n    ".join(problems.items))
    else:
        print("\nall thrift_load runs: 0 errors (closed, bad replies, exceptions, unanswered);"
              " replies checked byte for byte")
    if o.json:
        doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "method": {"throughput": THROUGHPUT, "latency": LATENCY, "transport": "framed",
                          "protocol": "binary (strict)", "method": "echo(1: binary data)",
                          "duration_s": o.duration, "warmup_s": o.warmup, "reps": o.reps,
                          "proxy_cpu": h.PROXY_CPU, "load_cpu": h.LOAD_CPU, "quick": o.quick},
               "versions": versions(), "loadavg_before": load0, "loadavg_after": h.loadavg(),
               "results": results, "ratios": rat, "problems": problems.items}
        Path(o.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {o.json}")
    return 1 if problems.items else 0


if __name__ == "__main__":
    sys.exit(main())
