"""Where an enforce risk check's time goes: CPU per check at each layer, in-process.

    python3 bench/risk_cost.py --json risk-cost.json

bench/risk_run.py measures what enforce mode adds to a proxied call; this
says which layer the time is spent in, to aim work at. One process, pinned
to the proxy's CPU, against the bench's origin nginx (the same fixed JSON
verdict, on the load CPU), runs the real App and measures, as thread CPU per
check (the lowest of --reps runs of --n checks each):

    filter         RiskControlFilter.on_request on a fresh Call (a whole check)
    filter_own     the same with the client's check answering at once (no I/O)
    client         RiskClient.check (encode, pick, exchange, decode)
    lean_exchange  the lean connections' exchange_many of one encoded check
    floor          the lean codec over a bare non-blocking socket: request,
                   send, trio.lowlevel.wait_readable, recv, receive: what any
                   trio exchange costs here, with nothing around it

Then --rounds rounds of h2load at concurrency 1 (p50 of --calls calls) against
two listeners of that App, one plain and one with the enforce filter,
alternating: their difference is the check inside a whole proxied call, which
costs more than the same check alone (the call's work keeps the caches cold).
Each round also takes the wall-clock p50 of --calls exchanges of the floor,
of the same codec over a blocking socket (no trio: the event loop's share),
and of the risk service itself as risk_run.py measures it (h2load POSTing
the check): what the floor alone adds beyond the risk service bounds what
any Python enforce check can reach on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import harness as h
import trio
from prometheus_client import CollectorRegistry

from meshproxy import risk
from meshproxy.app import App
from meshproxy.call import Call, EmptyBody, Peer, Protocol
from meshproxy.codec.unary_h2 import UnaryClient
from meshproxy.config import load
from meshproxy.filters.base import CONTINUE

CONF = """\
node: {{service: api, unit: u1}}
admin: {{address: "127.0.0.1:0"}}
access_log: {{enabled: false}}
listeners:
  - name: plain
    direction: egress
    address: "127.0.0.1:{plain}"
    protocol: http2
    routes:
      - match: {{prefix: /}}
        cluster: origin
  - name: risk
    direction: egress
    address: "127.0.0.1:{risk}"
    protocol: http2
    filters:
      - {{name: risk_control, cluster: risk, mode: enforce, timeout: 50ms, failure_mode: deny, protocol: json}}
    routes:
      - match: {{prefix: /}}
        cluster: origin
clusters:
  - {{name: risk, protocol: http2, endpoints: ["127.0.0.1:{origin}"]}}
  - {{name: origin, protocol: http2, endpoints: ["127.0.0.1:{origin}"]}}
