"""Governance decisions, sans-IO: retry conditions and budget, error breakers,
outlier ejection, dynamic weights. Time is a plain number here; the end-to-end
tests (test_governance_e2e.py) run the same code against real failing peers."""

from __future__ import annotations

import random

import pytest
import trio

from meshproxy import retry
from meshproxy.config import Breaker, Outlier, RetryBudget, RetryPolicy
from meshproxy.upstream import lb
from meshproxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, Breakers, ErrorBreaker
from meshproxy.upstream.endpoint import EndpointState
from meshproxy.upstream.outlier import OutlierDetector

# -- retry conditions -------------------------------------------------------------------------


def test_http_and_grpc_conditions_follow_retry_on() -> None:
    p = RetryPolicy(attempts=3, retry_on=("gateway-error", "unavailable"), retry_statuses=(429,))
    assert retry.http_condition(p, 503, None) == "gateway-error"
    assert retry.http_condition(p, 500, None) is None  # not a gateway error, and 5xx is not listed
    assert retry.http_condition(p, 429, None) == "429"
    assert retry.http_condition(p, 200, "14") == "unavailable"
    assert retry.http_condition(p, 200, "13") is None  # INTERNAL is not listed
    assert retry.http_condition(p, 200, "0") is None


def test_local_failures_and_thrift_idempotency() -> None:
    p = RetryPolicy(attempts=2, retry_on=("connect-failure", "reset"), idempotent_methods=("get",))
    assert retry.failure_condition(p, retry.CONNECT_FAILURE) == "connect-failure"
    # A refused stream was not processed: "reset" covers it too.
    assert retry.failure_condition(p, retry.REFUSED_STREAM) == "refused-stream"
    assert retry.failure_condition(p, retry.PER_TRY_TIMEOUT) == "per-try-timeout"  # reset covers a timeout
    assert retry.failure_condition(RetryPolicy(retry_on=("connect-failure",)), retry.PER_TRY_TIMEOUT) is None
    assert retry.thrift_may_retry(p, retry.CONNECT_FAILURE, "put")  # never sent: always safe
    assert retry.thrift_may_retry(p, retry.RESET, "get")
    assert not retry.thrift_may_retry(p, retry.RESET, "put")


