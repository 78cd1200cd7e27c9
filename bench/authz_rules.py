"""Micro-benchmark: the authz filter's on_request with 1 rule and with 50 rules.

    python bench/authz_rules.py [--calls 200000]

Pure Python timing on a synthetic gRPC Call, no servers. The 50-rule set
mixes principals (exact and globs), path prefixes, methods, services,
source units and headers; the call matches only the last rule, so every
rule is tried (the worst case for first-match-wins), and a second run has
it match none (the default). Decisions are cached by what the rules look
at, so repeated calls mostly cost the lookup; the last line gives every
call a new path, so each one runs the rules. The coroutine never awaits, so it is driven
with send(None) and the event loop's cost is left out. Metrics are bound
(a fresh registry), as in the proxy.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry

from meshproxy.call import Call, EmptyBody, Peer, Protocol
from meshproxy.filters.authz import AuthzFilter
from meshproxy.filters.base import FilterContext
from meshproxy.metrics import Metrics

PRINCIPAL = "spiffe://mesh/ns/default/sa/frontend"


def rules(n: int, last_matches: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n - 1):
        kind = i % 5
        if kind == 0:
            out.append({"name": f"r{i}", "action": "allow", "principals": [f"spiffe://mesh/ns/team{i}/sa/*"]})
        elif kind == 1:
            out.append({"name": f"r{i}", "action": "deny", "paths": [f"/svc{i}.Admin/", f"/svc{i}.Debug/Dump"]})
        elif kind == 2:
            out.append({"name": f"r{i}", "action": "allow", "principals": [PRINCIPAL], "methods": [f"M{i}"]})
        elif kind == 3:
            out.append({"name": f"r{i}", "action": "allow", "headers": {"x-tenant": f"t{i}*"}, "services": ["api"]})
        else:
            out.append({"name": f"r{i}", "action": "deny", "source_units": [f"u{i}"], "paths": ["/echo.Echo/"]})
    last: dict[str, Any] = {"name": "last", "action": "allow", "principals": ["spiffe://mesh/ns/*/sa/frontend"],
                            "paths": ["/echo.Echo/"]}
    if not last_matches:
        last["paths"] = ["/other.Svc/"]
    out.append(last)
    return out


def make_filter(n: int, last_matches: bool = True) -> AuthzFilter:
    f = AuthzFilter.from_options({"default": "allow", "rules": rules(n, last_matches)})
    f.bind(FilterContext("in", "ingress", "api", "", Metrics.create(CollectorRegistry())))
    return f


def make_call(path: str = "/echo.Echo/Unary") -> Call:
    call = Call(
        id=1, protocol=Protocol.GRPC, peer=Peer("127.0.0.1:5555"), listener="in", direction="ingress",
        authority="api:8080", method="POST", path=path,
        headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"x-tenant", b"zzz"),
                 (b"x-mesh-unit", b"u1"), (b"x-request-id", b"0123456789abcdef")],
        body=EmptyBody(), start=0.0,
    )
    call.principal = PRINCIPAL
    return call


def per_call_us(f: AuthzFilter, calls: int, fresh_paths: bool = False) -> float:
    best = float("inf")
    for r in range(7):
        batch = [make_call(f"/echo.Echo/M{r}_{i}" if fresh_paths else "/echo.Echo/Unary") for i in range(calls // 7)]
        start = time.perf_counter()
        for call in batch:
            coro = f.on_request(call)
            try:
                coro.send(None)
            except StopIteration:
                pass
        best = min(best, (time.perf_counter() - start) / len(batch))
    return best * 1e6


def baseline_us(calls: int) -> float:
    """Building nothing, running nothing: the loop and the coroutine protocol alone."""

    async def nothing(call: Call) -> None:
        return None

    best = float("inf")
    for _ in range(7):
        batch = [make_call() for _ in range(calls // 7)]
        start = time.perf_counter()
        for call in batch:
            coro = nothing(call)
            try:
                coro.send(None)
            except StopIteration:
                pass
        best = min(best, (time.perf_counter() - start) / len(batch))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    a = parser.parse_args()
    # The proxy raises gen-0's threshold (app.py); a collection in a timed batch is noise here.
    gc.collect()
    gc.disable()
    base = baseline_us(a.calls)
    print(f"loop + coroutine alone:           {base:6.2f} us/call")
    for label, f in [
        ("1 rule (matches)", make_filter(1)),
        ("50 rules (the last matches)", make_filter(50)),
        ("50 rules (none, the default)", make_filter(50, last_matches=False)),
    ]:
        print(f"{label:33s} {per_call_us(f, a.calls):6.2f} us/call")
    # Every call a path never seen: the decision cache misses, all 50 rules are evaluated.
    print(f"{'50 rules, no cache hits':33s} {per_call_us(make_filter(50), a.calls, fresh_paths=True):6.2f} us/call")


if __name__ == "__main__":
    main()
