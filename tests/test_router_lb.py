"""Route matching and load balancing: pure, so tested without a proxy.

Routes are built from the config dataclasses the loader produces; endpoints
are tiny stand-ins with the two things a balancer reads (active requests and
health). Randomness is seeded.
"""

from __future__ import annotations

import collections
import itertools
import random
from dataclasses import dataclass

import pytest

from meshproxy.config import HeaderMatch, Route, RouteMatch
from meshproxy.router import Router
from meshproxy.upstream.lb import LeastRequest, RoundRobin, make


def route(name: str, *, prefix: str | None = None, path: str | None = None, headers: tuple[HeaderMatch, ...] = ()) -> Route:
    return Route(name=name, match=RouteMatch(prefix=prefix, path=path, headers=headers), cluster=f"c-{name}")


def name_of(router: Router, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> str | None:
    r = router.match(path, headers or [])
    return r.name if r is not None else None


# ---------------------------------------------------------------------------
# Router


def test_first_match_wins() -> None:
    router = Router((route("api", prefix="/api"), route("all", prefix="/"), route("api-again", prefix="/api/v2")))
    assert name_of(router, "/api/v2/users") == "api"
    assert name_of(router, "/other") == "all"


def test_no_route_matches() -> None:
    router = Router((route("api", prefix="/api"), route("health", path="/health")))
    assert name_of(router, "/") is None
    assert Router(()).match("/", []) is None


def test_match_without_conditions_matches_everything() -> None:
    assert name_of(Router((route("any"),)), "/anything?x=1") == "any"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/health", "exact"),
        ("/health?verbose=1", "exact"),  # the query string is not part of an exact match
        ("/health?", "exact"),
        ("/healthz", "prefix"),
        ("/health/", "prefix"),
        ("/health/live?x=1", "prefix"),
        ("/Health", None),  # paths are case-sensitive
        ("/heal", None),
    ],
)
def test_exact_path_versus_prefix(path: str, expected: str | None) -> None:
    router = Router((route("exact", path="/health"), route("prefix", prefix="/health")))
    assert name_of(router, path) == expected


def test_prefix_is_a_plain_string_prefix() -> None:
    router = Router((route("grpc", prefix="/echo.Echo/"),))
    assert name_of(router, "/echo.Echo/Say") == "grpc"
    assert name_of(router, "/echo.EchoV2/Say") is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-canary", b"1")], "exact"),
        ([(b"x-canary", b"10")], "prefix"),  # not exact, but starts with "1"
        ([(b"x-canary", b"2")], "present"),
        ([(b"x-canary", b"")], "present"),
        ([(b"x-other", b"1")], "absent"),
        ([], "absent"),
    ],
)
def test_header_exact_prefix_present(headers: list[tuple[bytes, bytes]], expected: str) -> None:
    router = Router(
        (
            route("exact", prefix="/", headers=(HeaderMatch("x-canary", exact="1"),)),
            route("prefix", prefix="/", headers=(HeaderMatch("x-canary", prefix="1"),)),
            route("present", prefix="/", headers=(HeaderMatch("x-canary", present=True),)),
            route("absent", prefix="/", headers=(HeaderMatch("x-canary", present=False),)),
        )
    )
    assert name_of(router, "/", headers) == expected


def test_every_header_rule_must_hold() -> None:
    both = (HeaderMatch("x-a", exact="1"), HeaderMatch("x-b", present=True))
    router = Router((route("both", prefix="/", headers=both), route("fallback", prefix="/")))
    assert name_of(router, "/", [(b"x-b", b"z"), (b"x-a", b"1")]) == "both"
    assert name_of(router, "/", [(b"x-a", b"1")]) == "fallback"
    assert name_of(router, "/", [(b"x-b", b"z"), (b"x-a", b"2")]) == "fallback"


def test_path_and_headers_must_both_hold() -> None:
    router = Router(
        (
            route("canary-api", prefix="/api", headers=(HeaderMatch("x-canary", exact="1"),)),
            route("api", prefix="/api"),
        )
    )
    assert name_of(router, "/api/x", [(b"x-canary", b"1")]) == "canary-api"
    assert name_of(router, "/web", [(b"x-canary", b"1")]) is None


def test_header_rule_reads_the_first_value() -> None:
    router = Router((route("exact", prefix="/", headers=(HeaderMatch("x-canary", exact="1"),)),))
    assert name_of(router, "/", [(b"x-canary", b"1"), (b"x-canary", b"0")]) == "exact"


# ---------------------------------------------------------------------------
# Load balancers


@dataclass
class Endpoint:
    active_requests: int = 0
    up: bool = True

    def healthy(self, now: float) -> bool:
        return self.up


