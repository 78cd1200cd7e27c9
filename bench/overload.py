"""Overload bench: offered load 2x capacity, mixed priorities, with and without the `overload` filter.

    python3 bench/overload.py                      # ~2 min; writes bench/overload-results-<date>.json
    python3 bench/overload.py --seconds 10 --json /tmp/o.json

The backend is a grpcio server with a fixed pool of workers and a fixed service
time (a capacity of workers / service time calls a second); it skips calls whose
client has already cancelled them, as a well-behaved gRPC server does. The proxy
(meshproxy, an egress listener, one route) runs on CPU 0; the backend and the
load generator (grpc.aio, open loop: calls leave on schedule whatever happens to
the earlier ones) on CPU 1.

Steps, each against a fresh proxy: (1) capacity, closed loop through the proxy
without the filter; (2) unloaded: 30% of capacity, mixed priorities; (3) 2x
capacity, mixed priorities (20% priority 0, 30% no header = default 5, 50%
priority 9), without and with `{name: overload, priority: {header: x-priority,
default: 5}}` (every other option at its default). Each call has a 1 s deadline.
Goodput: calls answered OK per second. p99: of the calls answered OK.

The targets (issue 8): under 2x overload, priority-0 calls keep p99 within 2x their
unloaded p99 and succeed >= 99%, and goodput stays >= 90% of capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import harness as h

UNARY = "/echo.Echo/Unary"
MIX = ((0, 0.2), (None, 0.3), (9, 0.5))  # priority (None: no header, the default 5), share
DEADLINE = 1.0
OVERLOAD_FILTER = "      - {name: overload, priority: {header: x-priority, default: 5}}\n"


def serve_backend(port: int, workers: int, service: float) -> None:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if not context.is_active():
            return b""  # cancelled while it queued: no work for a caller that left
        time.sleep(service)
        return request

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def overload_filter(tolerance: float | None) -> str:
    if tolerance is None:
        return OVERLOAD_FILTER
    return OVERLOAD_FILTER.replace(
        "default: 5}}", f"default: 5}}, limit: {{tolerance: {tolerance}}}}}"
    )


def proxy_conf(
    port: int, admin: int, backend: int, with_filter: bool, tolerance: float | None = None
) -> str:
    filters = "    filters:\n" + overload_filter(tolerance) if with_filter else "    filters: []\n"
    return f"""\
node: {{service: bench, unit: u1}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: {{enabled: false}}
listeners:
  - name: bench
    direction: ingress
    address: "127.0.0.1:{port}"
    protocol: http2
{filters}    routes:
      - match: {{prefix: /}}
        cluster: backend
        timeout: 5s
clusters:
  - name: backend
    protocol: http2
    endpoints: ["127.0.0.1:{backend}"]
"""


# -- the load generator (runs in this process, pinned to the load CPU) ------------------------


async def closed_loop(port: int, callers: int, seconds: float) -> float:
    """Calls answered OK per second with `callers` calling back to back."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(UNARY)
        end = time.monotonic() + seconds
        ok = 0

        async def caller() -> None:
            nonlocal ok
            while time.monotonic() < end:
                try:
                    await call(b"x", timeout=DEADLINE)
                    ok += 1
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.001)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return ok / seconds


async def open_loop(port: int, rate: float, seconds: float, warmup: float, seed: int = 1) -> dict:
    """Calls at `rate` a second for warmup + seconds; results of those sent after the warmup."""
    rng = random.Random(seed)
    records: list[tuple[int, str, float]] = []  # (priority, status, latency)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(UNARY)

        async def one(priority: int | None, keep: bool) -> None:
            metadata = (("x-priority", str(priority)),) if priority is not None else ()
            t0 = time.perf_counter()
            try:
                await call(b"x", metadata=metadata, timeout=DEADLINE)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            if keep:
                records.append(
                    (5 if priority is None else priority, code, time.perf_counter() - t0)
                )

        tasks = []
        start = time.monotonic()
        total = int(rate * (warmup + seconds))
        for i in range(total):
            at = start + i / rate
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            r = rng.random()
            acc = 0.0
            priority: int | None = None
            for p, share in MIX:
                acc += share
                if r < acc:
                    priority = p
                    break
            tasks.append(asyncio.ensure_future(one(priority, i / rate >= warmup)))
        late = time.monotonic() - (start + total / rate)
        await asyncio.gather(*tasks)
    return summarise(records, seconds, rate, late)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def summarise(
    records: list[tuple[int, str, float]], seconds: float, rate: float, late: float
) -> dict:
    out: dict = {
        "offered_per_s": rate,
        "seconds": seconds,
        "generator_late_s": round(late, 3),
        "by_priority": {},
    }
    ok_total = 0
    for p in (0, 5, 9):
        mine = [r for r in records if r[0] == p]
        ok = [lat for _, code, lat in mine if code == "OK"]
        ok_total += len(ok)
        codes: dict[str, int] = {}
        for _, code, _ in mine:
            codes[code] = codes.get(code, 0) + 1
        out["by_priority"][str(p)] = {
            "sent": len(mine),
            "ok": len(ok),
            "success": round(len(ok) / len(mine), 4) if mine else None,
            "goodput_per_s": round(len(ok) / seconds, 1),
            "p50_ms": ms(pct(ok, 0.5)),
            "p99_ms": ms(pct(ok, 0.99)),
            "codes": codes,
        }
    out["goodput_per_s"] = round(ok_total / seconds, 1)
    return out


# -- the run -----------------------------------------------------------------------------------


