"""Active health checks: each endpoint of a cluster is asked, on its own
connection, whether it is fit to take calls.

Knows: the three probes (gRPC `grpc.health.v1.Health/Check`, an HTTP/2 GET,
a Thrift call of a method without arguments), when to check (every
`interval`, the first one at a random offset, each with a little jitter),
the healthy/unhealthy thresholds, and the check's own connection per
endpoint. Must not: touch the call pools or pick endpoints; the verdict is
`EndpointState.checked_healthy`, which load balancing reads.

As in Envoy, the checker's connection is separate from the pools' (a check
never waits behind calls, and a call never lands on a connection a check is
about to drop); it is reused between checks and closed after any check that
does not pass, so the next check also tests that a new connection can be made.

The file has two halves: pure helpers that build requests and judge replies
(no I/O, no clock), and the trio tasks that run them.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Final

import trio
from h2.errors import ErrorCodes

from meshproxy import tls
from meshproxy.codec import grpc, protobuf, theader, thrift, ttheader
from meshproxy.codec.errors import ThriftError
from meshproxy.config import Cluster as ClusterConfig
from meshproxy.config import HealthCheck
from meshproxy.drivers.h2 import ClientLink, Stream, StreamReset
from meshproxy.drivers.transport import Transport, TransportClosed
from meshproxy.metrics import Metrics
from meshproxy.upstream.endpoint import EndpointState
from meshproxy.upstream.pool import dial, failure_reason
from meshproxy.values import Address

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# Results, the `result` label of meshproxy_health_checks.
OK: Final = "ok"
FAILED: Final = "failed"  # an answer that says "not healthy", or a broken one
TIMEOUT: Final = "timeout"  # connected, but no whole answer within `timeout`
CONNECT_FAILED: Final = (
    "connect_failed"  # refused, unreachable, TLS failed, or no connection within `timeout`
)

# Each wait after a check is stretched by up to this share of the interval, so
# checkers that happened to line up (many sidecars started by one rollout)
# drift apart instead of hitting an endpoint together forever (Envoy's
# interval_jitter_percent does the same).
JITTER: Final = 0.1

# A health answer is a few bytes; more than this is not one (and must not be buffered).
MAX_RESPONSE: Final = 64 * 1024

GRPC_HEALTH_PATH: Final = b"/grpc.health.v1.Health/Check"
# grpc/health/v1/health.proto: HealthCheckResponse.ServingStatus.
SERVING: Final = 1
_SERVING_NAMES: Final = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
USER_AGENT: Final = b"meshproxy-health-check"


# -- thresholds (pure bookkeeping) --------------------------------------------


class Thresholds:
    """Consecutive results to a verdict.

    The first result decides at once: an endpoint that is down when the proxy
    starts leaves load balancing at its first check instead of after
    `unhealthy_threshold` of them, and one that is up is marked so at once.
    After that it takes `healthy_threshold` passes in a row to come back and
    `unhealthy_threshold` failures in a row to leave (one flaky answer moves
    nothing).
    """

    __slots__ = ("healthy", "healthy_threshold", "streak", "unhealthy_threshold")

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy: bool | None = None
        self.streak = 0  # results in a row that disagree with `healthy`

    def __repr__(self) -> str:
        return f"<Thresholds healthy={self.healthy} streak={self.streak}>"

    def record(self, passed: bool) -> bool:
        """Count one result; True if it changed the verdict."""
        if self.healthy is None:
            self.healthy = passed
            return True
        if passed == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.healthy_threshold if passed else self.unhealthy_threshold):
            return False
        self.healthy = passed
        self.streak = 0
        return True


# -- requests and verdicts (sans-IO) ------------------------------------------


def authority(address: Address) -> bytes:
    # A unix socket has no host name; "localhost" is what gRPC clients send there.
    return b"localhost" if address.kind == "unix" else str(address).encode()


def grpc_request(
    authority: bytes, scheme: bytes, service: str, timeout: float
) -> tuple[Headers, bytes]:
    """Headers and body of a Health/Check call (gRPC PROTOCOL-HTTP2.md, "Requests")."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", scheme),
        (b":path", GRPC_HEALTH_PATH),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", grpc.format_timeout(timeout)),
        (b"user-agent", USER_AGENT),
    ]
    # HealthCheckRequest { string service = 1; }: "" asks about the whole server.
    return headers, grpc.frame_message(protobuf.string_field(1, service))