NOW = 100.0


def picks(balancer: RoundRobin | LeastRequest, items: list[Endpoint], n: int, exclude: set[int] | None = None) -> list[int | None]:
    return [balancer.pick(items, NOW, exclude or set()) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_round_robin_cycles(seed: int) -> None:
    items = [Endpoint() for _ in range(4)]
    got = picks(RoundRobin(random.Random(seed)), items, 12)
    assert all(i is not None for i in got)
    assert collections.Counter(got) == {0: 3, 1: 3, 2: 3, 3: 3}
    for a, b in itertools.pairwise(got):
        assert b == (a + 1) % 4  # type: ignore[operator]


def test_round_robin_start_depends_on_the_seed() -> None:
    items = [Endpoint() for _ in range(16)]
    firsts = {RoundRobin(random.Random(seed)).pick(items, NOW, set()) for seed in range(20)}
    assert len(firsts) > 1  # sidecars do not all start at endpoint 0


def test_round_robin_skips_excluded() -> None:
    items = [Endpoint() for _ in range(3)]
    got = picks(RoundRobin(random.Random(3)), items, 10, exclude={1})
    assert 1 not in got
    assert collections.Counter(got) == {0: 5, 2: 5}


def test_round_robin_skips_unhealthy() -> None:
    items = [Endpoint(), Endpoint(up=False), Endpoint(up=False), Endpoint()]
    got = picks(RoundRobin(random.Random(5)), items, 10)
    assert collections.Counter(got) == {0: 5, 3: 5}


def test_round_robin_falls_back_to_unhealthy_when_nothing_else() -> None:
    items = [Endpoint(up=False), Endpoint(up=False), Endpoint()]
    rr = RoundRobin(random.Random(0))
    assert picks(rr, items, 5, exclude={2}) != [None] * 5
    assert set(picks(rr, items, 5, exclude={2})) <= {0, 1}


def test_round_robin_spreads_when_every_endpoint_is_unhealthy() -> None:
    """Panic mode: with no healthy endpoint, load still rotates (as LeastRequest
    spreads over every candidate) instead of piling onto one endpoint."""
    items = [Endpoint(up=False) for _ in range(3)]
    got = picks(RoundRobin(random.Random(0)), items, 6)
    assert collections.Counter(got) == {0: 2, 1: 2, 2: 2}


def test_round_robin_nothing_left() -> None:
    items = [Endpoint(), Endpoint()]
    assert RoundRobin(random.Random(0)).pick(items, NOW, {0, 1}) is None
    assert RoundRobin(random.Random(0)).pick([], NOW, set()) is None


def test_least_request_prefers_fewer_active() -> None:
    items = [Endpoint(active_requests=0), Endpoint(active_requests=10)]
    assert set(picks(LeastRequest(random.Random(1)), items, 50)) == {0}


def test_least_request_power_of_two_choices() -> None:
    items = [Endpoint(active_requests=n) for n in (7, 0, 3, 9)]
    counts = collections.Counter(picks(LeastRequest(random.Random(7)), items, 3000))
    # Endpoint 1 wins every pair it is in (half of all pairs); endpoint 3 wins none.
    assert counts[3] == 0
    assert counts[1] > counts[2] > counts[0]
    assert 0.4 < counts[1] / 3000 < 0.6


def test_least_request_is_reproducible_with_a_seed() -> None:
    items = [Endpoint(active_requests=n % 3) for n in range(6)]
    assert picks(LeastRequest(random.Random(9)), items, 50) == picks(LeastRequest(random.Random(9)), items, 50)


def test_least_request_skips_excluded_and_unhealthy() -> None:
    items = [Endpoint(active_requests=0, up=False), Endpoint(active_requests=0), Endpoint(active_requests=5), Endpoint()]
    got = picks(LeastRequest(random.Random(2)), items, 200, exclude={3})
    assert set(got) <= {1, 2}
    assert 0 not in got and 3 not in got


def test_least_request_single_candidate_and_none() -> None:
    items = [Endpoint(active_requests=100), Endpoint()]
    assert LeastRequest(random.Random(0)).pick(items, NOW, {1}) == 0
    assert LeastRequest(random.Random(0)).pick(items, NOW, {0, 1}) is None


def test_least_request_spreads_when_every_endpoint_is_unhealthy() -> None:
    items = [Endpoint(up=False) for _ in range(3)]
    assert set(picks(LeastRequest(random.Random(4)), items, 100)) == {0, 1, 2}


def test_make_picks_the_policy() -> None:
    assert isinstance(make("least_request", random.Random(0)), LeastRequest)
    assert isinstance(make("round_robin", random.Random(0)), RoundRobin)