def start_proxy(
    b: h.Bench, backend: int, with_filter: bool, tolerance: float | None = None
) -> h.Service:
    port, admin = h.free_port(), h.free_port()
    name = "meshproxy-overload" if with_filter else "meshproxy"
    conf = b.dir / f"{name}.yaml"
    conf.write_text(proxy_conf(port, admin, backend, with_filter, tolerance))
    svc = b.start(name, h.meshproxy_argv(conf), port, h.PROXY_CPU, admin=admin)
    b.wait_ready(svc)
    return svc


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        a = argparse.ArgumentParser()
        a.add_argument("backend")
        a.add_argument("--port", type=int, required=True)
        a.add_argument("--workers", type=int, required=True)
        a.add_argument("--service-ms", type=float, required=True)
        o = a.parse_args()
        serve_backend(o.port, o.workers, o.service_ms / 1000)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--service-ms", type=float, default=10.0)
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="measured seconds per overload step"
    )
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    ap.add_argument(
        "--tolerance", type=float, help="the filter's limit.tolerance (default: the filter's own)"
    )
    ap.add_argument("--json", metavar="FILE")
    o = ap.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if h.PINNING != "none":
        os.sched_setaffinity(0, {h.LOAD_CPU})
    else:
        h.loud("fewer than two CPUs: running unpinned")
    load_before = h.loadavg()
    results: dict = {}
    with h.Bench() as b:
        bport = h.free_port()
        backend = b.start(
            "backend",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "backend",
                "--port",
                str(bport),
                "--workers",
                str(o.workers),
                "--service-ms",
                str(o.service_ms),
            ],
            bport,
            h.LOAD_CPU,
        )
        b.wait_tcp(backend)
        nominal = o.workers / (o.service_ms / 1000)
        plain = start_proxy(b, bport, with_filter=False)
        asyncio.run(closed_loop(plain.port, o.workers * 2, 2.0))  # warm up
        capacity = asyncio.run(closed_loop(plain.port, o.workers * 2, 5.0))
        print(f"capacity through the proxy: {capacity:.0f}/s (nominal {nominal:.0f}/s)", flush=True)
        offered = o.factor * capacity
        results["unloaded_without_filter"] = asyncio.run(
            open_loop(plain.port, 0.3 * capacity, 8.0, 1.0)
        )
        print("unloaded, no filter:", json.dumps(results["unloaded_without_filter"]), flush=True)
        results["overload_without_filter"] = asyncio.run(
            open_loop(plain.port, offered, o.seconds, o.warmup)
        )
        print("2x, no filter:", json.dumps(results["overload_without_filter"]), flush=True)
        b.stop(plain)
        filtered = start_proxy(b, bport, with_filter=True, tolerance=o.tolerance)
        results["unloaded_with_filter"] = asyncio.run(
            open_loop(filtered.port, 0.3 * capacity, 8.0, 1.0)
        )
        print("unloaded, filter:", json.dumps(results["unloaded_with_filter"]), flush=True)
        results["overload_with_filter"] = asyncio.run(
            open_loop(filtered.port, offered, o.seconds, o.warmup)
        )
        print("2x, filter:", json.dumps(results["overload_with_filter"]), flush=True)
        metrics = ""
        try:
            import urllib.request

            with urllib.request.urlopen(
                f"http://127.0.0.1:{filtered.admin}/metrics", timeout=5
            ) as r:
                metrics = r.read().decode()
        except OSError as e:
            h.warn(f"metrics: {e}")
        results["filter_metrics"] = [
            line
            for line in metrics.splitlines()
            if line.startswith(("meshproxy_overload_shed_total", "meshproxy_overload_limit"))
        ]
    unloaded_p99 = results["unloaded_with_filter"]["by_priority"]["0"]["p99_ms"]
    loaded = results["overload_with_filter"]
    high = loaded["by_priority"]["0"]
    targets = {
        "high_p99_within_2x_unloaded": {
            "unloaded_p99_ms": unloaded_p99,
            "overload_p99_ms": high["p99_ms"],
            "ratio": round(high["p99_ms"] / unloaded_p99, 2)
            if high["p99_ms"] and unloaded_p99
            else None,
        },
        "high_success_ge_99pct": {"success": high["success"]},
        "goodput_ge_90pct_of_capacity": {
            "goodput_per_s": loaded["goodput_per_s"],
            "capacity_per_s": round(capacity, 1),
            "ratio": round(loaded["goodput_per_s"] / capacity, 3),
        },
    }
    targets["high_p99_within_2x_unloaded"]["met"] = bool(
        targets["high_p99_within_2x_unloaded"]["ratio"]
        and targets["high_p99_within_2x_unloaded"]["ratio"] <= 2.0
    )
    targets["high_success_ge_99pct"]["met"] = bool(high["success"] and high["success"] >= 0.99)
    targets["goodput_ge_90pct_of_capacity"]["met"] = (
        targets["goodput_ge_90pct_of_capacity"]["ratio"] >= 0.9
    )
    print("\ntargets:", json.dumps(targets, indent=1))
    out = {
        "started": started,
        "method": {
            **vars(o),
            "mix": [[p if p is not None else "default(5)", s] for p, s in MIX],
            "deadline_s": DEADLINE,
            "pinning": h.PINNING,
            "filter": overload_filter(o.tolerance).strip(),
        },
        "loadavg_before": load_before,
        "loadavg_after": h.loadavg(),
        "capacity_per_s": round(capacity, 1),
        "nominal_capacity_per_s": nominal,
        "results": results,
        "targets": targets,
    }
    path = Path(o.json) if o.json else h.HERE / f"overload-results-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
