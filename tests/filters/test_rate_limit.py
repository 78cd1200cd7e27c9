"""rate_limit: the bucket arithmetic (sans-IO, `now` passed in), then the filter under trio's MockClock.

The arithmetic is checked against reference models written the textbook way,
in exact fractions (a bucket of tokens refilled continuously; a queue of turns
one interval apart), over arrival patterns hypothesis draws. The filter tests
count exactly what passes under a clock that only moves when the test says.
End-to-end tests with real peers are tests/test_rate_limit_e2e.py.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meshproxy import status
from meshproxy.call import Call, EmptyBody, Peer, Protocol
from meshproxy.config import ConfigError, Route, RouteMatch, load
from meshproxy.filters import FILTER_TYPES
from meshproxy.filters.base import CONTINUE, FilterContext, FilterOptionError, Respond
from meshproxy.filters.rate_limit import (
    PAST_DEADLINE,
    QUEUE_FULL,
    TABLE_FULL,
    LeakyBuckets,
    RateLimitFilter,
    TokenBuckets,
)
from meshproxy.metrics import Metrics

# -- the bucket arithmetic ---------------------------------------------------------------------


def reference_token_bucket(rate: int, burst: int, arrivals_ms: list[int]) -> list[bool]:
    """A bucket of `burst` tokens refilled continuously at `rate`/s, in exact arithmetic."""
    tokens, last, out = Fraction(burst), Fraction(0), []
    for ms in arrivals_ms:
        now = Fraction(ms, 1000)
        tokens = min(Fraction(burst), tokens + (now - last) * rate)
        last = now
        out.append(tokens >= 1)
        if tokens >= 1:
            tokens -= 1
    return out


def reference_queue(rate: int, burst: int, arrivals_ms: list[int]) -> list[Fraction | None]:
    """Turns one interval apart; a call gets the next free turn while fewer than
    `burst` calls hold turns still to come, else none (None). Exact arithmetic."""
    interval, turns, out = Fraction(1, rate), list[Fraction](), []
    for ms in arrivals_ms:
        now = Fraction(ms, 1000)
        waiting = sum(turn > now for turn in turns)
        if waiting >= burst:
            out.append(None)
            continue
        turn = max(now, turns[-1] + interval) if turns else now
        turns.append(turn)
        out.append(turn)
    return out


# Arrivals as gaps in whole milliseconds: runs of simultaneous calls, short and long quiet spells.
arrival_gaps = st.lists(
    st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 3000)), min_size=1, max_size=200
)


def arrivals(gaps: list[int]) -> list[int]:
    out, t = [], 0
    for gap in gaps:
        t += gap
        out.append(t)
    return out


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 50), burst=st.integers(1, 12), gaps=arrival_gaps)
def test_token_bucket_decides_as_the_exact_model(rate: int, burst: int, gaps: list[int]) -> None:
    at = arrivals(gaps)
    b = TokenBuckets(rate, burst)
    assert [b.take("k", ms / 1000) == 0.0 for ms in at] == reference_token_bucket(rate, burst, at)


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 50), burst=st.integers(1, 12), gaps=arrival_gaps)
def test_leaky_bucket_queues_as_the_exact_model(rate: int, burst: int, gaps: list[int]) -> None:
    at = arrivals(gaps)
    q = LeakyBuckets(rate, burst)
    got = [q.reserve("k", ms / 1000) for ms in at]
    want = reference_queue(rate, burst, at)
    assert [reason is None for reason, _ in got] == [turn is not None for turn in want]
    assert [turn for (reason, turn) in got if reason is None] == pytest.approx(
        [float(turn) for turn in want if turn is not None], abs=1e-9
    )


def offer(
    buckets: TokenBuckets, per_second: int, seconds: float, start: float = 0.0
) -> list[float]:
    """Offer calls evenly at `per_second` for `seconds`; the times of those that got a token."""
    times = [start + i / per_second for i in range(round(per_second * seconds))]
    return [t for t in times if buckets.take("k", t) == 0.0]


def test_token_bucket_admits_the_burst_then_exactly_the_rate() -> None:
    b = TokenBuckets(rate=4, burst=3)  # a token every 0.25 s: exact in binary
    got = offer(b, 64, 10.0)  # 640 calls offered over 10 s
    # The burst at once, then one per refill: 3 + 39 (the refills at 0.25 ... 9.75).
    assert got == [0.0, 1 / 64, 2 / 64, *(k / 4 for k in range(1, 40))]
    # A long quiet spell refills it to the burst, never beyond.
    assert offer(b, 1000, 0.2, start=100.0) == [100.0, 100.001, 100.002]


def test_token_bucket_at_a_rate_floats_cannot_hold() -> None:
    b = TokenBuckets(rate=10, burst=5)  # 0.1 s is not exact in binary
    got = offer(b, 100, 10.0)
    assert len(got) == 5 + 99  # the burst, then 0.1, 0.2 ... 9.9
    assert got == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, *(k / 10 for k in range(1, 100))])


def test_token_bucket_says_when_the_next_token_comes() -> None:
    b = TokenBuckets(rate=4, burst=2)
    assert [b.take("k", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert b.take("k", 0.0) == pytest.approx(0.25)
    assert b.take("k", 0.1) == pytest.approx(0.15)  # a refusal takes nothing
    assert b.take("k", 0.25) == 0.0


def test_token_bucket_edge_survives_float_drift() -> None:
    b = TokenBuckets(rate=3, burst=3)  # 1/3 s: not exact in binary
    admitted = 0
    for i in range(3000):
        now = i / 3  # exactly on each refill
        admitted += b.take("k", now) == 0.0
        admitted += b.take("k", now) == 0.0  # two offered per tick, one refilled
    # The burst, then one per tick: no tick loses its token to rounding.
    assert admitted == 3 + 2999


def test_leaky_bucket_spaces_calls_and_refuses_past_the_queue() -> None:
    q = LeakyBuckets(rate=10, burst=3)
    got = [q.reserve("k", 0.0) for _ in range(6)]
    # One leaves now, three wait, the rest are refused.
    assert [reason for reason, _ in got] == [None, None, None, None, QUEUE_FULL, QUEUE_FULL]
    assert [at for _, at in got[:4]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert got[4][1] == pytest.approx(0.1)  # a place frees up when the first waiting call leaves
    # Later arrivals queue behind, one interval apart, never closer.
    assert q.reserve("k", 0.15) == (None, pytest.approx(0.4))
    assert q.reserve("k", 2.0) == (None, 2.0)  # the queue drained: straight through


def test_leaky_bucket_admits_exactly_the_rate_under_sustained_load() -> None:
    q = LeakyBuckets(rate=4, burst=2)
    turns = [at for i in range(640) for reason, at in [q.reserve("k", i / 64)] if reason is None]
    # 64 calls a second for 10 s: a turn every 0.25 s, none skipped, up to the
    # last one the call at 9.984 could still queue for (at most 2 turns ahead: 10.25).
    assert turns == [k / 4 for k in range(42)]


def test_leaky_bucket_refuses_a_turn_past_the_deadline_and_keeps_it() -> None:
    q = LeakyBuckets(rate=10, burst=5)
    q.reserve("k", 0.0)
    q.reserve("k", 0.0)  # the next turn is at 0.2
    assert q.reserve("k", 0.0, deadline=0.15) == (PAST_DEADLINE, pytest.approx(0.2))
    # The refused call took no turn.
    assert q.reserve("k", 0.0, deadline=1.0) == (None, pytest.approx(0.2))
    # A call that need not wait is not refused for its deadline: the proxy times it out, not the limit.
    assert q.reserve("other", 5.0, deadline=4.0) == (None, 5.0)


def test_leaky_bucket_gives_back_the_last_turn_only() -> None:
    q = LeakyBuckets(rate=10, burst=5)
    _, first = q.reserve("k", 0.0)
    _, second = q.reserve("k", 0.0)
    _, third = q.reserve("k", 0.0)
    q.cancel("k", second)  # a call waits behind it: the gap stays
    assert q.reserve("k", 0.0)[1] == pytest.approx(0.3)
    _, fourth = q.reserve("k", 0.0)
    q.cancel("k", fourth)  # the last: the next call takes its turn
    assert q.reserve("k", 0.0)[1] == pytest.approx(fourth)
    assert first == 0.0 and third == pytest.approx(0.2)


def test_key_table_is_bounded_least_recently_used_out() -> None:
    b = TokenBuckets(rate=1, burst=1, max_keys=3)
    for key in "abc":
        assert b.take(key, 0.0) == 0.0
    assert b.take("a", 0.0) > 0  # touches a: b is now the oldest
    assert b.take("d", 0.0) == 0.0
    assert len(b) == 3 and "b" not in b and "a" in b
    assert b.take("b", 0.0) == 0.0  # forgotten: a full bucket again
    assert "c" not in b
    for i in range(10_000):
        b.take(i, 0.0)
    assert len(b) == 3


def test_leaky_table_never_forgets_a_key_with_calls_waiting() -> None:
    q = LeakyBuckets(rate=10, burst=3, max_keys=2)
    # a: 2 waiting, up to 0.2; b: 1 waiting, at 0.15.
    assert [q.reserve("a", 0.0)[0] for _ in range(3)] == [None, None, None]
    assert [q.reserve("b", 0.05)[0] for _ in range(2)] == [None, None]
    # A third key would push out a, whose calls still wait: refused until a's last one leaves.
    assert q.reserve("c", 0.1) == (TABLE_FULL, pytest.approx(0.2))
    assert len(q) == 2 and "c" not in q
    # From 0.2 a's last call has left (none waits): it may go, and c takes its place.
    assert q.reserve("c", 0.2) == (None, 0.2)
    assert "a" not in q and "b" in q and len(q) == 2
    # Keys with nothing waiting are forgotten as usual, however many come.
    for i in range(1000):
        assert q.reserve(i, 10.0 + i)[0] is None
    assert len(q) == 2


# -- the filter --------------------------------------------------------------------------------


def make(**options: Any) -> RateLimitFilter:
    base: dict[str, Any] = {"algorithm": "token_bucket", "rate": 10, "burst": 5}
    base.update(options)
    return RateLimitFilter.from_options({k: v for k, v in base.items() if v is not None})


def bound(f: RateLimitFilter, listener: str = "test") -> tuple[RateLimitFilter, CollectorRegistry]:
    registry = CollectorRegistry()
    f.bind(FilterContext(listener, metrics=Metrics.create(registry)))
    return f, registry


def limited(registry: CollectorRegistry, limit: str = "rate_limit") -> float:
    return (
        registry.get_sample_value(
            "meshproxy_rate_limited_total", {"listener": "test", "limit": limit}
        )
        or 0.0
    )


def call_with(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    protocol: Protocol = Protocol.HTTP2,
    identity: str | None = None,
    route: str | None = None,
    deadline: float = math.inf,
) -> Call:
    c = Call(
        1,
        protocol,
        Peer("127.0.0.1:1", identity),
        "test",
        "ingress",
        "svc",
        "POST",
        "/echo.Echo/Unary",
        headers or [],
        EmptyBody(),
        trio.current_time(),
        deadline=deadline,
    )
    if route is not None:
        c.route = Route(route, RouteMatch(prefix="/"), "backend")
    return c


def caller(name: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-caller", name.encode())]


async def admitted(f: RateLimitFilter, calls: list[Call]) -> list[bool]:
    return [(await f.on_request(c)) is CONTINUE for c in calls]


def test_the_config_contract_parses() -> None:
    f = FILTER_TYPES["rate_limit"].from_options(
        {"algorithm": "token_bucket", "rate": 100, "burst": 20, "key": {"header": "x-caller"}}
    )
    assert isinstance(f, RateLimitFilter)
    assert (
        f.algorithm,
        f.rate,
        f.burst,
        f.key_name,
        f.allow_missing,
        f.max_keys,
        f.limit_name,
        f.dry_run,
    ) == ("token_bucket", 100.0, 20, "header:x-caller", False, 10_000, "rate_limit", False)
    assert repr(f) == "<RateLimitFilter rate_limit token_bucket 100/s burst 20 key header:x-caller>"
    leaky = make(algorithm="leaky_bucket", key={"metadata": "X-Caller"}, max_keys=50)
    assert (leaky.key_name, leaky.max_keys) == ("metadata:x-caller", 50)


def test_period_and_burst_defaults() -> None:
    per_minute = make(rate=100, period="1m", burst=None)
    assert per_minute.rate == pytest.approx(100 / 60) and per_minute.burst == 2
    assert RateLimitFilter.from_options({"rate": 0.2}).burst == 1  # never 0
    assert RateLimitFilter.from_options({"rate": 50}).burst == 50
    assert RateLimitFilter.from_options({"rate": 2.5}).burst == 3
    assert RateLimitFilter.from_options({"rate": 5}).algorithm == "token_bucket"


async def test_token_bucket_admits_exactly_burst_plus_rate(
    mock_clock: trio.testing.MockClock,
) -> None:
    f, registry = bound(make(rate=10, burst=5))
    n = 0
    for _ in range(1000):  # 100 offered a second for 10 s of fake time
        n += (await f.on_request(call_with())) is CONTINUE
        mock_clock.jump(0.01)
    assert n == 5 + 99  # the burst, then a token every 0.1 s from 0.1 to 9.9
    assert limited(registry) == 1000 - n
    mock_clock.jump(60)  # quiet: the bucket fills to the burst, no further
    assert await admitted(f, [call_with() for _ in range(8)]) == [True] * 5 + [False] * 3


async def test_a_refusal_is_429_resource_exhausted_with_retry_after(
    mock_clock: trio.testing.MockClock,
) -> None:
    f, _ = bound(make(rate=6, period="1m", burst=1))  # a token every 10 s
    first, second = call_with(), call_with()
    assert await f.on_request(first) is CONTINUE
    assert first.flags is None and first.log_fields is None
    verdict = await f.on_request(second)
    assert verdict == Respond(
        status=429,
        message="rate limited",
        grpc_status=status.RESOURCE_EXHAUSTED,
        headers=[(b"retry-after", b"10")],
        reason="rate_limited",
    )
    assert second.flags == ["rate_limited"] and second.log_fields == {"rate_limit": "over_limit"}
    mock_clock.jump(9.5)
    assert dict((await f.on_request(call_with())).headers)[b"retry-after"] == b"1"  # type: ignore[union-attr]
    mock_clock.jump(0.5)
    assert await f.on_request(call_with()) is CONTINUE


async def test_grpc_refusals_carry_a_retry_pushback(mock_clock: trio.testing.MockClock) -> None:
    f = make(rate=4, burst=1)
    assert await f.on_request(call_with(protocol=Protocol.GRPC)) is CONTINUE
    mock_clock.jump(0.1)
    verdict = await f.on_request(call_with(protocol=Protocol.GRPC))
    assert isinstance(verdict, Respond) and verdict.grpc_status == status.RESOURCE_EXHAUSTED
    # gRFC A6 pushback: the next token comes in 0.15 s.
    assert verdict.headers == [(b"grpc-retry-pushback-ms", b"150")]


async def test_keys_by_header_and_thrift_metadata(mock_clock: trio.testing.MockClock) -> None:
    f = make(rate=1, burst=2, key={"header": "X-Caller"})
    assert await admitted(f, [call_with(caller("a")) for _ in range(3)]) == [True, True, False]
    assert await admitted(f, [call_with(caller("b")) for _ in range(3)]) == [True, True, False]
    grpc = [call_with(caller("c"), protocol=Protocol.GRPC) for _ in range(3)]
    assert await admitted(f, grpc) == [True, True, False]
    # Thrift metadata keys keep the case the client wrote: matched without it.
    thrift = make(rate=1, burst=1, key={"metadata": "x-caller"})
    metadata = [
        call_with([(k, v)], protocol=Protocol.THRIFT)
        for k, v in (
            (b"x-caller", b"a"),
            (b"X-Caller", b"b"),
            (b"X-CALLER", b"a"),
            (b"x-caller", b"b"),
        )
    ]
    assert await admitted(thrift, metadata) == [True, True, False, False]
    assert thrift._tokens is not None and set(thrift._tokens._at) == {b"a", b"b"}


async def test_long_keys_are_kept_as_digests(mock_clock: trio.testing.MockClock) -> None:
    f = make(rate=1, burst=1, key={"header": "x-caller"})
    long_a, long_b = "a" * 5000, "a" * 4999 + "b"
    assert await admitted(
        f, [call_with(caller(long_a)), call_with(caller(long_b)), call_with(caller(long_a))]
    ) == [True, True, False]
    assert f._tokens is not None and all(len(k) <= 64 for k in f._tokens._at)  # type: ignore[arg-type]


async def test_keys_by_route_and_principal(mock_clock: trio.testing.MockClock) -> None:
    by_route = make(rate=1, burst=1, key="route")
    assert await admitted(
        by_route, [call_with(route="a"), call_with(route="b"), call_with(route="a")]
    ) == [True, True, False]
    by_principal = make(rate=1, burst=1, key="principal")
    ticketed = call_with(identity="spiffe://mesh/sa/x")
    ticketed.principal = "frontend"  # a verified ticket's subject wins over the peer's certificate
    calls = [
        ticketed,
        call_with(identity="spiffe://mesh/sa/x"),
        call_with(identity="spiffe://mesh/sa/x"),
    ]
    assert await admitted(by_principal, calls) == [True, True, False]


async def test_missing_key_limits_in_one_bucket_or_is_allowed(
    mock_clock: trio.testing.MockClock,
) -> None:
    shared = make(rate=1, burst=2, key={"header": "x-caller"})
    # An empty value counts as missing; named callers have buckets of their own.
    nameless = [call_with(), call_with([(b"x-caller", b"")]), call_with()]
    assert await admitted(shared, nameless) == [True, True, False]
    assert await admitted(shared, [call_with(caller("a"))]) == [True]
    allowed = make(rate=1, burst=1, key="route", missing="allow")
    assert await admitted(allowed, [call_with() for _ in range(5)]) == [True] * 5
    assert await admitted(allowed, [call_with(route="r"), call_with(route="r")]) == [True, False]
    # No ticket, no mTLS identity: no principal.
    plaintext = make(rate=1, burst=1, key="principal", missing="allow")
    assert await admitted(plaintext, [call_with(), call_with()]) == [True, True]
    everyone = make(rate=1, burst=2)  # no key: one global bucket
    assert await admitted(everyone, [call_with(caller(n)) for n in "abc"]) == [True, True, False]


async def test_the_key_table_is_bounded(mock_clock: trio.testing.MockClock) -> None:
    f = make(rate=1, burst=1, key={"header": "x-caller"}, max_keys=2)
    got = await admitted(f, [call_with(caller(n)) for n in ("a", "a", "b", "c")])
    assert got == [True, False, True, True]
    # a was the least recently used: forgotten, so a full bucket again.
    assert await admitted(f, [call_with(caller("a"))]) == [True]
    assert f._tokens is not None
    for i in range(5000):
        await f.on_request(call_with(caller(f"caller-{i}")))
    assert len(f._tokens) == 2


async def test_dry_run_counts_and_logs_but_refuses_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    f, registry = bound(make(rate=1, burst=2, dry_run=True, limit="api-dry"))
    calls = [call_with() for _ in range(4)]
    assert await admitted(f, calls) == [True] * 4
    would = {"rate_limit": "dry_run:over_limit"}
    assert [c.log_fields for c in calls] == [None, None, would, would]
    assert all(c.flags is None for c in calls)
    assert limited(registry, "api-dry") == 2


async def test_leaky_bucket_spaces_calls_one_interval_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    f, registry = bound(make(algorithm="leaky_bucket", rate=10, burst=3))
    start = trio.current_time()
    out: list[tuple[bool, float, Call]] = []

    async def one() -> None:
        c = call_with()
        verdict = await f.on_request(c)
        out.append((verdict is CONTINUE, trio.current_time() - start, c))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    passed = sorted(t for ok, t, _ in out if ok)
    assert passed == pytest.approx([0.0, 0.1, 0.2, 0.3])
    refused = [(t, c) for ok, t, c in out if not ok]
    assert [t for t, _ in refused] == [0.0, 0.0]  # refused at once, not after waiting
    assert all(
        c.flags == ["rate_limited"] and c.log_fields == {"rate_limit": "queue_full"}
        for _, c in refused
    )
    assert limited(registry) == 2
    assert sorted(
        c.log_fields["rate_limit_delay"] for ok, _, c in out if ok and c.log_fields
    ) == pytest.approx([0.1, 0.2, 0.3])


async def test_leaky_bucket_admits_exactly_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    f, registry = bound(make(algorithm="leaky_bucket", rate=10, burst=5))
    start = trio.current_time()
    left: list[float] = []

    async def one() -> None:
        if await f.on_request(call_with()) is CONTINUE:
            left.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(1000):  # 100 offered a second for 10 s
            nursery.start_soon(one)
            await trio.sleep(0.01)
    # One leaves every 0.1 s, none skipped and none early, up to the last turn a
    # call offered at 9.99 could still queue for (5 turns ahead: 10.4).
    assert left == pytest.approx([k / 10 for k in range(105)])
    assert limited(registry) == 1000 - 105


async def test_leaky_bucket_never_waits_past_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    f = make(algorithm="leaky_bucket", rate=10, burst=5)
    now = trio.current_time()
    assert await f.on_request(call_with()) is CONTINUE
    assert await f.on_request(call_with()) is CONTINUE  # waited its turn: 0.1 s
    assert trio.current_time() == pytest.approx(now + 0.1)
    # Two more queued at 0.2 and 0.3 would leave past a deadline at now + 0.25.
    hurried = call_with(deadline=now + 0.25)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(f.on_request, call_with())
        await trio.testing.wait_all_tasks_blocked()
        verdict = await f.on_request(hurried)
        assert isinstance(verdict, Respond) and verdict.status == 429
        assert trio.current_time() == pytest.approx(now + 0.1)  # answered at once
        assert hurried.flags == ["rate_limited"]
        assert hurried.log_fields == {"rate_limit": "past_deadline"}


async def test_leaky_bucket_answers_a_client_gone_while_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    f, registry = bound(make(algorithm="leaky_bucket", rate=10, burst=5))
    await f.on_request(call_with())
    gone = call_with()
    gone.client_gone = lambda: True
    verdict = await f.on_request(gone)
    # The limit let it through; it is not counted as limited, and does not go upstream.
    assert verdict == Respond(
        status=499, message="client gone", grpc_status=status.CANCELLED, reason="client_gone"
    )
    assert gone.flags == ["client_gone"] and limited(registry) == 0


async def test_leaky_bucket_gives_back_the_turn_of_a_cancelled_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    f = make(algorithm="leaky_bucket", rate=10, burst=5)
    start = trio.current_time()
    await f.on_request(call_with())
    with trio.move_on_after(0.05):  # the client reset its stream while it waited for 0.1
        await f.on_request(call_with())
    assert await f.on_request(call_with()) is CONTINUE
    # It took the cancelled call's turn, not the one after it at 0.2.
    assert trio.current_time() == pytest.approx(start + 0.1)


async def test_leaky_bucket_dry_run_never_delays(autojump_clock: trio.testing.MockClock) -> None:
    f = make(algorithm="leaky_bucket", rate=10, burst=1, dry_run=True)
    start = trio.current_time()
    calls = [call_with(deadline=start) for _ in range(3)]
    assert await admitted(f, calls) == [True] * 3 and trio.current_time() == start
    assert [c.log_fields for c in calls] == [None, None, {"rate_limit": "dry_run:queue_full"}]


async def test_leaky_bucket_table_full_is_a_refusal(autojump_clock: trio.testing.MockClock) -> None:
    f, registry = bound(
        make(algorithm="leaky_bucket", rate=10, burst=2, key={"header": "x-caller"}, max_keys=1)
    )
    async with trio.open_nursery() as nursery:
        for _ in range(2):  # a leaves now, one of a waits until 0.1
            nursery.start_soon(f.on_request, call_with(caller("a")))
        await trio.testing.wait_all_tasks_blocked()
        newcomer = call_with(caller("b"))
        verdict = await f.on_request(newcomer)
        assert isinstance(verdict, Respond) and dict(verdict.headers)[b"retry-after"] == b"1"
        assert newcomer.log_fields == {"rate_limit": "table_full"} and limited(registry) == 1
    # a's queue is empty now: b takes its place.
    assert await f.on_request(call_with(caller("b"))) is CONTINUE


@pytest.mark.parametrize(
    ("options", "where", "says"),
    [
        ({"rate": 0}, "rate", "greater than 0"),
        ({"rate": -5}, "rate", "greater than 0"),
        ({"rate": True}, "rate", "greater than 0"),
        ({"rate": float("inf")}, "rate", "greater than 0"),
        ({"rate": "100/s"}, "rate", "greater than 0"),
        ({"rate": None, "burst": 5}, "rate", "required"),
        ({"burst": 0}, "burst", ">= 1"),
        ({"burst": 2.5}, "burst", "whole number"),
        ({"period": "0s"}, "period", "above zero"),
        ({"period": "soon"}, "period", "duration"),
        ({"algorithm": "sliding_window"}, "algorithm", "token_bucket, leaky_bucket"),
        ({"key": "caller"}, "key", "{header: NAME}"),
        ({"key": None}, "key", "{header: NAME}"),
        ({"key": {"header": "x-a", "metadata": "x-b"}}, "key", "exactly one"),
        ({"key": {}}, "key", "exactly one"),
        ({"key": {"header": "bad name"}}, "key.header", "header name"),
        ({"key": {"metadata": 7}}, "key.metadata", "header name"),
        ({"key": {"cookie": "sid"}}, "key.cookie", "unknown option"),
        ({"key": "route", "missing": "deny"}, "missing", "limit, allow"),
        ({"missing": "allow"}, "missing", "only with key"),
        ({"max_keys": 0}, "max_keys", ">= 1"),
        ({"max_keys": "many"}, "max_keys", "whole number"),
        ({"limit": ""}, "limit", "non-empty"),
        ({"dry_run": "yes"}, "dry_run", "true or false"),
        ({"nodelay": True}, "nodelay", "unknown option"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], where: str, says: str) -> None:
    base: dict[str, Any] = {"rate": 10}
    base.update(options)
    if "rate" in options and options["rate"] is None:
        del base["rate"]
    with pytest.raises(FilterOptionError) as e:
        RateLimitFilter.from_options(base)
    assert e.value.key == where and says in e.value.message, e.value


CONFIG = """\
admin: {{address: "127.0.0.1:0"}}
listeners:
  - name: test
    direction: ingress
    address: "127.0.0.1:0"
    filters:
      - {filter}
    routes:
      - match: {{prefix: /}}
        cluster: backend
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:1"]}}
"""


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            "{name: rate_limit, rate: 100, burst: 0}",
            "listeners[0].filters[0].burst: expected a whole number >= 1, got 0",
        ),
        ("{name: rate_limit, burst: 20}", "listeners[0].filters[0].rate: required"),
        (
            "{name: rate_limit, rate: 1, key: {header: x-a, metadata: x-b}}",
            "listeners[0].filters[0].key: give exactly one of header or metadata",
        ),
        (
            "{name: rate_limit, rate: 1, key: {header: 'x caller'}}",
            "listeners[0].filters[0].key.header: expected a header name, got 'x caller'",
        ),
    ],
)
def test_config_reports_bad_options_by_path(tmp_path: Path, entry: str, error: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.format(filter=entry))
    with pytest.raises(ConfigError) as e:
        load(str(bad))
    assert error in "\n".join(e.value.lines)


def test_config_loads_the_contract_example(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        CONFIG.format(
            filter="{name: rate_limit, algorithm: token_bucket, rate: 100, burst: 20, key: {header: x-caller}}"
        )
    )
    assert load(str(good)).listeners[0].filters[0].name == "rate_limit"


def test_the_limit_label_is_set_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "limit.yaml"
    path.write_text(
        CONFIG.format(filter="{name: rate_limit, rate: 5, limit: per-caller, key: principal}")
    )
    spec = load(str(path)).listeners[0].filters[0]
    f = FILTER_TYPES[spec.name].from_options(spec.options_dict())
    assert isinstance(f, RateLimitFilter) and (f.limit_name, f.key_name) == (
        "per-caller",
        "principal",
    )
