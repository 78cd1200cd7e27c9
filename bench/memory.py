#!/usr/bin/env python3
"""Memory of meshproxy (or another target): growth under load, and cost of idle connections.

    python3 bench/memory.py [--quick] [--requests N] [--connections N] [--target meshproxy]

(a) RSS (VmRSS of the proxy's processes) after the first 10,000 proxied requests and after
    --requests in total (default 1,000,000; --quick 200,000), h2load -c 16 -m 32 on /small;
    prints both and the difference. A leak shows as growth here.
(b) a fresh proxy, then N idle client HTTP/2 connections (default 10,000): each a TCP
    connect + the client preface and an empty SETTINGS frame (+ SETTINGS ACK once the
    server's SETTINGS arrive), then held open; prints the RSS before and with them, and
    the cost per connection.

Same origin, configs and CPU pinning as bench/run.py. Everything started is stopped on
exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

import harness as h

CLIENTS, STREAMS = 16, 32
FIRST = 10_000
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def rss_tree_kib(pid: int) -> int:
    total = 0
    for p in h.proc_tree(pid):
        try:
            total += h.rss_kib(p)
        except (OSError, RuntimeError):
            pass
    return total


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def load(port: int, n: int, problems: list[str], what: str) -> float:
    timeout = max(600.0, n / 300)  # bounded even for a slow proxy (>= 300 req/s)
    t = time.monotonic()
    r, out = h.h2load(["-n", str(n), "-c", str(CLIENTS), "-m", str(STREAMS),
                       f"http://127.0.0.1:{port}/small"], timeout=timeout)
    p = h.h2load_problems(r, expect_n=n, size=100)
    for msg in p:
        problems.append(f"{what}: {msg}")
        h.loud(f"{what}: {msg}")
    if p:
        print(out[-1500:], file=sys.stderr)
    secs = time.monotonic() - t
    print(f"  {what}: {n:,} requests in {secs:.1f} s ({r.get('rps', 0):,.0f} req/s)", flush=True)
    return secs


def part_a(b: h.Bench, origin: h.Service, target: str, total: int, problems: list[str]) -> dict:
    svc = b.start_target(target, origin)
    try:
        bad = h.check_bodies(svc.port)
        problems.extend(f"(a) body check: {x}" for x in bad)
        rss0 = rss_tree_kib(svc.pid)
        load(svc.port, FIRST, problems, f"(a) first {FIRST:,}")
        rss1 = rss_tree_kib(svc.pid)
        rest = max(total - FIRST, 0)
        # in chunks, so that progress shows and RSS can be followed
        chunk = 200_000
        done, samples = FIRST, [(FIRST, rss1)]
        while rest > 0 and svc.alive():
            n = min(chunk, rest)
            load(svc.port, n, problems, f"(a) requests {done + 1:,}-{done + n:,}")
            done += n
            rest -= n
            samples.append((done, rss_tree_kib(svc.pid)))
            print(f"    RSS after {done:,}: {mib(samples[-1][1])}", flush=True)
        if not svc.alive():
            problems.append(f"(a) {target} exited ({svc.proc.returncode})")
            h.loud(problems[-1])
            return {"error": "exited", "log": svc.log_tail()}
        rss2 = samples[-1][1]
        print(f"\n(a) {target} RSS: at start {mib(rss0)}, after {FIRST:,} requests {mib(rss1)}, "
              f"after {done:,} {mib(rss2)}; difference {rss2 - rss1:+,} KiB "
              f"({(rss2 - rss1) / 1024:+.1f} MiB)", flush=True)
        return {"rss_start_kib": rss0, "rss_after_first_kib": rss1, "first": FIRST,
                "rss_after_total_kib": rss2, "total": done, "diff_kib": rss2 - rss1,
                "samples": samples}
    finally:
        b.stop(svc)


def open_idle(port: int, n: int, deadline: float, max_pending: int = 256):
    """Open n idle h2 connections; returns (open sockets, failures, seconds)."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    failed = 0
    pending = 0  # connecting, or waiting for the server's SETTINGS
    started = 0
    t0 = time.monotonic()
    try:
        while (started < n or pending) and time.monotonic() < deadline:
            while started < n and pending < max_pending:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", port))
                started += 1
                if err not in (0, errno.EINPROGRESS):
                    failed += 1
                    s.close()
                    continue
                sel.register(s, selectors.EVENT_WRITE, "connecting")
                pending += 1
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                if key.data == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        sel.unregister(s)
                        s.close()
                        pending -= 1
                        failed += 1
                        continue
                    s.send(PREFACE + SETTINGS)
                    sel.modify(s, selectors.EVENT_READ, "settings")
                else:  # the server's first bytes (its SETTINGS): acknowledge, then hold
                    sel.unregister(s)
                    pending -= 1
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        s.close()
                        failed += 1
                        continue
                    s.send(SETTINGS_ACK)
                    socks.append(s)
        for key in list(sel.get_map().values()):  # unfinished at the deadline
            sel.unregister(key.fileobj)
            key.fileobj.close()
            failed += 1
    finally:
        sel.close()
    return socks, failed, time.monotonic() - t0


