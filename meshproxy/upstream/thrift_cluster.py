"""A Thrift cluster: pooled upstream connections shared by every downstream call.

Knows: which endpoint and which connection takes a call next, when to open
another connection, and how long to avoid an endpoint that failed. Must not:
route, render errors, or translate framings (the Thrift proxy does).

Calls from many downstream connections share upstream connections: each call
gets a fresh seqid on the connection it is written to. An upstream that
answers in order (`mux: false`) gets a new connection while every open one is
busy, up to `max_connections_per_endpoint`, and only then pipelining; one
that answers out of order (`mux: true`) fills a connection up to
`max_requests_per_connection` before another is opened.
"""

from __future__ import annotations

import logging

import trio

from meshproxy import tls
from meshproxy.codec import thrift
from meshproxy.config import Cluster as ClusterConfig
from meshproxy.drivers.thrift import UpstreamConnection, flush_writes
from meshproxy.errors import UpstreamUnavailable
from meshproxy.metrics import Metrics
from meshproxy.upstream import health, lb
from meshproxy.upstream.guard import Guard
from meshproxy.upstream.pool import CappedPool, ConnectFailed, client_tls, dial, failure_reason
from meshproxy.values import Address

log = logging.getLogger(__name__)


class ThriftEndpointPool(CappedPool):
    def __init__(self, cluster: ClusterConfig, address: Address, nursery: trio.Nursery, metrics: Metrics,
                 client_tls: tls.ClientTls | None = None) -> None:
        super().__init__(cluster.name, str(address), metrics)
        self.tls = client_tls  # replaced on reload: new connections use the re-read certificates
        self.options = cluster.thrift
        self.connect_timeout = cluster.connect_timeout
        self.address = address
        self.links: list[tuple[str, UpstreamConnection]] = []  # (transport, connection)
        self._connecting: dict[str, int] = {}
        self._nursery = nursery

    def snapshot(self) -> dict[str, object]:
        return {
            **self.state_snapshot(trio.current_time()),
            "connections": [
                {"transport": t, "in_flight": len(c.waiting), "max_requests": c.max_requests}
                for t, c in self.links
            ],
        }

    def pick(self, transport: str) -> UpstreamConnection | None:
        """An open connection with room: for `mux` the first (filling one connection
        batches its writes), else the least busy."""
        mux = self.options.mux
        best: UpstreamConnection | None = None
        fewest = 1 << 30
        for t, link in self.links:
            n = len(link.waiting)
            if t != transport or n >= link.max_requests or link.transport.closed:
                continue
            if mux or n == 0:
                return link
            if n < fewest:
                best, fewest = link, n
        return best

    async def acquire(self, transport: str) -> UpstreamConnection:
        o = self.options
        while True:
            best = self.pick(transport)
            mine = sum(1 for t, _ in self.links if t == transport) + self._connecting.get(transport, 0)
            caps = self.caps
            can_open = mine < o.max_connections_per_endpoint and (caps is None or caps.may_connect())
            if best is not None and (not best.waiting or o.mux or not can_open):
                return best
            # About to wait: what earlier calls queued must not wait with us.
            flush_writes()
            if can_open:
                try:
                    return await self._connect(transport)
                except ConnectFailed:
                    if best is not None:
                        return best
                    raise
            if caps is not None and not mine:
                raise self._no_connection()
            await self._wait_for_room(o.max_pending)

    async def _connect(self, transport: str) -> UpstreamConnection:
        self._connecting[transport] = self._connecting.get(transport, 0) + 1
        m = self._metrics
        if self.caps is not None:
            self.caps.connections += 1
        connected = False
        try:
            sock = await dial(self.address, self.connect_timeout, self.options.write_timeout, self.tls,
                              self._metrics, self.cluster)
            connected = True
        except (OSError, trio.TooSlowError, tls.TlsError) as e:
            reason = failure_reason(e)
            self.connect_failed(reason)
            m.child(m.upstream_connect_failures, self.cluster).inc()
            raise ConnectFailed(f"{self.name}: {reason}") from None
        finally:
            self._connecting[transport] -= 1
            if not connected and self.caps is not None:
                self.caps.connections -= 1
        self.connected()
        o = self.options
        link = UpstreamConnection(
            sock,
            thrift.Reader(transport, None, o.max_frame_size, o.max_header_size),
            endpoint=self.name,
            max_requests=o.max_requests_per_connection,
            idle_timeout=o.idle_timeout,
            on_protocol_error=m.child(m.upstream_protocol_errors, self.cluster).inc,
        )
        link.capacity_changed = self._capacity_changed
        self.links.append((transport, link))
        self._nursery.start_soon(self._run, transport, link)
        return link

    async def _run(self, transport: str, link: UpstreamConnection) -> None:
        m = self._metrics
        active = m.child(m.upstream_connections_active, self.cluster)
        m.child(m.upstream_connections, self.cluster).inc()
        active.inc()
        try:
            await link.run()
        finally:
            active.dec()
            if self.caps is not None:
                self.caps.connections -= 1
            if (transport, link) in self.links:
                self.links.remove((transport, link))
            self._capacity_changed()

    async def close(self, timeout: float) -> None:
        async with trio.open_nursery() as nursery:
            for _, link in list(self.links):
                nursery.start_soon(link.close_gracefully, timeout)