def grpc_verdict(head: Headers, body: bytes, trailers: Headers | None) -> str | None:
    """None if the answer says SERVING, else why not."""
    h = dict(head)
    if h.get(b":status") != b"200":
        return f"HTTP status {h.get(b':status', b'-').decode('latin-1')}"
    # A trailers-only answer (an error, mostly) carries grpc-status in its head.
    t = dict(trailers) if trailers is not None else h
    status = t.get(b"grpc-status")
    if status is None:
        return "no grpc-status"
    if status != b"0":
        message = grpc.decode_message(t.get(b"grpc-message", b""))
        return f"grpc-status {status.decode('latin-1')}" + (f" ({message})" if message else "")
    try:
        messages = grpc.MessageReader(MAX_RESPONSE).feed(body)
    except ValueError as e:
        return str(e)
    if len(messages) != 1 or messages[0][0]:
        return "not one uncompressed HealthCheckResponse"
    serving = 0  # proto3: an absent field is the default, UNKNOWN
    try:
        for number, _, value in protobuf.fields(messages[0][1]):
            if number == 1:
                serving = protobuf.as_int(value, number)
    except protobuf.DecodeError as e:
        return f"bad HealthCheckResponse: {e}"
    if serving != SERVING:
        return f"status {_SERVING_NAMES.get(serving, str(serving))}"
    return None


def http_request(authority: bytes, scheme: bytes, path: str) -> Headers:
    return [
        (b":method", b"GET"),
        (b":scheme", scheme),
        (b":path", path.encode()),
        (b":authority", authority),
        (b"user-agent", USER_AGENT),
    ]


def http_verdict(head: Headers) -> str | None:
    """2xx passes; anything else (a redirect too: it points away from the endpoint checked) fails."""
    status = dict(head).get(b":status", b"")
    if status[:1] == b"2" and len(status) == 3:
        return None
    return f"HTTP status {status.decode('latin-1') or '-'}"


def thrift_method(check: HealthCheck) -> str:
    """The message name: `method`, behind `Service:` for a TMultiplexedProtocol server."""
    service = check.service.rstrip(":")
    return f"{service}:{check.method}" if service else check.method


def thrift_transport(cluster: ClusterConfig) -> tuple[str, int]:
    """(transport, protocol) the checks speak: the cluster's, framed binary where it adapts to callers."""
    t = cluster.thrift
    transport = thrift.FRAMED if t.transport == "auto" else t.transport
    return transport, thrift.COMPACT if t.protocol == "compact" else thrift.BINARY


def thrift_call(name: str, seqid: int, transport: str, protocol: int, cluster: str) -> bytes:
    """A CALL of `name` with an empty argument struct (one STOP byte, in binary and compact alike)."""
    payload = thrift.encode_head(name, thrift.CALL, seqid, protocol) + b"\x00"
    header: theader.Header | ttheader.Header | None = None
    if transport == thrift.TTHEADER:
        header = ttheader.Header(seqid, protocol)
        # What a Kitex server routes by when a caller has no TTHeader of its own.
        header.set_metadata(
            [
                (ttheader.TO_SERVICE_NAME, cluster.encode()),
                (ttheader.TO_METHOD_NAME, name.rpartition(":")[2].encode()),
            ]
        )
    elif transport == thrift.HEADER:
        header = theader.Header(seqid, protocol)
    return thrift.wrap(transport, payload, header)


def thrift_verdict(msg: thrift.Message, seqid: int) -> str | None:
    """None for a REPLY to our call. A TApplicationException (unknown method,
    internal error) fails: the server did not run the method."""
    head = msg.head
    if head.seqid != seqid:
        return f"a reply with seqid {head.seqid} to call {seqid}"
    if head.mtype == thrift.EXCEPTION:
        why = _exception_text(msg.frame, head)
        return "TApplicationException" + (f": {why}" if why else "")
    if head.mtype != thrift.REPLY:
        return f"message type {head.mtype} instead of a reply"
    return None


def _exception_text(frame: bytes, head: thrift.Head) -> str:
    """TApplicationException's field 1 (message) when it comes first, as Apache
    and Kitex write it; "" otherwise (the text is for the log only)."""
    pos = head.body_at
    try:
        if head.protocol == thrift.COMPACT:
            if frame[pos] != 0x18:  # field delta 1, type binary
                return ""
            size, pos = protobuf.read_varint(
                frame, pos + 1
            )  # a compact varint is a protobuf varint
        else:
            if frame[pos : pos + 3] != b"\x0b\x00\x01":  # type string, field 1
                return ""
            size, pos = int.from_bytes(frame[pos + 3 : pos + 7], "big"), pos + 7
        return frame[pos : pos + min(size, 200)].decode("utf-8", "replace")
    except (IndexError, protobuf.DecodeError):
        return ""


# -- the trio side ------------------------------------------------------------

# What a check may raise: while connecting, each means connect_failed (dial's
# own taxonomy); after, failed. Either way its text is the reason logged.
_ERRORS = (OSError, trio.TooSlowError, tls.TlsError, StreamReset, TransportClosed, ThriftError)