def count_closed(socks: list[socket.socket]) -> int:
    """How many of the held connections the server has closed (EOF or error)."""
    closed = 0
    sel = selectors.DefaultSelector()
    try:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        for key, _ in sel.select(timeout=0.2):
            try:
                while True:
                    data = key.fileobj.recv(65536)
                    if not data:
                        closed += 1
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
    finally:
        sel.close()
    return closed


def part_b(b: h.Bench, origin: h.Service, target: str, n: int, hold: float,
           problems: list[str]) -> dict:
    svc = b.start_target(target, origin)
    socks: list[socket.socket] = []
    try:
        bad = h.check_bodies(svc.port)  # one request, so lazily built state exists
        problems.extend(f"(b) body check: {x}" for x in bad)
        time.sleep(0.5)
        rss0 = rss_tree_kib(svc.pid)
        socks, failed, secs = open_idle(svc.port, n, time.monotonic() + max(60.0, n / 100))
        print(f"  (b) opened {len(socks):,} of {n:,} idle connections in {secs:.1f} s"
              f" ({failed:,} failed)", flush=True)
        time.sleep(hold)
        rss1 = rss_tree_kib(svc.pid)
        closed = count_closed(socks)
        held = len(socks) - closed
        if failed or closed:
            problems.append(f"(b) {failed:,} connections failed to open, {closed:,} closed by {target}"
                            f" while held")
            h.loud(problems[-1])
        alive_ok = svc.alive() and not h.check_bodies(svc.port)
        if not alive_ok:
            problems.append(f"(b) {target} not serving with {held:,} idle connections open")
            h.loud(problems[-1])
        per = (rss1 - rss0) / held if held else 0.0
        print(f"\n(b) {target} RSS: {mib(rss0)} idle, {mib(rss1)} with {held:,} idle HTTP/2 connections"
              f" held {hold:.0f} s: {rss1 - rss0:+,} KiB, {per:.1f} KiB per connection", flush=True)
        return {"rss_before_kib": rss0, "rss_with_conns_kib": rss1, "connections_requested": n,
                "connections_held": held, "failed": failed, "closed_by_server": closed,
                "kib_per_connection": round(per, 2), "open_seconds": round(secs, 1),
                "serving_while_held": alive_ok}
    finally:
        for s in socks:
            s.close()
        b.stop(svc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="meshproxy memory: growth under load, idle connections")
    ap.add_argument("--quick", action="store_true", help="200,000 requests instead of 1,000,000")
    ap.add_argument("--requests", type=int, help="total proxied requests for (a) (default 1,000,000)")
    ap.add_argument("--connections", type=int, default=10_000, help="idle connections for (b)")
    ap.add_argument("--hold", type=float, default=3.0, help="seconds to hold them before reading RSS")
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--target", default="meshproxy", choices=[t for t in h.TARGETS if t != "direct"])
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    o = ap.parse_args(argv)
    total = o.requests or (200_000 if o.quick else 1_000_000)
    if total < FIRST:
        ap.error(f"--requests must be at least {FIRST}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if inherited ignored
    want = o.connections + 1024
    limit = h.raise_nofile(want)
    n = o.connections
    if limit < want:
        n = max(limit - 1024, 0)
        h.loud(f"fd limit is {limit} (hard limit cannot be raised here): opening {n:,} connections, "
               f"not {o.connections:,}")
    problems: list[str] = []
    results: dict = {"target": o.target, "pinning": h.PINNING}
    try:
        with h.Bench(keep=o.keep, nofile=want) as b:
            origin = b.start_origin()
            print(f"origin on 127.0.0.1:{origin.port}; {o.target} on CPU {h.PROXY_CPU}; "
                  f"work dir {b.dir}", flush=True)
            if o.part in ("a", "both"):
                results["a"] = part_a(b, origin, o.target, total, problems)
            if o.part in ("b", "both"):
                results["b"] = part_b(b, origin, o.target, n, o.hold, problems)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    results["problems"] = problems
    if problems:
        h.loud(f"{len(problems)} PROBLEM(S):\n    " + "\n    ".join(problems))
    if o.json:
        Path(o.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {o.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
