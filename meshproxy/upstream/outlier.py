"""Outlier ejection: passive health from the outcomes of real calls.

Knows: a cluster's Outlier config and its endpoints' states. Must not: do
I/O. An endpoint with `consecutive_errors` gateway errors or connect
failures in a row leaves load balancing for base_ejection x (times ejected),
capped at max_ejection; at most max_ejected_percent of the cluster is out at
once (but one endpoint may always be ejected, else a two-endpoint cluster
with a low percentage could never eject), and an endpoint's ejection count
decays back after it has stayed healthy for as long as it was last out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from meshproxy.config import Outlier
from meshproxy.upstream.endpoint import EndpointState

log = logging.getLogger(__name__)


class OutlierDetector:
    def __init__(self, config: Outlier, endpoints: Sequence[EndpointState]) -> None:
        self.config = config
        self._endpoints = endpoints

    def ejected_count(self, now: float) -> int:
        return sum(1 for e in self._endpoints if e.ejected(now))

    def observe(self, endpoint: EndpointState, now: float, gateway_error: bool) -> str | None:
        """Count one outcome; "ejected" if it ejected the endpoint, "skipped" if
        the cap kept it in, else None."""
        if not gateway_error:
            endpoint.consecutive_errors = 0
            return None
        if endpoint.ejected(now):
            return None  # a call that was already on its way when it was ejected
        endpoint.consecutive_errors += 1
        c = self.config
        if endpoint.consecutive_errors < c.consecutive_errors:
            return None
        endpoint.consecutive_errors = 0
        cap = max(1, len(self._endpoints) * c.max_ejected_percent // 100) if c.max_ejected_percent else 0
        if self.ejected_count(now) >= cap:
            return "skipped"
        # Back to the base once it stayed in for as long as its last ejection.
        last = min(c.base_ejection * endpoint.ejections, c.max_ejection)
        if endpoint.ejections and now - endpoint.ejected_until > last:
            endpoint.ejections = 0
        endpoint.ejections += 1
        duration = min(c.base_ejection * endpoint.ejections, c.max_ejection)
        endpoint.ejected_until = now + duration
        log.warning("cluster %s: endpoint %s ejected for %.1fs after %d gateway errors in a row",
                    endpoint.cluster, endpoint.name, duration, c.consecutive_errors)
        return "ejected"
