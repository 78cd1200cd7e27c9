"""Retry policy decisions: which failures are retried, when, and how often in all.

Knows: a route's RetryPolicy, outcomes as statuses and failure kinds, time
as numbers. Must not: sleep, send, or know protocols' wire formats (the
proxies ask, then act).
"""

from __future__ import annotations

import random
from collections import deque

from meshproxy.config import RetryBudget, RetryPolicy

# gRPC status codes (as the grpc-status header carries them) -> retry_on name.
GRPC_CONDITIONS = {
    "1": "cancelled", "4": "deadline-exceeded", "8": "resource-exhausted", "13": "internal", "14": "unavailable",
}

# Failures the proxy sees itself, not statuses the upstream sent.
CONNECT_FAILURE = "connect-failure"
REFUSED_STREAM = "refused-stream"
RESET = "reset"
PER_TRY_TIMEOUT = "per-try-timeout"

# A per-try timeout is a gateway error to the caller (504), so these retry it too.
_PER_TRY_TIMEOUT_BY = frozenset((PER_TRY_TIMEOUT, "gateway-error", "5xx", RESET))


def http_condition(policy: RetryPolicy, status: int, grpc_status: str | None) -> str | None:
    """The retry_on condition an upstream's reply meets, or None if it is not retried."""
    on = policy.retry_on
    if grpc_status:
        name = GRPC_CONDITIONS.get(grpc_status)
        return name if name is not None and name in on else None
    if status in policy.retry_statuses:
        return str(status)
    if status >= 500:
        if "5xx" in on:
            return "5xx"
        if status in (502, 503, 504) and "gateway-error" in on:
            return "gateway-error"
    return None


def failure_condition(policy: RetryPolicy, kind: str) -> str | None:
    """The condition a local failure (CONNECT_FAILURE, REFUSED_STREAM, RESET, PER_TRY_TIMEOUT) meets, or None."""
    on = policy.retry_on
    if kind == PER_TRY_TIMEOUT:
        return kind if not _PER_TRY_TIMEOUT_BY.isdisjoint(on) else None
    if kind == REFUSED_STREAM:
        # The upstream did not process it (RFC 9113 8.7): as safe as a connect failure.
        return kind if kind in on or RESET in on else None
    return kind if kind in on else None


def thrift_may_retry(policy: RetryPolicy, kind: str, method: str) -> bool:
    """Thrift has no status to say a call was not processed: only a connect
    failure is always safe; anything else needs the method to be idempotent."""
    if kind == CONNECT_FAILURE:
        return True
    methods = policy.idempotent_methods
    return "*" in methods or method in methods


def backoff(policy: RetryPolicy, retry: int, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform over [0, min(max, base x 2^(retry-1))]."""
    return rng.uniform(0.0, min(policy.backoff_max, policy.backoff_base * 2 ** (retry - 1)))


class Budget:
    """Retries may be at most `ratio` of first attempts plus `min_per_second`,
    over a sliding window (Linkerd's retry budget), so retries cannot
    multiply the load on an upstream that is down.

    Counts live in one-second buckets: O(1) per call, bounded memory.
    """

    __slots__ = ("_buckets", "_config", "_requests", "_retries")

    def __init__(self, config: RetryBudget) -> None:
        self._config = config
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]
        self._requests = 0
        self._retries = 0

    def _advance(self, now: float) -> list[int]:
        second = int(now)
        buckets = self._buckets
        horizon = second - max(1, int(self._config.window))
        while buckets and buckets[0][0] <= horizon:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def request(self, now: float) -> None:
        self._advance(now)[1] += 1
        self._requests += 1

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget; False if it is spent."""
        bucket = self._advance(now)
        c = self._config
        allowed = c.ratio * self._requests + c.min_per_second * max(1.0, c.window)
        if self._retries + 1 > allowed:
            return False
        bucket[2] += 1
        self._retries += 1
        return True

    def refund(self, now: float) -> None:
        """Give back a retry taken but never sent (the guard refused it); the
        newest second that counted one gives it back, if still in the window."""
        self._advance(now)
        for bucket in reversed(self._buckets):
            if bucket[2]:
                bucket[2] -= 1
                self._retries -= 1
                return
