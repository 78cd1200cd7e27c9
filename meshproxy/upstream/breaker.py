"""Circuit breakers: concurrency caps per cluster, error breakers per key.

Knows: a cluster's Breaker config, call outcomes (error or not, latency)
and time as numbers. Must not: do I/O; the proxies ask before an attempt
and report after it.

An error breaker is closed (calls pass), open (calls are refused without
touching the upstream, for `open_for`), or half-open (up to
`half_open_requests` probes pass; the first probe's outcome closes or
re-opens it). Counts live in ten buckets over `window`, so a breaker is
O(1) per call and bounded in memory; breakers per key are kept in an LRU
map of at most `max_keys`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable

from meshproxy.config import Breaker

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
BUCKETS = 10
# How many of the least recently used breakers eviction looks through for a closed one.
EVICTION_SCAN = 16

# gRPC codes that say the server (not the caller) failed.
GRPC_SERVER_ERRORS = frozenset(("2", "4", "13", "14", "15"))
GATEWAY_STATUSES = frozenset((502, 503, 504))


def is_error(status: int, grpc_status: str) -> bool:
    """An outcome that counts against the upstream: 5xx or a gRPC server error (or no reply: status 0)."""
    return status >= 500 or status == 0 or grpc_status in GRPC_SERVER_ERRORS


def is_gateway_error(status: int, grpc_status: str) -> bool:
    """What outlier ejection counts: 502/503/504 or UNAVAILABLE (and local failures, status 0)."""
    return status in GATEWAY_STATUSES or status == 0 or grpc_status == "14"


class ErrorBreaker:
    __slots__ = (
        "_bucket_width",
        "_buckets",
        "_config",
        "_consecutive",
        "_epoch",
        "_errors",
        "_probes",
        "_slow",
        "_total",
        "detached",
        "generation",
        "opened_at",
        "state",
    )

    def __init__(self, config: Breaker) -> None:
        self._config = config
        self.state = CLOSED
        self.opened_at = 0.0
        # Counts openings: a half-open breaker heeds only the outcomes of its own
        # probes, not of attempts admitted before it opened (or re-opened).
        self.generation = 0
        self.detached = False  # evicted from its Breakers: it no longer moves their counts
        self._probes = 0
        self._consecutive = 0
        self._bucket_width = config.window / BUCKETS
        self._buckets = [[0, 0, 0] for _ in range(BUCKETS)]  # [calls, errors, slow]
        self._epoch = -1  # the bucket index (time / width) last written
        self._total = self._errors = self._slow = 0

    def allow(self, now: float) -> tuple[bool, bool]:
        """May a call go to the upstream now, and is it a half-open probe?"""
        if self.state == CLOSED:
            return True, False
        if self.state == OPEN:
            if now - self.opened_at < self._config.open_for:
                return False, False
            self.state = HALF_OPEN
            self._probes = 0
        if self._probes >= self._config.half_open_requests:
            return False, False
        self._probes += 1
        return True, True

    def record(self, now: float, error: bool, latency: float, probe: bool = False,
               generation: int | None = None) -> str | None:
        """Fold one outcome in (of a probe of `generation`, if `probe`); the new state if it changed."""
        c = self._config
        if self.state == HALF_OPEN:
            if not probe or generation != self.generation:
                return None  # an attempt admitted before it opened: not a probe
            if error:
                self._open(now)
                return OPEN
            self._reset()
            self.state = CLOSED
            return CLOSED
        if self.state == OPEN:
            return None  # an attempt admitted before it opened
        slow = c.slow_ratio > 0 and latency >= c.slow_threshold
        bucket = self._bucket(now)
        bucket[0] += 1
        self._total += 1
        if error:
            bucket[1] += 1
            self._errors += 1
            self._consecutive += 1
        else:
            self._consecutive = 0
        if slow:
            bucket[2] += 1
            self._slow += 1
        if self._should_open():
            self._open(now)
            self._reset()
            return OPEN
        return None

    def _open(self, now: float) -> None:
        self.state, self.opened_at = OPEN, now
        self.generation += 1

    def abandon(self, probe: bool, generation: int) -> None:
        """An admitted attempt that ended without an outcome (its caller left): free its probe."""
        if probe and generation == self.generation and self.state == HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _should_open(self) -> bool:
        c = self._config
        if c.consecutive_errors and self._consecutive >= c.consecutive_errors:
            return True
        if self._total < c.min_requests:
            return False
        if c.error_ratio and self._errors >= c.error_ratio * self._total:
            return True
        return bool(c.slow_ratio and self._slow >= c.slow_ratio * self._total)

    def _bucket(self, now: float) -> list[int]:
        epoch = int(now / self._bucket_width)
        buckets = self._buckets
        if epoch != self._epoch:
            # Clear the buckets that slid out of the window since the last write.
            for e in range(max(self._epoch + 1, epoch - BUCKETS + 1), epoch + 1):
                old = buckets[e % BUCKETS]
                self._total -= old[0]
                self._errors -= old[1]
                self._slow -= old[2]
                old[0] = old[1] = old[2] = 0
            self._epoch = epoch
        return buckets[epoch % BUCKETS]

    def _reset(self) -> None:
        for b in self._buckets:
            b[0] = b[1] = b[2] = 0
        self._total = self._errors = self._slow = self._consecutive = 0


class Breakers:
    """A cluster's error breakers by key, and its concurrency caps."""

    def __init__(self, config: Breaker, on_transition: Callable[[str, str], None]) -> None:
        self.config = config
        self._by_key: OrderedDict[str, ErrorBreaker] = OrderedDict()
        self._on_transition = on_transition  # (key, new state)
        self.requests = 0  # attempts in flight to the cluster
        self.retries = 0  # retries in flight
        self.pending = 0  # calls waiting for a connection, every endpoint together
        self.connections = 0  # open or opening, every endpoint together
        self.open_count = 0  # breakers open or half-open

    def key_for(self, path: str) -> str:
        """The breaker key of a call: gRPC and Thrift paths are /service/method."""
        k = self.config.key
        if k == "cluster":
            return ""
        path = path.partition("?")[0]
        return path.rpartition("/")[0] if k == "service" else path

    def get(self, key: str) -> ErrorBreaker | None:
        if not self.config.has_error_triggers:
            return None
        breakers = self._by_key
        b = breakers.get(key)
        if b is None:
            if len(breakers) >= self.config.max_keys:
                self._evict()
            b = breakers[key] = ErrorBreaker(self.config)
        else:
            breakers.move_to_end(key)
        return b

    def _evict(self) -> None:
        """Forget a least recently used breaker, a closed one if one of the oldest
        few is: forgetting an open breaker closes it early."""
        breakers = self._by_key
        victim = next(iter(breakers))
        for key, b in itertools.islice(breakers.items(), EVICTION_SCAN):
            if b.state == CLOSED:
                victim = key
                break
        old = breakers.pop(victim)
        old.detached = True  # attempts still in flight on it must not move the counts
        if old.state != CLOSED:
            self.open_count -= 1

    def allow(self, breaker: ErrorBreaker | None, key: str, now: float) -> tuple[bool, bool]:
        """(allowed, probe)."""
        if breaker is None:
            return True, False
        before = breaker.state
        allowed = breaker.allow(now)
        if breaker.state != before:
            self._on_transition(key, breaker.state)
        return allowed

    def record(self, breaker: ErrorBreaker | None, key: str, now: float, error: bool, latency: float,
               probe: bool = False, generation: int = 0) -> None:
        if breaker is None:
            return
        before = breaker.state
        after = breaker.record(now, error, latency, probe, generation)
        if after is None or breaker.detached:
            return
        if before == CLOSED:
            self.open_count += 1
        elif after == CLOSED:
            self.open_count -= 1
        self._on_transition(key, after)

    def may_connect(self) -> bool:
        c = self.config.max_connections
        return not c or self.connections < c

    def may_wait(self) -> bool:
        c = self.config.max_pending
        return not c or self.pending < c

    def snapshot(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "pending": self.pending,
            "connections": self.connections,
            "open": {k or "(cluster)": b.state for k, b in self._by_key.items() if b.state != CLOSED},
        }
