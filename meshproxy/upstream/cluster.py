"""A cluster: its endpoints' pools and a load balancer; opens upstream streams.

Knows: which endpoint to try next, and that a connect failure means trying
another. Must not: know routes or filters.
"""

from __future__ import annotations

import logging

import trio

from meshproxy.config import Cluster as ClusterConfig
from meshproxy.drivers.h2 import ClientLink, Stream
from meshproxy.drivers.unary_h2 import UnaryConnections
from meshproxy.errors import UpstreamUnavailable
from meshproxy.metrics import Metrics
from meshproxy.upstream import health, lb
from meshproxy.upstream.guard import Guard
from meshproxy.upstream.pool import ConnectFailed, EndpointPool, client_tls
from meshproxy.upstream.thrift_cluster import ThriftCluster

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


class Cluster:
    def __init__(self, config: ClusterConfig, nursery: trio.Nursery, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        tls_config = client_tls(config)
        self.pools = [
            EndpointPool(config.name, a, config.http2, config.connect_timeout, nursery, metrics, tls_config)
            for a in config.endpoints
        ]
        self.guard = Guard(config, self.pools, metrics)
        for pool, unit in zip(self.pools, config.endpoint_units, strict=False):
            pool.unit = unit
        for pool in self.pools:
            pool.caps = self.guard.breakers
        self._lb = lb.make(config.lb, dynamic=config.dynamic_weights is not None)
        self._streams_active = metrics.child(metrics.upstream_streams_active, config.name)
        self._health = health.start(config, self.pools, nursery, metrics, tls_config)
        # Lean connections of clients that make small unary exchanges of their own (risk checks).
        self.lean = UnaryConnections(config.connect_timeout)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} {self.pools}>"

    async def open_stream(
        self, headers: Headers, end: bool, unit: str | None = None, avoid: EndpointPool | None = None
    ) -> tuple[EndpointPool, ClientLink, Stream]:
        """Send request headers on a stream to some endpoint (of `unit`, if given); UpstreamUnavailable if none takes it.

        A retry names the endpoint that just failed it as `avoid`: another is
        preferred while there is one.
        """
        tried = lb.outside_unit(self.pools, unit)
        errors: list[str] = []
        now = trio.current_time()
        avoided = {self.pools.index(avoid)} if avoid is not None else set()
        while len(tried) < len(self.pools):
            i = self._lb.pick(self.pools, now, tried | avoided)
            if i is None and avoided:
                avoided.clear()
                i = self._lb.pick(self.pools, now, tried)
            if i is None:
                break
            tried.add(i)
            pool = self.pools[i]
            try:
                link = await pool.acquire()
            except ConnectFailed as e:
                errors.append(str(e))
                self.guard.connect_failed(pool, trio.current_time())
                continue
            stream = link.start_stream(headers, end)
            self.stream_started(pool)
            return pool, link, stream
        detail = "; ".join(errors) or ("no endpoints" if unit is None else f"no endpoint of unit '{unit}'")
        raise UpstreamUnavailable(f"cluster '{self.name}' has no reachable endpoint ({detail})")

    def pick(self, tried: set[int]) -> int | None:
        """The index of the endpoint the load balancer picks, outside `tried`; None if none is left.

        For a client that opens its own connections (the lean risk callout);
        open_stream does this and more for the proxy's calls.
        """
        return self._lb.pick(self.pools, trio.current_time(), tried)

    def stream_started(self, pool: EndpointPool, n: int = 1) -> None:
        pool.active_requests += n
        self._streams_active.inc(n)

    def stream_done(self, pool: EndpointPool, n: int = 1) -> None:
        pool.active_requests -= n
        self._streams_active.dec(n)

    def snapshot(self) -> dict[str, object]:
        return {"name": self.name, "lb": self.config.lb, "breaker": self.guard.snapshot(),
                "endpoints": [p.snapshot() for p in self.pools]}

    async def close(self, timeout: float) -> None:
        if self._health is not None:
            self._health.cancel()
        self.lean.close()
        async with trio.open_nursery() as nursery:
            for pool in self.pools:
                nursery.start_soon(pool.close, timeout)


AnyCluster = Cluster | ThriftCluster


class ClusterManager:
    """Owns every cluster; a reload reuses clusters whose config did not change."""

    def __init__(self, nursery: trio.Nursery, metrics: Metrics) -> None:
        self._nursery = nursery
        self._metrics = metrics
        self.clusters: dict[str, AnyCluster] = {}

    def update(self, configs: tuple[ClusterConfig, ...]) -> tuple[dict[str, AnyCluster], list[AnyCluster]]:
        """The clusters for a new config, and the old ones it no longer uses."""
        new: dict[str, AnyCluster] = {}
        for c in configs:
            old = self.clusters.get(c.name)
            if old is not None and old.config == c:
                new[c.name] = old
                _reload_tls(old)
            elif c.protocol == "thrift":
                new[c.name] = ThriftCluster(c, self._nursery, self._metrics)
            else:
                new[c.name] = Cluster(c, self._nursery, self._metrics)
        retired = [c for name, c in self.clusters.items() if new.get(name) is not c]
        self.clusters = new
        return new, retired


def _reload_tls(cluster: AnyCluster) -> None:
    """Certificates are read again on every reload (rotated files take effect for new connections)."""
    if cluster.config.tls.mode == "disable":
        return
    try:
        tls_config = client_tls(cluster.config)
    except (OSError, ValueError) as e:  # the files changed since the config was checked
        log.error("cluster %s: TLS files not reloaded, the previous ones stay: %s", cluster.name, e)
        return
    for pool in cluster.pools:
        pool.tls = tls_config