class ThriftCluster:
    protocol = "thrift"

    def __init__(self, config: ClusterConfig, nursery: trio.Nursery, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self.options = config.thrift
        tls_config = client_tls(config)
        self.pools = [ThriftEndpointPool(config, a, nursery, metrics, tls_config) for a in config.endpoints]
        self.guard = Guard(config, self.pools, metrics)
        for pool, unit in zip(self.pools, config.endpoint_units, strict=False):
            pool.unit = unit
        for pool in self.pools:
            pool.caps = self.guard.breakers
        self._lb = lb.make(config.lb, dynamic=config.dynamic_weights is not None)
        self._active = metrics.child(metrics.upstream_streams_active, config.name)
        self._health = health.start(config, self.pools, nursery, metrics, tls_config)

    def __repr__(self) -> str:
        return f"<ThriftCluster {self.name}>"

    def fixed_transport(self, caller: str) -> str:
        t = self.options.transport
        return caller if t == "auto" else t

    def ready(self, transport: str, unit: str | None = None) -> tuple[ThriftEndpointPool, UpstreamConnection] | None:
        """A connection that takes a call right now, when there is one endpoint
        (a sidecar's local app, most often) and it has room: no await needed."""
        if len(self.pools) == 1 and (unit is None or self.pools[0].unit == unit):
            link = self.pools[0].pick(transport)
            if link is not None and (self.options.mux or not link.waiting):
                return self.pools[0], link
        return None

    async def acquire(
        self, transport: str, unit: str | None = None, avoid: ThriftEndpointPool | None = None
    ) -> tuple[ThriftEndpointPool, UpstreamConnection]:
        """A connection with room for one more call (to an endpoint of `unit`, if given);
        UpstreamUnavailable if no endpoint takes it. A retry names the endpoint
        that just failed it as `avoid`: another is preferred while there is one."""
        pools = self.pools
        tried = lb.outside_unit(pools, unit)
        errors: list[str] = []
        now = trio.current_time()
        avoided = {pools.index(avoid)} if avoid is not None else set()
        while len(tried) < len(pools):
            i = self._lb.pick(pools, now, tried | avoided)
            if i is None and avoided:
                avoided.clear()
                i = self._lb.pick(pools, now, tried)
            if i is None:
                break
            tried.add(i)
            pool = pools[i]
            try:
                return pool, await pool.acquire(transport)
            except ConnectFailed as e:
                errors.append(str(e))
                self.guard.connect_failed(pool, trio.current_time())
        detail = "; ".join(errors) or ("no endpoints" if unit is None else f"no endpoint of unit '{unit}'")
        raise UpstreamUnavailable(f"cluster '{self.name}' has no reachable endpoint ({detail})")

    def call_started(self, pool: ThriftEndpointPool) -> None:
        pool.active_requests += 1
        self._active.inc()

    def call_done(self, pool: ThriftEndpointPool) -> None:
        pool.active_requests -= 1
        self._active.dec()

    def snapshot(self) -> dict[str, object]:
        return {"name": self.name, "protocol": "thrift", "lb": self.config.lb, "breaker": self.guard.snapshot(),
                "endpoints": [p.snapshot() for p in self.pools]}

    async def close(self, timeout: float) -> None:
        if self._health is not None:
            self._health.cancel()
        async with trio.open_nursery() as nursery:
            for pool in self.pools:
                nursery.start_soon(pool.close, timeout)