"""
HEADERS = [(b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*")]
WARMUP = 300


async def cpu_per_call(fn: Callable[[], Awaitable[object]], n: int, reps: int) -> float:
    """Thread CPU µs per await of fn(), the lowest of `reps` runs (the VM's noise only adds)."""
    for _ in range(WARMUP):
        await fn()
    runs = []
    for _ in range(reps):
        start = time.thread_time()
        for _ in range(n):
            await fn()
        runs.append((time.thread_time() - start) / n * 1e6)
    return round(min(runs), 1)


def floor_exchange(sock: socket.socket, headers: list[tuple[bytes, bytes]], body: bytes, blocking: bool = False
                   ) -> Callable[[], Awaitable[None]]:
    """`blocking`: a blocking recv in place of trio's readiness wait (a bench only: it stalls the loop)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if blocking:
        sock.settimeout(5)
    else:
        sock.setblocking(False)
    codec = UnaryClient(risk.MAX_REPLY_BYTES)
    wait = trio.lowlevel.wait_readable

    async def one() -> None:
        response = codec.request(headers, body)
        sock.sendall(codec.data_to_send())
        while not response.ended:
            if not blocking:
                await wait(sock)
            codec.receive(sock.recv(65536))
            out = codec.data_to_send()
            if out:
                sock.sendall(out)
        if response.error is not None or response.head is None or response.head[0] != (b":status", b"200"):
            raise RuntimeError(f"floor: bad reply {response}")

    return one


def headers_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return f"{name.decode()}: {dict(headers)[name].decode()}"


async def wall_p50(fn: Callable[[], Awaitable[None]], n: int) -> int:
    """The p50 in µs of n awaits of fn(), wall clock."""
    lat = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - start)
    lat.sort()
    return round(lat[n // 2] * 1e6)


async def p50(url: str, n: int, log: Path, extra: tuple[str, ...] = ()) -> int:
    log.unlink(missing_ok=True)
    r, out = await trio.to_thread.run_sync(
        lambda: h.h2load([*extra, "-n", str(n), "-c", "1", "--log-file", str(log), url], 120))
    lines = log.read_text().splitlines() if log.exists() else []
    if r.get("exit") != 0 or len(lines) != n or {line.split("\t")[1] for line in lines} != {"200"}:
        raise RuntimeError(f"h2load {url} failed\n{out}")
    lat = sorted(int(line.split("\t")[2]) for line in lines)
    return lat[len(lat) // 2]


async def measure(o: argparse.Namespace, b: h.Bench, origin: int) -> dict[str, object]:
    ports = {"plain": h.free_port(), "risk": h.free_port()}
    conf = b.dir / "risk-cost.yaml"
    conf.write_text(CONF.format(origin=origin, **ports))
    app = App(load(str(conf)), CollectorRegistry())
    result: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        f = app.listeners["risk"].proxy.state.chain.filters[0]
        client = f.client
        cluster = client.cluster

        def call() -> Call:
            return Call(1, Protocol.HTTP2, Peer("127.0.0.1:1"), "risk", "egress", "origin", "GET", "/small",
                        HEADERS, EmptyBody(), trio.current_time() + 10, request_id="rid-1")

        request = await f.check_request(call())
        headers, body = client._encode(request, trio.current_time() + 10)

        async def whole() -> None:
            # failure_mode is deny: a failed check (cheaper than a real one) stops the run here.
            if await f.on_request(call()) is not CONTINUE:
                raise RuntimeError("the check did not allow: the figures would not be a check's")

        async def check() -> None:
            await client.check(request, trio.current_time() + 1)

        async def lean() -> None:
            (r,) = await cluster.lean.exchange_many(cluster.pools[0].address,
                                                    [client._encode(request, trio.current_time() + 1)],
                                                    risk.MAX_REPLY_BYTES, trio.current_time() + 1)
            if r.error is not None or r.head is None or r.head[0] != (b":status", b"200"):
                raise RuntimeError(f"lean exchange: bad reply {r}")

        allow = risk.Verdict(risk.ALLOW)

        async def instant(r: risk.CheckRequest, deadline: float, charge_timeout: bool = True) -> risk.Verdict:
            return allow

        cpu = {"filter": await cpu_per_call(whole, o.n, o.reps)}
        client.check = instant  # type: ignore[method-assign]
        cpu["filter_own"] = await cpu_per_call(whole, o.n, o.reps)
        del client.check
        cpu["client"] = await cpu_per_call(check, o.n, o.reps)
        cpu["lean_exchange"] = await cpu_per_call(lean, o.n, o.reps)
        with socket.create_connection(("127.0.0.1", origin)) as sock:
            cpu["floor"] = await cpu_per_call(floor_exchange(sock, headers, body), o.n, o.reps)
        print("CPU µs per check:", json.dumps(cpu), flush=True)
        result["cpu_us_per_check"] = cpu

        check_body = b.dir / "risk-check-body"
        check_body.write_bytes(body)
        risk_service = (f"http://127.0.0.1:{origin}/v1/risk/check", "-d", str(check_body),
                        "-H", headers_value(headers, b"content-type"))
        urls = {name: f"http://127.0.0.1:{port}/small" for name, port in ports.items()}
        rounds: dict[str, list[int]] = {"plain": [], "risk": [], "risk_service": [], "floor": [], "floor_blocking": []}
        with socket.create_connection(("127.0.0.1", origin)) as sock, \
                socket.create_connection(("127.0.0.1", origin)) as blocking:
            floor = floor_exchange(sock, headers, body)
            floor_blocking = floor_exchange(blocking, headers, body, blocking=True)
            for name, url in urls.items():  # warm both listeners' connections
                await p50(url, 500, b.dir / f"lat-{name}.log")
            for i in range(o.rounds):
                for name, url in urls.items():
                    rounds[name].append(await p50(url, o.calls, b.dir / f"lat-{name}.log"))
                rounds["risk_service"].append(await p50(risk_service[0], o.calls, b.dir / "lat-risk-service.log",
                                                        risk_service[1:]))
                rounds["floor"].append(await wall_p50(floor, o.calls))
                rounds["floor_blocking"].append(await wall_p50(floor_blocking, o.calls))
                print(f"round {i + 1}: p50 µs", json.dumps({k: v[-1] for k, v in rounds.items()}), flush=True)

        def median_gap(a: str, b: str) -> float:
            return statistics.median(x - y for x, y in zip(rounds[a], rounds[b], strict=True))

        result["p50_us"] = rounds
        if o.rounds:
            result["check_in_a_call_us"] = median_gap("risk", "plain")
            result["floor_beyond_risk_service_us"] = median_gap("floor", "risk_service")
            result["floor_blocking_beyond_risk_service_us"] = median_gap("floor_blocking", "risk_service")
            result["enforce_beyond_risk_service_us"] = statistics.median(
                r - p - s for r, p, s in zip(rounds["risk"], rounds["plain"], rounds["risk_service"], strict=True))
            print("medians of the rounds (µs):", json.dumps({k: v for k, v in result.items() if k.endswith("_us")}))
        nursery.cancel_scope.cancel()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="checks per CPU measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="h2load rounds per listener")
    ap.add_argument("--calls", type=int, default=3000, help="calls per h2load round")
    ap.add_argument("--json", metavar="FILE")
    o = ap.parse_args()
    if h.PINNING != "none":
        os.sched_setaffinity(0, {h.PROXY_CPU})
    else:
        h.warn("cannot pin to CPUs: figures are noisier")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with h.Bench(nofile=65536) as b:
        origin = b.start_origin()
        result = trio.run(measure, o, b, origin.port)
    if o.json:
        Path(o.json).write_text(json.dumps({"started": started, "method": vars(o), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