class _Checker:
    """One endpoint's probe and its own connection to it."""

    def __init__(
        self,
        cluster: ClusterConfig,
        address: Address,
        endpoint: EndpointState,
        client_tls: tls.ClientTls | None,
        metrics: Metrics,
        nursery: trio.Nursery,
    ) -> None:
        self.cluster = cluster
        self.check: HealthCheck = cluster.health_check  # type: ignore[assignment]
        self.address = address
        self.endpoint = endpoint
        self.client_tls = client_tls
        self.metrics = metrics
        self.nursery = nursery  # runs the connection's tasks; the checker's task owns it

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.cluster.name} {self.endpoint.name} connected={self.connected}>"

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def _dial(self) -> Transport:
        # A reload that keeps the cluster re-reads its certificates into the
        # pools (cluster._reload_tls); checks follow them.
        current: tls.ClientTls | None = getattr(self.endpoint, "tls", self.client_tls)
        return await dial(
            self.address,
            self.cluster.connect_timeout,
            self.check.timeout,
            current,
            self.metrics,
            self.cluster.name,
        )

    async def connect(self) -> None:
        raise NotImplementedError

    async def probe(self) -> str | None:
        """Ask once on the open connection: None if healthy, else why not."""
        raise NotImplementedError

    def close(self, reason: str) -> None:
        raise NotImplementedError


class _H2Checker(_Checker):
    """gRPC and HTTP checks: one stream per check on a ClientLink of our own."""

    link: ClientLink | None = None

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.available > 0

    async def connect(self) -> None:
        self.close("replaced")  # one that had a GOAWAY or lost its socket
        transport = await self._dial()
        o = self.cluster.http2
        link = ClientLink(
            transport,
            endpoint=self.endpoint.name,
            max_header_list_size=o.max_header_list_size,
            stream_window=o.stream_window,
            connection_window=o.connection_window,
            keepalive_interval=o.keepalive_interval,
            keepalive_timeout=o.keepalive_timeout,
            idle_timeout=o.idle_timeout,
        )
        self.link = link
        self.nursery.start_soon(link.run)

    async def probe(self) -> str | None:
        link = self.link
        assert link is not None
        scheme = b"http" if self.client_tls is None else b"https"
        if self.check.type == "grpc":
            headers, body = grpc_request(
                authority(self.address), scheme, self.check.service, self.check.timeout
            )
            stream = link.start_stream(headers, False)
        else:
            stream = link.start_stream(
                http_request(authority(self.address), scheme, self.check.path), True
            )
        try:
            if self.check.type == "grpc":
                await link.send_data(stream, body, True)
            head = await stream.wait_head()
            if self.check.type != "grpc":
                return http_verdict(head)
            return grpc_verdict(head, await _read_all(stream), stream.trailers)
        finally:
            # An answer not read to its end (an HTTP body) is cancelled, not left open.
            if stream.done:
                link.forget(stream)
            else:
                link.reset(stream, ErrorCodes.CANCEL)

    def close(self, reason: str) -> None:
        if self.link is not None:
            self.link.transport.close(reason)  # its run() task ends with it
            self.link = None


async def _read_all(stream: Stream) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while data := await stream.read():
        size += len(data)
        if size > MAX_RESPONSE:
            raise StreamReset(ErrorCodes.CANCEL, f"a health answer over {MAX_RESPONSE} bytes")
        chunks.append(data)
    return b"".join(chunks)


