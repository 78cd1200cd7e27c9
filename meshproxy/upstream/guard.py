"""A cluster's governance: caps, error breakers, outlier ejection, dynamic weights.

Knows: the cluster's config, its endpoints' states, metrics. Must not: do
I/O or know protocols; the proxies call `admit` before an upstream attempt
and `done` after it, with the outcome as a status, a gRPC status and
whether the proxy itself failed (connect failure, reset, timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from meshproxy.config import Cluster as ClusterConfig
from meshproxy.errors import BreakerOpen, UpstreamOverflow
from meshproxy.metrics import Metrics
from meshproxy.upstream.breaker import Breakers, ErrorBreaker, is_error, is_gateway_error
from meshproxy.upstream.endpoint import EndpointState
from meshproxy.upstream.outlier import OutlierDetector

log = logging.getLogger(__name__)


class Admission:
    """One admitted attempt: what `done` needs to account for it."""

    __slots__ = ("breaker", "generation", "key", "probe", "retry", "start")

    def __init__(self, key: str, breaker: ErrorBreaker | None, start: float, retry: bool, probe: bool = False,
                 generation: int = 0) -> None:
        self.key = key
        self.breaker = breaker
        self.start = start
        self.retry = retry  # it holds a max_retries slot
        self.probe = probe  # a half-open breaker's probe
        self.generation = generation  # the breaker's, when admitted


class Guard:
    def __init__(self, config: ClusterConfig, endpoints: Sequence[EndpointState], metrics: Metrics) -> None:
        self.name = config.name
        self._metrics = metrics
        self.breakers = Breakers(config.breaker, self._transition) if config.breaker is not None else None
        self.outlier = OutlierDetector(config.outlier, endpoints) if config.outlier is not None else None
        self.decay = config.dynamic_weights.decay if config.dynamic_weights is not None else 0.0
        # Nothing to count per attempt: the proxies skip admit/done entirely.
        self.active = self.breakers is not None or self.outlier is not None or self.decay > 0
        if self.outlier is not None:
            outlier = self.outlier
            metrics.child(metrics.endpoints_ejected, self.name).set_function(
                lambda: outlier.ejected_count(_now()))
        if self.breakers is not None:
            breakers = self.breakers
            metrics.child(metrics.breakers_open, self.name).set_function(lambda: breakers.open_count)

    def _transition(self, key: str, state: str) -> None:
        m = self._metrics
        m.child(m.breaker_transitions, self.name, state).inc()
        where = f"cluster {self.name}" + (f" key {key}" if key else "")
        if state == "open":
            log.warning("%s: circuit breaker open", where)
        else:
            log.info("%s: circuit breaker %s", where, state.replace("_", "-"))

    def admit(self, path: str, now: float, retry: bool = False) -> Admission | None:
        """Before an attempt: raises BreakerOpen or UpstreamOverflow to refuse it.

        `retry`: the attempt holds a retry slot (reserve_retry); it is released
        with the attempt, or here if the attempt is refused.
        """
        b = self.breakers
        if b is None:
            return Admission("", None, now, retry)
        c = b.config
        m = self._metrics
        if c.max_requests and b.requests >= c.max_requests:
            m.child(m.breaker_rejected, self.name, "max_requests").inc()
            if retry:
                self.release_retry()
            raise UpstreamOverflow(f"cluster '{self.name}' has {b.requests} requests in flight (max_requests)")
        key = b.key_for(path)
        breaker = b.get(key)
        allowed, probe = b.allow(breaker, key, now)
        if not allowed:
            m.child(m.breaker_rejected, self.name, "open").inc()
            if retry:
                self.release_retry()
            raise BreakerOpen(f"circuit breaker open for cluster '{self.name}'" + (f" ({key})" if key else ""),
                              c.fallback)
        b.requests += 1
        return Admission(key, breaker, now, retry, probe, breaker.generation if breaker is not None else 0)

    def reserve_retry(self) -> bool:
        """Take a slot of the max_retries cap (retries in flight to the cluster); False if none is left."""
        b = self.breakers
        if b is None:
            return True
        if b.config.max_retries and b.retries >= b.config.max_retries:
            return False
        b.retries += 1
        return True

    def release_retry(self) -> None:
        if self.breakers is not None:
            self.breakers.retries -= 1

    def done(self, a: Admission | None, endpoint: EndpointState | None, now: float, status: int, grpc_status: str,
             local_failure: bool = False) -> str | None:
        """After an attempt; "ejected" if its outcome ejected the endpoint."""
        if a is None:
            return None
        b = self.breakers
        error = local_failure or is_error(status, grpc_status)
        latency = now - a.start
        if b is not None:
            b.requests -= 1
            if a.retry:
                b.retries -= 1
            b.record(a.breaker, a.key, now, error, latency, a.probe, a.generation)
        if endpoint is None:
            return None
        if self.decay:
            endpoint.observe(now, latency, not error, self.decay)
        if self.outlier is not None:
            return self._ejection(
                self.outlier.observe(endpoint, now, local_failure or is_gateway_error(status, grpc_status)))
        return None

    def checked(self, endpoint: EndpointState, now: float, failed: bool) -> None:
        """An exchange outside the proxy's call path (a risk check) ended: `failed` if it got no
        answer (timeout, reset, an unavailable status), a gateway error; an answer resets the count."""
        if self.outlier is not None:
            self._ejection(self.outlier.observe(endpoint, now, failed))

    def connect_failed(self, endpoint: EndpointState, now: float) -> None:
        """A connect failure counts towards outlier ejection like a gateway error."""
        if self.outlier is not None:
            self._ejection(self.outlier.observe(endpoint, now, True))

    def _ejection(self, result: str | None) -> str | None:
        if result is None:
            return None
        m = self._metrics
        m.child(m.outlier_ejections, self.name, "consecutive_errors" if result == "ejected" else "skipped_max_percent"
                ).inc()
        return result if result == "ejected" else None

    def abandon(self, a: Admission | None) -> None:
        """An attempt that ended without an outcome (the caller left first)."""
        if a is None or self.breakers is None:
            return
        self.breakers.requests -= 1
        if a.retry:
            self.breakers.retries -= 1
        if a.breaker is not None:
            a.breaker.abandon(a.probe, a.generation)

    def snapshot(self) -> dict[str, object] | None:
        return self.breakers.snapshot() if self.breakers is not None else None


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # scraped outside trio (tests)
        return 0.0