def test_backoff_is_full_jitter_capped() -> None:
    p = RetryPolicy(backoff_base=0.025, backoff_max=0.1)
    rng = random.Random(1)
    for n, cap in ((1, 0.025), (2, 0.05), (3, 0.1), (8, 0.1)):
        delays = [retry.backoff(p, n, rng) for _ in range(300)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.9 and min(delays) < cap * 0.1  # spread over the whole range


def test_budget_allows_the_ratio_plus_the_minimum_and_forgets_old_seconds() -> None:
    b = retry.Budget(RetryBudget(ratio=0.2, min_per_second=1, window=10))
    for i in range(100):
        b.request(i * 0.01)
    # 0.2 x 100 requests + 1/s x 10 s
    assert sum(b.try_retry(1.0) for _ in range(100)) == 30
    # Eleven seconds on, the window holds none of it: only the minimum again.
    assert sum(b.try_retry(12.0) for _ in range(100)) == 10


# -- error breakers ---------------------------------------------------------------------------


def test_breaker_opens_on_error_ratio_after_min_requests() -> None:
    b = ErrorBreaker(Breaker(error_ratio=0.5, min_requests=10, window=10, open_for=5))
    for i in range(9):
        assert b.record(i * 0.1, True, 0.001) is None  # under min_requests: stays closed
    assert b.record(0.95, False, 0.001) == OPEN  # 9 errors of 10
    assert b.allow(1.0) == (False, False) and b.allow(5.9) == (False, False)


def test_breaker_ratio_window_slides() -> None:
    b = ErrorBreaker(Breaker(error_ratio=0.5, min_requests=4, window=10))
    for t in (0.0, 0.1, 0.2):
        b.record(t, True, 0.001)
    for t in range(11, 15):  # the errors slid out: four successes, no errors
        assert b.record(float(t), False, 0.001) is None
    assert b.state == CLOSED


def test_breaker_opens_on_consecutive_errors_and_on_slow_calls() -> None:
    b = ErrorBreaker(Breaker(consecutive_errors=3))
    assert [b.record(0, e, 0.001) for e in (True, True, False, True, True)] == [None] * 5
    assert b.record(0, True, 0.001) == OPEN
    slow = ErrorBreaker(Breaker(slow_threshold=0.1, slow_ratio=0.5, min_requests=4))
    assert [slow.record(0, False, lat) for lat in (0.2, 0.01, 0.01)] == [None] * 3
    assert slow.record(0, False, 0.3) == OPEN  # two of four slower than 100 ms


def test_half_open_lets_probes_through_and_their_outcome_decides() -> None:
    b = ErrorBreaker(Breaker(consecutive_errors=1, open_for=5, half_open_requests=1))
    b.record(0, True, 0.001)
    assert b.allow(4.9) == (False, False)
    assert b.allow(5.0) == (True, True) and b.state == HALF_OPEN
    assert b.allow(5.0) == (False, False)  # one probe at a time
    assert b.record(5.1, True, 0.001, probe=True, generation=b.generation) == OPEN  # failed: open for open_for
    assert b.allow(10.0)[0] is False and b.allow(10.2) == (True, True)
    b.abandon(True, b.generation)  # its caller left: the probe slot is free again
    assert b.allow(10.3) == (True, True)
    assert b.record(10.4, False, 0.001, probe=True, generation=b.generation) == CLOSED


def test_only_probes_of_this_opening_decide_a_half_open_breaker() -> None:
    b = ErrorBreaker(Breaker(consecutive_errors=1, open_for=5, half_open_requests=1))
    old = b.generation  # an attempt admitted while closed, still in flight
    b.record(0, True, 0.001)
    assert b.allow(5.0) == (True, True)
    probe = b.generation
    assert b.record(5.1, False, 0.001, probe=False, generation=old) is None  # not a probe: no say
    b.abandon(False, old)  # nor does it free the probe's slot
    assert b.allow(5.1) == (False, False)
    assert b.record(5.2, True, 0.001, probe=True, generation=probe) == OPEN
    assert b.allow(10.3) == (True, True)
    # A probe of the earlier opening finishing late decides nothing either.
    assert b.record(10.4, False, 0.001, probe=True, generation=probe) is None
    assert b.state == HALF_OPEN


def test_breakers_per_method_and_bounded() -> None:
    seen: list[tuple[str, str]] = []
    bs = Breakers(Breaker(key="method", consecutive_errors=1, max_keys=2), lambda k, s: seen.append((k, s)))
    assert bs.key_for("/echo.Echo/Bad") == "/echo.Echo/Bad"
    bad, good = bs.get("/echo.Echo/Bad"), bs.get("/echo.Echo/Good")
    bs.record(bad, "/echo.Echo/Bad", 0, True, 0.001)
    assert bs.allow(bad, "/echo.Echo/Bad", 1) == (False, False)
    assert bs.allow(good, "/echo.Echo/Good", 1) == (True, False)
    assert seen == [("/echo.Echo/Bad", OPEN)] and bs.open_count == 1
    # Past max_keys a closed breaker goes before an open one, though Bad is least recently used.
    bs.get("/echo.Echo/Third")
    assert bs.open_count == 1 and bs.snapshot()["open"] == {"/echo.Echo/Bad": OPEN}
    assert good is not None and good.detached
    bs.record(good, "/echo.Echo/Good", 2, True, 0.001)  # an attempt on the forgotten one ends: no count
    assert good.state == OPEN and bs.open_count == 1 and len(seen) == 1
    third = bs.get("/echo.Echo/Third")
    bs.record(third, "/echo.Echo/Third", 3, True, 0.001)
    bs.get("/echo.Echo/Fourth")  # all open: the least recently used goes, with its count
    assert bs.open_count == 1 and "/echo.Echo/Bad" not in bs.snapshot()["open"]  # type: ignore[operator]
    assert Breakers(Breaker(key="service"), print).key_for("/echo.Echo/Bad?x=1") == "/echo.Echo"


# -- outlier ejection -------------------------------------------------------------------------


def endpoints(n: int) -> list[EndpointState]:
    return [EndpointState("c", f"e{i}") for i in range(n)]


def test_ejection_grows_with_each_ejection_and_is_capped() -> None:
    eps = endpoints(4)
    d = OutlierDetector(Outlier(consecutive_errors=2, base_ejection=10, max_ejection=25, max_ejected_percent=50), eps)
    e = eps[0]
    assert d.observe(e, 0, True) is None
    assert d.observe(e, 0, False) is None  # a success starts the count again
    assert d.observe(e, 0, True) is None and d.observe(e, 0, True) == "ejected"
    assert e.ejected(9.9) and not e.ejected(10.0) and not e.healthy(5) and e.healthy(10)
    d.observe(e, 10, True)
    assert d.observe(e, 10, True) == "ejected" and e.ejected_until == 30  # 2 x base
    d.observe(e, 30, True)
    assert d.observe(e, 30, True) == "ejected" and e.ejected_until == 55  # 3 x base, capped at 25
    # 50% of four: a second endpoint may go, a third may not.
    for other, want in ((eps[1], "ejected"), (eps[2], "skipped")):
        d.observe(other, 31, True)
        assert d.observe(other, 31, True) == want
    assert d.ejected_count(31) == 2


def test_one_endpoint_may_always_be_ejected() -> None:
    eps = endpoints(2)
    d = OutlierDetector(Outlier(consecutive_errors=1, max_ejected_percent=10), eps)
    assert d.observe(eps[0], 0, True) == "ejected"
    assert d.observe(eps[1], 0, True) == "skipped"


# -- dynamic weights --------------------------------------------------------------------------


def slow_and_fast() -> tuple[EndpointState, EndpointState]:
    fast, slow = endpoints(2)
    for t in range(50):
        fast.observe(t * 0.1, 0.002, True, decay=1.0)
        slow.observe(t * 0.1, 0.020, True, decay=1.0)
    return fast, slow


def test_dynamic_weights_round_robin_sends_less_to_a_slow_endpoint() -> None:
    fast, slow = slow_and_fast()
    balancer = lb.make("round_robin", random.Random(3), dynamic=True)
    picks = [balancer.pick([fast, slow], 10.0, set()) for _ in range(1100)]
    assert 50 <= picks.count(1) <= 150  # about 1/11 by weight, never starved
    # Errors cost weight too: a fast endpoint that fails loses its lead.
    for t in range(50, 100):
        fast.observe(t * 0.1, 0.002, False, decay=1.0)
    picks = [balancer.pick([fast, slow], 10.0, set()) for _ in range(1000)]
    assert picks.count(1) > picks.count(0)


def test_dynamic_weights_least_request_weighs_requests_in_flight() -> None:
    fast, slow = slow_and_fast()
    balancer = lb.make("least_request", random.Random(3), dynamic=True)
    # Ten times the weight: the fast one takes calls until it has ~10x as many in flight.
    fast.active_requests = 5
    assert balancer.pick([fast, slow], 10.0, set()) == 0
    fast.active_requests = 12
    assert balancer.pick([fast, slow], 10.0, set()) == 1
    plain = lb.make("least_request", random.Random(3))
    assert plain.pick([fast, slow], 10.0, set()) == 1
    fast.active_requests, slow.active_requests = 0, 1
    assert plain.pick([fast, slow], 10.0, set()) == 0


def test_ewma_forgets_by_time_with_a_floor_per_call() -> None:
    e = EndpointState("c", "e")
    e.observe(0.0, 0.100, True, decay=1.0)
    e.observe(0.001, 0.001, True, decay=1.0)  # a millisecond later: moves by the floor only
    assert 0.09 < e.latency_ewma < 0.096
    e.observe(5.0, 0.001, True, decay=1.0)  # five time constants later: nearly all new
    assert e.latency_ewma < 0.002
    # One early error does not starve an endpoint; a run of them does cost it.
    first = EndpointState("c", "f")
    first.observe(0.0, 0.001, False, decay=10.0)
    assert first.success_ewma == 0.95
    for i in range(40):
        first.observe(0.001 * i, 0.001, False, decay=10.0)
    assert first.success_ewma < 0.15


# -- max_retries: reserved when a retry is decided -----------------------------------------------


async def test_max_retries_is_taken_when_a_retry_is_decided_and_always_given_back() -> None:
    from prometheus_client import CollectorRegistry

    from meshproxy.attempts import Retrying
    from meshproxy.call import Call, EmptyBody, Peer, Protocol
    from meshproxy.config import Cluster
    from meshproxy.metrics import Metrics
    from meshproxy.upstream.guard import Guard
    from meshproxy.values import parse_address

    metrics = Metrics.create(CollectorRegistry())
    guard = Guard(Cluster("c", "http2", (parse_address("127.0.0.1:1"),), breaker=Breaker(max_retries=2)), [],
                  metrics)
    assert guard.breakers is not None
    policy = RetryPolicy(attempts=3)
    budget = retry.Budget(RetryBudget(ratio=1.0, min_per_second=100))

    def retrying() -> Retrying:
        call = Call(1, Protocol.HTTP2, Peer("127.0.0.1:2"), "l", "egress", "svc", "GET", "/", [], EmptyBody(), 0.0)
        return Retrying(call, "c", guard, policy, budget, metrics, random.Random(1))

    # Five calls fail at once: two get a retry, before any retry is admitted.
    calls = [retrying() for _ in range(5)]
    assert [r.decide("5xx") is not None for r in calls] == [True, True, False, False, False]
    assert guard.breakers.retries == 2
    # One retry is admitted and ends; the other call ends without using its slot.
    a = calls[0].admit(guard, "/", 0.0)
    guard.done(a, None, 0.0, 200, "")
    calls[1].finish()
    assert guard.breakers.retries == 0 and guard.breakers.requests == 0
    # The slots are free for the next failures.
    assert calls[2].decide("5xx") is not None and guard.breakers.retries == 1


async def test_a_retry_the_guard_refuses_gives_back_its_slot_and_its_budget() -> None:
    from prometheus_client import CollectorRegistry

    from meshproxy.attempts import Retrying
    from meshproxy.call import Call, EmptyBody, Peer, Protocol
    from meshproxy.config import Cluster
    from meshproxy.errors import UpstreamOverflow
    from meshproxy.metrics import Metrics
    from meshproxy.upstream.guard import Guard
    from meshproxy.values import parse_address

    metrics = Metrics.create(CollectorRegistry())
    guard = Guard(Cluster("c", "http2", (parse_address("127.0.0.1:1"),), breaker=Breaker(max_requests=1)), [],
                  metrics)
    assert guard.breakers is not None
    budget = retry.Budget(RetryBudget(ratio=0.0, min_per_second=1, window=1))  # one retry a second
    call = Call(1, Protocol.HTTP2, Peer("127.0.0.1:2"), "l", "egress", "svc", "GET", "/", [], EmptyBody(), 0.0)
    r = Retrying(call, "c", guard, RetryPolicy(attempts=3), budget, metrics, random.Random(1))
    now = trio.current_time()  # what decide() reads
    first = r.admit(guard, "/", now)
    assert r.decide("5xx") is not None  # the budget's one retry is taken...
    with pytest.raises(UpstreamOverflow):  # ...but another call holds the cluster's only request
        r.admit(guard, "/", now)
    assert guard.breakers.retries == 0
    guard.done(first, None, now, 503, "")
    # The refused retry was never sent: the budget still has it for the next failure.
    assert budget.try_retry(now) and not budget.try_retry(now)


def test_budget_refund_gives_back_the_newest_counted_retry() -> None:
    b = retry.Budget(RetryBudget(ratio=0.0, min_per_second=1, window=2))
    assert b.try_retry(0.0) and b.try_retry(1.0) and not b.try_retry(1.0)
    b.refund(1.5)
    assert b.try_retry(1.5) and not b.try_retry(1.5)
    b.refund(5.0)  # both seconds have left the window: nothing to give back, nothing goes negative
    assert b.try_retry(5.0) and b.try_retry(5.0) and not b.try_retry(5.0)


def test_an_answer_outside_the_call_path_resets_the_connect_failure_count() -> None:
    """Risk checks report connect failures to the cluster's guard; their answers must reset the count,
    or failures spread over hours of good checks would eject the endpoint."""
    from prometheus_client import CollectorRegistry

    from meshproxy.config import Cluster
    from meshproxy.metrics import Metrics
    from meshproxy.upstream.guard import Guard
    from meshproxy.values import parse_address

    ep = EndpointState("c", "127.0.0.1:1")
    guard = Guard(Cluster("c", "http2", (parse_address("127.0.0.1:1"),), outlier=Outlier(consecutive_errors=2)),
                  [ep], Metrics.create(CollectorRegistry()))
    for t in range(5):
        guard.connect_failed(ep, float(t))
        guard.checked(ep, float(t), failed=False)
    assert not ep.ejected(5.0)
    guard.connect_failed(ep, 6.0)
    guard.connect_failed(ep, 6.0)
    assert ep.ejected(6.0)
    ep2 = EndpointState("c", "127.0.0.1:2")
    guard = Guard(Cluster("c", "http2", (parse_address("127.0.0.1:2"),), outlier=Outlier(consecutive_errors=2)),
                  [ep2], Metrics.create(CollectorRegistry()))
    guard.checked(ep2, 7.0, failed=True)  # a check with no answer (a timeout) counts as a gateway error
    assert not ep2.ejected(7.0)
    guard.checked(ep2, 7.0, failed=True)
    assert ep2.ejected(7.0)