class _ThriftChecker(_Checker):
    """Thrift checks: one call at a time on a connection of our own; no reader task."""

    transport: Transport | None = None
    reader: thrift.Reader | None = None
    seqid = 0

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.closed

    async def connect(self) -> None:
        self.close("replaced")
        self.transport = await self._dial()
        framing, protocol = thrift_transport(self.cluster)
        o = self.cluster.thrift
        # The reply to a method without arguments is small: a bigger frame is
        # refused (a ThriftError, so a failed check) before it is buffered.
        self.reader = thrift.Reader(
            framing,
            protocol,
            min(o.max_frame_size, MAX_RESPONSE),
            min(o.max_header_size, MAX_RESPONSE),
        )

    async def probe(self) -> str | None:
        transport, reader = self.transport, self.reader
        assert transport is not None and reader is not None
        self.seqid = self.seqid % 0x7FFFFFFF + 1
        framing, protocol = thrift_transport(self.cluster)
        transport.write(
            thrift_call(thrift_method(self.check), self.seqid, framing, protocol, self.cluster.name)
        )
        if transport.has_backlog:
            await transport.drain_backlog()
        while (msg := reader.next()) is None:
            data = await transport.recv()
            if not data:
                return "connection closed by the endpoint"
            reader.feed(data)
        return thrift_verdict(msg, self.seqid)

    def close(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.close(reason)
            self.transport = self.reader = None


async def check_once(checker: _Checker, timeout: float) -> tuple[str, str]:
    """(result, reason) of one check, connect + request + answer within `timeout`."""
    connecting = False
    with trio.move_on_after(timeout):
        try:
            if not checker.connected:
                connecting = True
                await checker.connect()
                connecting = False
            why = await checker.probe()
        except _ERRORS as e:
            if connecting:
                return CONNECT_FAILED, failure_reason(e)
            return FAILED, str(e) or type(e).__name__
        return (OK, "") if why is None else (FAILED, why)
    if connecting:
        return CONNECT_FAILED, f"no connection within {timeout:g}s"
    return TIMEOUT, f"no answer within {timeout:g}s"


async def _run(checker: _Checker, rng: random.Random) -> None:
    check, endpoint, m = checker.check, checker.endpoint, checker.metrics
    cluster = checker.cluster.name
    state = Thresholds(check.healthy_threshold, check.unhealthy_threshold)
    try:
        # The first check at a random point of the first interval: sidecars
        # started together (and endpoints listed together) do not check in step.
        next_at = trio.current_time() + rng.uniform(0.0, check.interval)
        while True:
            await trio.sleep_until(next_at)
            next_at = trio.current_time() + check.interval * (1.0 + rng.uniform(0.0, JITTER))
            result, reason = await check_once(checker, check.timeout)
            if result != OK:
                checker.close(f"health check {result}")  # the next check tests a new connection too
            m.child(m.health_checks, cluster, result).inc()
            changed = state.record(result == OK)
            endpoint.checked_healthy = state.healthy
            # Looked up each time, not kept: after a reload that rebuilt the
            # cluster, the old checker's `remove` below may come after this
            # checker's first set, and a kept child would then be orphaned
            # (set, but no longer exported) for good.
            m.endpoint_healthy.labels(cluster, endpoint.name).set(1 if state.healthy else 0)
            if changed:
                _log_change(cluster, endpoint.name, state.healthy, result, reason)
            elif result != OK:
                log.debug(
                    "cluster %s: %s health check %s: %s", cluster, endpoint.name, result, reason
                )
    finally:
        checker.close("health checks stopped")
        # The cluster is gone (closed on reload or exit): its endpoints' series
        # go with it rather than keep a last value nobody updates.
        with contextlib.suppress(KeyError):
            m.endpoint_healthy.remove(cluster, endpoint.name)


def _log_change(
    cluster: str, endpoint: str, healthy: bool | None, result: str, reason: str
) -> None:
    if healthy:
        log.info(
            "cluster %s: endpoint %s passes its health checks; back in load balancing",
            cluster,
            endpoint,
        )
    else:
        log.warning(
            "cluster %s: endpoint %s fails its health checks (%s: %s); out of load balancing",
            cluster,
            endpoint,
            result,
            reason,
        )


async def _check_all(
    scope: trio.CancelScope,
    config: ClusterConfig,
    endpoints: Sequence[EndpointState],
    metrics: Metrics,
    client_tls: tls.ClientTls | None,
    rng: random.Random,
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for address, endpoint in zip(config.endpoints, endpoints, strict=True):
                nursery.start_soon(
                    _check_endpoint, config, address, endpoint, metrics, client_tls, rng
                )


async def _check_endpoint(
    config: ClusterConfig,
    address: Address,
    endpoint: EndpointState,
    metrics: Metrics,
    client_tls: tls.ClientTls | None,
    rng: random.Random,
) -> None:
    kind = _ThriftChecker if config.protocol == "thrift" else _H2Checker
    while True:
        try:
            async with trio.open_nursery() as connection_tasks:
                checker = kind(config, address, endpoint, client_tls, metrics, connection_tasks)
                try:
                    await _run(checker, rng)
                finally:
                    connection_tasks.cancel_scope.cancel()
        except Exception:
            # A bug in a check must not take the cluster (and the proxy) down
            # with it: log it, forget the verdict (load balancing then ignores
            # the checks), and start this endpoint's checks again.
            log.exception("cluster %s: health checks of %s failed", config.name, endpoint.name)
            endpoint.checked_healthy = None
            await trio.sleep(config.health_check.interval if config.health_check else 1.0)


def start(
    config: ClusterConfig,
    endpoints: Sequence[EndpointState],
    nursery: trio.Nursery,
    metrics: Metrics,
    client_tls: tls.ClientTls | None,
    *,
    rng: random.Random | None = None,
) -> trio.CancelScope | None:
    """Start checking `endpoints` (in `config.endpoints` order) if the cluster
    has a health_check; cancelling the returned scope stops every check and
    closes the checks' connections. `rng` makes the timing reproducible in tests."""
    if config.health_check is None or not endpoints:
        return None
    scope = trio.CancelScope()
    nursery.start_soon(
        _check_all, scope, config, endpoints, metrics, client_tls, rng or random.Random()
    )
    return scope
