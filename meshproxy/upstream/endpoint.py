"""What load balancing knows about one endpoint, shared by HTTP/2 and Thrift pools.

Knows: connect-failure backoff, active health (health checks), passive health
(outlier ejection) and the latency/success EWMA that dynamic weights use.
Must not: do I/O; the pools connect, health.py checks, the proxies report.
"""

from __future__ import annotations

import logging
import math

import trio

log = logging.getLogger(__name__)

# After a failed connect, prefer other endpoints for this long (doubling per
# consecutive failure up to the maximum), so one dead endpoint does not cost
# every call a connect timeout.
FAILURE_BACKOFF = 0.5
FAILURE_BACKOFF_MAX = 30.0

# Before the first sample, an endpoint is assumed to answer in this long
# (seconds), so a new endpoint is neither starved nor flooded.
DEFAULT_LATENCY = 0.005
# Each call moves the EWMAs by at least this share.
MIN_SAMPLE_WEIGHT = 0.05


class EndpointState:
    def __init__(self, cluster: str, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.unit = ""  # the unit this endpoint belongs to, if tagged
        self.active_requests = 0
        self.consecutive_failures = 0  # connect failures
        self.retry_after = 0.0
        self.last_error = ""
        # Active health: None until the first check (or with no checks), then its verdict.
        self.checked_healthy: bool | None = None
        # Outlier ejection.
        self.consecutive_errors = 0
        self.ejected_until = 0.0
        self.ejections = 0
        # Dynamic weights: EWMAs of latency (seconds) and success (0..1), decayed by time.
        self.latency_ewma = DEFAULT_LATENCY
        self.success_ewma = 1.0
        self._ewma_at = -math.inf

    def healthy(self, now: float) -> bool:
        return now >= self.retry_after and now >= self.ejected_until and self.checked_healthy is not False

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def weight(self) -> float:
        """Dynamic weight: success share per second of latency, so an endpoint that
        fails fast does not look like the best one (higher is better)."""
        return max(self.success_ewma, 0.01) / max(self.latency_ewma, 1e-5)

    def observe(self, now: float, latency: float, ok: bool, decay: float) -> None:
        """Fold one call's latency and result into the EWMAs (time constant `decay`)."""
        result = 1.0 if ok else 0.0
        if self._ewma_at == -math.inf:
            # The first latency is a better guess than the default; success keeps
            # its prior, so one early error does not starve the endpoint.
            self.latency_ewma = latency
            self.success_ewma += MIN_SAMPLE_WEIGHT * (result - self.success_ewma)
        else:
            # Weighting by elapsed time makes the EWMA forget at the same pace
            # whatever the call rate (Finagle's peak EWMA does so); the floor
            # lets a burst of calls move it within tens of calls, not only seconds.
            w = max(1.0 - math.exp(-max(now - self._ewma_at, 0.0) / decay), MIN_SAMPLE_WEIGHT)
            self.latency_ewma += w * (latency - self.latency_ewma)
            self.success_ewma += w * (result - self.success_ewma)
        self._ewma_at = now

    def connect_failed(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.last_error = reason
        backoff = min(FAILURE_BACKOFF * 2 ** (self.consecutive_failures - 1), FAILURE_BACKOFF_MAX)
        self.retry_after = trio.current_time() + backoff
        log.warning("cluster %s: cannot connect to %s: %s", self.cluster, self.name, reason)

    def connected(self) -> None:
        self.consecutive_failures = 0
        self.retry_after = 0.0

    def state_snapshot(self, now: float) -> dict[str, object]:
        return {
            "address": self.name,
            "unit": self.unit or None,
            "healthy": self.healthy(now),
            "health_check": {None: "unchecked", True: "healthy", False: "unhealthy"}[self.checked_healthy],
            "ejected_for": round(self.ejected_until - now, 3) if self.ejected(now) else None,
            "ejections": self.ejections,
            "active_requests": self.active_requests,
            "latency_ewma_ms": round(self.latency_ewma * 1000, 3),
            "success_ewma": round(self.success_ewma, 4),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }
