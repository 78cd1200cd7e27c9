"""Pooled, multiplexed HTTP/2 connections to one endpoint.

Knows: how many streams each connection takes (the peer's
MAX_CONCURRENT_STREAMS), when to open another connection, when a connection
is done for (GOAWAY, closed). Must not: route or retry calls.
"""

from __future__ import annotations

import logging

import trio

from meshproxy import tls
from meshproxy.config import Cluster as ClusterConfig
from meshproxy.config import Http2Cluster, alpn_for
from meshproxy.drivers.h2 import ClientLink
from meshproxy.drivers.transport import Transport, connect
from meshproxy.errors import UpstreamOverflow
from meshproxy.metrics import Metrics
from meshproxy.upstream.breaker import Breakers
from meshproxy.upstream.endpoint import EndpointState
from meshproxy.values import Address

log = logging.getLogger(__name__)


class ConnectFailed(Exception):
    pass


class CappedPool(EndpointState):
    """What the HTTP/2 and Thrift pools share: waiting for room on an endpoint,
    within its own bound and the cluster's caps (max_connections, max_pending)."""

    def __init__(self, cluster: str, name: str, metrics: Metrics) -> None:
        super().__init__(cluster, name)
        self.pending = 0
        self.caps: Breakers | None = None  # the cluster's caps, shared by its endpoints
        self._capacity = trio.Event()
        self._metrics = metrics

    def _capacity_changed(self) -> None:
        if self.pending:  # called per finished call: only pay for an Event when someone waits
            self._capacity.set()
            self._capacity = trio.Event()

    def _no_connection(self) -> UpstreamOverflow:
        """This endpoint has no connection and the cluster's max_connections allows no new one."""
        self._overflow("max_connections")
        connections = self.caps.connections if self.caps is not None else 0
        return UpstreamOverflow(f"cluster '{self.cluster}' has {connections} connections (max_connections)")

    async def _wait_for_room(self, max_pending: int) -> None:
        """Wait for a connection to have room (a call ends, one opens), if this
        endpoint's and the cluster's queues of waiting calls are not full."""
        caps = self.caps
        if self.pending >= max_pending:
            raise UpstreamOverflow(f"{self.name}: every connection is full and {self.pending} calls wait")
        if caps is not None and not caps.may_wait():
            self._overflow("max_pending")
            raise UpstreamOverflow(f"cluster '{self.cluster}' has {caps.pending} calls waiting (max_pending)")
        self.pending += 1
        if caps is not None:
            caps.pending += 1
        try:
            await self._capacity.wait()
        finally:
            self.pending -= 1
            if caps is not None:
                caps.pending -= 1

    def _overflow(self, reason: str) -> None:
        self._metrics.child(self._metrics.breaker_rejected, self.cluster, reason).inc()


class EndpointPool(CappedPool):
    def __init__(
        self,
        cluster: str,
        address: Address,
        options: Http2Cluster,
        connect_timeout: float,
        nursery: trio.Nursery,
        metrics: Metrics,
        client_tls: tls.ClientTls | None = None,
    ) -> None:
        super().__init__(cluster, str(address), metrics)
        self.tls = client_tls  # replaced on reload: new connections use the re-read certificates
        self.address = address
        self.options = options
        self.connect_timeout = connect_timeout
        self.links: list[ClientLink] = []
        self._connecting = 0
        self._nursery = nursery

    def __repr__(self) -> str:
        return (
            f"<EndpointPool {self.name} links={len(self.links)} active={self.active_requests} "
            f"failures={self.consecutive_failures}>"
        )

    def snapshot(self) -> dict[str, object]:
        return {
            **self.state_snapshot(trio.current_time()),
            "connections": [
                {"streams": len(link.streams), "max_streams": link.max_streams,
                 "goaway": link.goaway_received,
                 "send_window": link.conn.outbound_flow_control_window,
                 "receive_window": link.conn.inbound_flow_control_window}
                for link in self.links
            ],
        }

    async def acquire(self) -> ClientLink:
        """A connection with a free stream slot: an open one, a new one, or after a wait."""
        while True:
            best = None
            for link in self.links:
                if link.available > 0 and (best is None or len(link.streams) < len(best.streams)):
                    best = link
                    break
            if best is not None:
                return best
            if len(self.links) + self._connecting < self.options.max_connections_per_endpoint:
                if self.caps is None or self.caps.may_connect():
                    return await self._connect()
                if not self.links and not self._connecting:
                    raise self._no_connection()
            await self._wait_for_room(self.options.max_pending)

    async def _connect(self) -> ClientLink:
        self._connecting += 1
        if self.caps is not None:
            self.caps.connections += 1
        child = self._metrics.child
        connected = False
        try:
            transport = await dial(self.address, self.connect_timeout, self.options.write_timeout, self.tls,
                                   self._metrics, self.cluster)
            connected = True
        except (OSError, trio.TooSlowError, tls.TlsError) as e:
            reason = failure_reason(e)
            self.connect_failed(reason)
            child(self._metrics.upstream_connect_failures, self.cluster).inc()
            raise ConnectFailed(f"{self.name}: {reason}") from None
        finally:
            self._connecting -= 1
            if not connected and self.caps is not None:
                self.caps.connections -= 1
        self.connected()
        o = self.options
        link = ClientLink(
            transport,
            endpoint=self.name,
            max_header_list_size=o.max_header_list_size,
            stream_window=o.stream_window,
            connection_window=o.connection_window,
            keepalive_interval=o.keepalive_interval,
            keepalive_timeout=o.keepalive_timeout,
            idle_timeout=o.idle_timeout,
            on_protocol_error=child(self._metrics.upstream_protocol_errors, self.cluster).inc,
        )
        link.capacity_changed = self._capacity_changed
        self.links.append(link)
        self._nursery.start_soon(self._run, link)
        return link

    async def _run(self, link: ClientLink) -> None:
        active = self._metrics.child(self._metrics.upstream_connections_active, self.cluster)
        self._metrics.child(self._metrics.upstream_connections, self.cluster).inc()
        active.inc()
        try:
            await link.run()
        finally:
            active.dec()
            if self.caps is not None:
                self.caps.connections -= 1
            if link in self.links:
                self.links.remove(link)
            self._capacity_changed()

    async def close(self, timeout: float) -> None:
        async with trio.open_nursery() as nursery:
            for link in list(self.links):
                nursery.start_soon(link.close_gracefully, "cluster removed", timeout)


async def dial(address: Address, connect_timeout: float, write_timeout: float, client_tls: tls.ClientTls | None,
               metrics: Metrics, cluster: str) -> Transport:
    """A connected transport to an endpoint, TLS if the cluster wants it.

    Raises OSError or trio.TooSlowError (connect), tls.TlsError (handshake).
    """
    a = address
    sock = await connect(a.kind, a.host, a.port, a.path, connect_timeout)
    if client_tls is None:
        return Transport(sock, write_timeout)
    try:
        transport = await tls.connect_upstream(sock, client_tls, a.host, write_timeout)
    except tls.TlsError as e:
        sock.close()
        metrics.child(metrics.tls_handshakes, "upstream", cluster, "failed").inc()
        raise tls.TlsError(f"TLS: {e}") from None
    except BaseException:  # cancelled mid-handshake
        sock.close()
        raise
    metrics.child(metrics.tls_handshakes, "upstream", cluster, "ok").inc()
    return transport


def failure_reason(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "connect timeout"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def client_tls(config: ClusterConfig) -> tls.ClientTls | None:
    t = config.tls
    if t.mode == "disable":
        return None
    return tls.client_context(t.mode, t.cert, t.key, t.ca, t.min_version, alpn_for(config.protocol), t.server_name,
                              t.peer_identities, t.handshake_timeout)
