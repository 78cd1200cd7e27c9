"""HTTP/2 proxying of one call: filters, route, upstream stream, both bodies.

Knows: how a downstream stream becomes a Call, runs the chain, gets its
upstream stream from a cluster and is answered; how failures become replies
(the one place errors are rendered for HTTP/2 and gRPC). Must not: parse
frames (the driver does) or choose endpoints (the cluster does).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from h2.errors import ErrorCodes

from meshproxy import retry, status
from meshproxy.accesslog import AccessLog
from meshproxy.attempts import Budgets, Retrying, Tape
from meshproxy.call import Body, Call, ChunkObserver, Completion, Headers, Protocol, Response
from meshproxy.codec import grpc
from meshproxy.config import Listener as ListenerConfig
from meshproxy.drivers.h2 import ServerLink, Stream, StreamReset
from meshproxy.errors import (
    NoRoute,
    PerTryTimeout,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshproxy.filters.base import Chain, Respond
from meshproxy.metrics import Metrics
from meshproxy.router import Router
from meshproxy.upstream.cluster import Cluster
from meshproxy.upstream.guard import Admission, Guard
from meshproxy.upstream.pool import EndpointPool

log = logging.getLogger(__name__)

# A GOAWAY can refuse many streams at once (nginx sends one every 1000
# requests); each call is retried on another connection at most this often.
MAX_REFUSED_RETRIES = 3
# A local reply after a deadline or a crash may wait this long for the
# client's flow-control window, then the stream is reset instead.
LOCAL_REPLY_GRACE = 1.0

_STATUS = {code: str(code).encode() for code in range(100, 600)}


@dataclass(frozen=True, slots=True)
class ListenerState:
    """What one listener's calls use; a reload swaps in a new one atomically.

    A call takes the state current when it starts and keeps it to the end.
    """

    config: ListenerConfig
    router: Router
    chain: Chain
    # Cluster for HTTP/2 listeners, ThriftCluster for Thrift ones (the config checks).
    clusters: dict[str, Any]
    access_log: AccessLog
    metrics: Metrics
    node_service: str = "meshproxy"
    # Listener filters then the route's, for routes that have filters (by id of the Route).
    route_chains: dict[int, Chain] | None = None

    def chain_for(self, route: object | None) -> Chain:
        if route is None or not self.route_chains:
            return self.chain
        return self.route_chains.get(id(route), self.chain)


class _Outcome:
    """What happened to one call, for metrics and the access log."""

    __slots__ = ("bytes_out", "chain", "grpc_status", "headers", "reason", "response_started", "status", "trailers",
                 "upstream")

    def __init__(self) -> None:
        self.status = 0  # 0: no response sent (client went away first)
        self.grpc_status = ""
        self.response_started = False
        self.reason = ""
        self.bytes_out = 0
        self.upstream = ""
        self.trailers: Headers | None = None
        self.headers: Headers | None = None  # as sent downstream
        self.chain: Chain | None = None


class HttpProxy:
    """The call handler of one HTTP/2 listener."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state
        self._ids = 0
        self._budgets = Budgets()
        self._rng = random.Random()

    async def handle(self, link: ServerLink, stream: Stream, raw: Headers) -> None:
        state = self.state
        metrics = state.metrics
        name = state.config.name
        now = trio.current_time()
        method = path = authority = b""
        scheme = b"http"
        headers: Headers = []
        content_type = grpc_timeout = request_id = None
        for k, v in raw:
            if k[0] == 58:  # b":"
                if k == b":method":
                    method = v
                elif k == b":path":
                    path = v
                elif k == b":authority":
                    authority = v
                elif k == b":scheme":
                    scheme = v
                continue
            if k == b"content-type":
                content_type = v
            elif k == b"grpc-timeout":
                grpc_timeout = v
                continue  # re-sent below with the time left
            elif k == b"x-request-id":
                request_id = v
            elif k == b"host":
                # RFC 9113 8.3.1: :authority wins over Host; forward one of them.
                if not authority:
                    authority = v
                continue
            headers.append((k, v))
        if request_id is None:
            request_id = os.urandom(16).hex().encode()
            headers.append((b"x-request-id", request_id))
        is_grpc = grpc.is_grpc_content_type(content_type)
        deadline = math.inf
        if grpc_timeout is not None:
            seconds = grpc.parse_timeout(grpc_timeout)
            if seconds is not None:
                deadline = now + seconds
        self._ids += 1
        call = Call(
            id=self._ids,
            protocol=Protocol.GRPC if is_grpc else Protocol.HTTP2,
            peer=link.peer,
            listener=name,
            direction=state.config.direction,
            authority=authority.decode("latin-1"),
            method=method.decode("latin-1"),
            path=path.decode("latin-1"),
            headers=headers,
            body=stream,
            start=now,
            deadline=deadline,
            scheme=scheme.decode("latin-1"),
            request_id=request_id.decode("latin-1"),
            client_gone=lambda: stream.reset_code is not None,
        )
        out = _Outcome()
        active = metrics.child(metrics.downstream_streams_active, name)
        active.inc()
        try:
            # One scope for the call: the deadline, and a client reset (the
            # driver cancels `stream.scope`).
            with trio.CancelScope(deadline=call.deadline) as scope:
                stream.scope = scope
                if stream.reset_code is None:
                    try:
                        await self._proxy(call, link, stream, state, out, scope)
                    except ProxyError as e:
                        await self._fail(call, link, stream, out, e)
                    except StreamReset as e:
                        await self._upstream_reset(call, link, stream, out, e)
            if scope.cancelled_caught and stream.reset_code is None:
                await self._timed_out(call, link, stream, out)
        except Exception:
            log.exception("call %s on listener %s failed", call.request_id, name)
            out.reason = out.reason or "internal_error"
            if not out.response_started:
                with trio.CancelScope(shield=True), trio.move_on_after(LOCAL_REPLY_GRACE):
                    await self._reply(call, link, stream, out, 500, status.INTERNAL, "internal proxy error")
        finally:
            active.dec()
            self._record(call, stream, out, state)

    async def _proxy(
        self,
        call: Call,
        link: ServerLink,
        stream: Stream,
        state: ListenerState,
        out: _Outcome,
        deadline_scope: trio.CancelScope,
    ) -> None:
        route = state.router.match(call.path, call.headers)
        if route is not None:
            call.route = route
            call.cluster = state.router.cluster_for(route, call.headers)
            if route.timeout > 0 and call.start + route.timeout < call.deadline:
                call.deadline = deadline_scope.deadline = call.start + route.timeout
        chain = out.chain = state.chain_for(route)
        respond, ran = await chain.on_request(call)
        if deadline_scope.deadline != call.deadline:  # a filter may have changed it
            deadline_scope.deadline = call.deadline
        if respond is not None:
            await self._filter_reply(call, link, stream, out, respond, ran, chain)
            return
        if call.cluster is None:
            raise NoRoute(f"no route for {call.path}")
        cluster: Cluster | None = state.clusters.get(call.cluster)
        if cluster is None:
            raise UpstreamUnavailable(f"unknown cluster '{call.cluster}'")

        up_headers: Headers = [
            (b":method", call.method.encode("latin-1")),
            (b":scheme", call.scheme.encode("latin-1")),
            (b":authority", call.authority.encode("latin-1")),
            (b":path", call.path.encode("latin-1")),
        ]
        up_headers += call.headers
        body = call.body
        replay: bytes | None = None
        if body is stream and stream.ended:
            # The whole request is here already (unary calls, GETs): keep it,
            # so a stream the upstream refused unprocessed can be sent again.
            replay = self._take_body(call, link, stream)
        retrying = None
        policy = call.route.retry if call.route is not None else None
        if policy is not None and policy.attempts > 1:
            retrying = Retrying(call, cluster.name, cluster.guard, policy, self._budgets.for_route(call.route),
                                state.metrics, self._rng, None if replay is not None else Tape(policy.max_body_bytes))
        try:
            await self._attempts(call, link, stream, state, out, cluster, up_headers, body, replay, retrying)
        finally:
            if retrying is not None:
                retrying.finish()

    async def _attempts(
        self,
        call: Call,
        link: ServerLink,
        stream: Stream,
        state: ListenerState,
        out: _Outcome,
        cluster: Cluster,
        up_headers: Headers,
        body: Body,
        replay: bytes | None,
        retrying: Retrying | None,
    ) -> None:
        """Send the call upstream, and again as its route's retry policy allows."""
        guard = cluster.guard
        refused = 0
        last: EndpointPool | None = None
        while True:
            now = trio.current_time()
            if retrying is not None:
                # A streamed body's per-try timeout starts once it is all sent (_pump_request).
                retrying.start(now if replay is not None else math.inf)
            admission = None if not guard.active else \
                guard.admit(call.path, now) if retrying is None else retrying.admit(guard, call.path, now)
            end_on_headers = replay == b"" and stream.trailers is None
            headers = up_headers
            deadline = call.deadline if retrying is None else min(call.deadline, retrying.try_deadline)
            if deadline != math.inf and call.is_grpc:
                # gRPC spec: propagate the deadline (this attempt's), less the time already spent.
                headers = [*up_headers, (b"grpc-timeout", grpc.format_timeout(deadline - now))]
            try:
                pool, ulink, ustream = await cluster.open_stream(headers, end_on_headers, call.endpoint_unit, last)
            except UpstreamUnavailable:
                guard.abandon(admission)
                if retrying is not None and await retrying.again(retry.CONNECT_FAILURE):
                    continue
                raise
            except BaseException:
                guard.abandon(admission)
                raise
            last = pool
            out.upstream = call.upstream_address = pool.name
            if not pool.healthy(now):
                call.flag("no_healthy_upstream")
            failure: Exception | _Retry | None = None
            try:
                if replay is None:
                    failure = await self._exchange_streaming(call, link, stream, body, ustream, state, out, retrying)
                else:
                    failure = await self._exchange(call, link, stream, replay, end_on_headers, ustream, state, out,
                                                   retrying)
            finally:
                if ustream.done:
                    ulink.forget(ustream)
                else:
                    ulink.reset(ustream, ErrorCodes.CANCEL)
                cluster.stream_done(pool)
                if admission is not None:
                    self._account(call, guard, admission, pool, out, failure)
            if isinstance(failure, _Retry):
                await trio.sleep(failure.delay)
                continue
            if failure is None:
                return
            if not out.response_started:
                kind = _failure_kind(failure)
                if retrying is not None and kind is not None and await retrying.again(kind):
                    continue
                # RFC 9113 8.7: a refused stream was not processed; safe to send again
                # (a GOAWAY can refuse many at once), whatever the route's policy.
                if (
                    isinstance(failure, StreamReset)
                    and failure.code == ErrorCodes.REFUSED_STREAM
                    and replay is not None
                    and refused < MAX_REFUSED_RETRIES
                ):
                    refused += 1
                    continue
            raise failure

    @staticmethod
    def _account(call: Call, guard: Guard, admission: Admission, pool: EndpointPool, out: _Outcome,
                 failure: Exception | _Retry | None) -> None:
        """Tell the cluster's guard how one attempt went."""
        now = trio.current_time()
        if call.client_gone():
            # The client left (reset its stream): whatever broke after that is not the upstream's doing.
            guard.abandon(admission)
            return
        if isinstance(failure, _Retry):
            verdict = guard.done(admission, pool, now, failure.status, failure.grpc_status)
        elif failure is not None and not out.response_started:
            local = not isinstance(failure, ProxyError) or isinstance(failure, UpstreamTimeout)
            verdict = guard.done(admission, pool, now, 0 if local else 503, "", local_failure=local)
        elif out.status:
            verdict = guard.done(admission, pool, now, out.status, out.grpc_status,
                                 local_failure=failure is not None)
        else:  # the call's deadline passed with no answer: a timeout, as for Thrift
            verdict = guard.done(admission, pool, now, 0, "", local_failure=True)
        if verdict == "ejected":
            call.flag("ejected")

    async def _exchange(
        self,
        call: Call,
        link: ServerLink,
        stream: Stream,
        replay: bytes,
        end_on_headers: bool,
        ustream: Stream,
        state: ListenerState,
        out: _Outcome,
        retrying: Retrying | None,
    ) -> Exception | _Retry | None:
        """A request held whole: send it, then relay the response. No extra task."""
        try:
            if not end_on_headers:
                if replay:
                    await ustream.link.send_data(ustream, replay, end=stream.trailers is None)
                if stream.trailers is not None:
                    ustream.link.send_headers(ustream, stream.trailers, True)
            head = await _wait_head(ustream, retrying)
            if retrying is not None and (again := _retry_reply(retrying, head, ustream)) is not None:
                return again
            await self._respond(call, link, stream, ustream, head, state, out)
        except (StreamReset, ProxyError) as e:
            return e
        return None

    async def _exchange_streaming(
        self,
        call: Call,
        link: ServerLink,
        stream: Stream,
        body: Body,
        ustream: Stream,
        state: ListenerState,
        out: _Outcome,
        retrying: Retrying | None,
    ) -> Exception | _Retry | None:
        """A request body still arriving: a task forwards it while the response is relayed."""
        failure: Exception | _Retry | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_request, call, body, ustream, retrying)
            try:
                head = await _wait_head(ustream, retrying)
                if retrying is not None and (again := _retry_reply(retrying, head, ustream)) is not None:
                    failure = again
                else:
                    if retrying is not None and retrying.tape is not None:
                        retrying.tape.drop()  # the response is the client's now: no retry will need it
                    await self._respond(call, link, stream, ustream, head, state, out)
            except (StreamReset, ProxyError) as e:
                # Caught here, not from the nursery: no exception group.
                failure = e
            if not ustream.sent_end:
                nursery.cancel_scope.cancel()  # the response is over: stop sending the request
        return failure

    @staticmethod
    def _take_body(call: Call, link: ServerLink, stream: Stream) -> bytes:
        """A fully received request body, its flow-control window handed back."""
        chunks = stream.chunks
        if not chunks:
            return b""
        data = b"".join(c for c, _ in chunks)
        window = sum(fc for _, fc in chunks)
        chunks.clear()
        link.acknowledge(stream, window)
        for observe in call.request_observers:
            observe(call, data)
        return data

    async def _respond(
        self, call: Call, link: ServerLink, stream: Stream, ustream: Stream, head: Headers, state: ListenerState,
        out: _Outcome,
    ) -> None:
        status = _head_status(head)
        response = Response(status, [(k, v) for k, v in head if k[0] != 58], ustream)
        chain = out.chain or state.chain
        await chain.on_response(call, response, len(chain.filters))
        down: Headers = [(b":status", _STATUS.get(response.status) or str(response.status).encode())]
        down += response.headers
        out.status = response.status
        end = ustream.ended and not ustream.chunks and ustream.trailers is None
        if end and call.is_grpc:
            out.grpc_status = _grpc_status(response.headers)
        link.send_headers(stream, down, end)
        out.headers = down
        out.response_started = True
        if not end:
            out.bytes_out = await _pump(call, ustream, stream, call.response_observers)
            out.trailers = ustream.trailers
            if call.is_grpc and ustream.trailers is not None:
                out.grpc_status = _grpc_status(ustream.trailers)

    # -- failures, rendered once per protocol

    async def _fail(self, call: Call, link: ServerLink, stream: Stream, out: _Outcome, e: ProxyError) -> None:
        out.reason = e.reason
        if out.response_started:
            link.reset(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if e.flag is not None:
            call.flag(e.flag)
        self.state.metrics.child(self.state.metrics.local_replies, call.listener, e.reason).inc()
        await self._reply(call, link, stream, out, e.http_status, e.grpc_status, e.message, e.headers)

    async def _upstream_reset(self, call: Call, link: ServerLink, stream: Stream, out: _Outcome, e: StreamReset) -> None:
        if stream.reset_code is not None:
            return  # the client reset first; nothing to tell it
        if not out.response_started:
            if e.code == ErrorCodes.PROTOCOL_ERROR:
                await self._fail(call, link, stream, out, UpstreamProtocolError("upstream protocol error"))
                return
            if e.code in (ErrorCodes.REFUSED_STREAM, ErrorCodes.CONNECT_ERROR):
                err = UpstreamUnavailable(f"upstream {'refused the stream' if e.code == ErrorCodes.REFUSED_STREAM else 'connection lost'}")
                await self._fail(call, link, stream, out, err)
                return
        # Anything else the upstream reset reaches the client as the same reset.
        out.reason = "upstream_reset"
        link.reset(stream, e.code)

    async def _timed_out(self, call: Call, link: ServerLink, stream: Stream, out: _Outcome) -> None:
        err = UpstreamTimeout("deadline exceeded")
        out.reason = err.reason
        self.state.metrics.child(self.state.metrics.local_replies, call.listener, err.reason).inc()
        if not out.response_started:
            # The deadline has passed: the reply itself gets a short grace period.
            with trio.move_on_after(LOCAL_REPLY_GRACE):
                await self._reply(call, link, stream, out, err.http_status, err.grpc_status, err.message)
        elif call.is_grpc and not stream.sent_end:
            out.grpc_status = str(status.DEADLINE_EXCEEDED)
            link.send_headers(stream, grpc.status_trailers(status.DEADLINE_EXCEEDED, err.message), True)
        else:
            link.reset(stream, ErrorCodes.CANCEL)

    async def _filter_reply(
        self, call: Call, link: ServerLink, stream: Stream, out: _Outcome, r: Respond, ran: int, chain: Chain
    ) -> None:
        out.reason = r.reason
        self.state.metrics.child(self.state.metrics.local_replies, call.listener, r.reason).inc()
        grpc_status = r.grpc_status if r.grpc_status is not None else _grpc_for_http(r.status)
        await self._reply(call, link, stream, out, r.status, grpc_status, r.message, list(r.headers), chain, ran)

    async def _reply(
        self,
        call: Call,
        link: ServerLink,
        stream: Stream,
        out: _Outcome,
        status: int,
        grpc_status: int,
        message: str,
        extra: Sequence[tuple[bytes, bytes]] | None = None,
        chain: Chain | None = None,
        ran: int = 0,
    ) -> None:
        """A local reply: gRPC gets trailers-only with grpc-status; HTTP a text body."""
        if stream.reset_code is not None or stream.sent_end:
            return
        if call.is_grpc:
            headers = [(b"content-type", b"application/grpc"), *grpc.status_trailers(grpc_status, message)]
            status_out = 200
            body = b""
        else:
            body = message.encode("utf-8") + b"\n"
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
            status_out = status
            if call.method == "HEAD":  # RFC 9110 9.3.2: the headers of a GET, no content
                body = b""
        headers += extra or ()
        if chain is not None:
            response = Response(status_out, headers, stream)
            await chain.on_response(call, response, ran)
            headers = response.headers
        out.status = status_out
        if call.is_grpc:
            out.grpc_status = str(grpc_status)
        out.response_started = True
        out.headers = [(b":status", _STATUS[status_out]), *headers]
        link.send_headers(stream, out.headers, end=not body)
        if body:
            await link.send_data(stream, body, True)

    def _record(self, call: Call, stream: Stream, out: _Outcome, state: ListenerState) -> None:
        m = state.metrics
        route = call.route.name if call.route is not None else "-"
        cluster = call.cluster or "-"
        labels = (call.listener, call.direction, route, cluster)
        status = _STATUS.get(out.status, b"0").decode() if out.status else "0"
        m.child(m.requests, *labels, status, out.grpc_status or "-").inc()
        duration = trio.current_time() - call.start
        m.child(m.request_duration, *labels).observe(duration)
        if call.completion_hooks:
            # The response's last frames wait for this connection's flush, which runs
            # after this task yields, so the client would wait for the hooks too
            # (mirroring encodes a record here). A connection with no other stream
            # open gains nothing from waiting: write them now. A busy one keeps its
            # one write per scheduler batch, worth more than this call's microseconds.
            if len(stream.link.streams) <= 1:
                stream.link.flush_now()
            done = Completion(out.status, out.grpc_status, out.reason, duration, out.upstream, out.trailers, out.headers)
            complete(call, done)
        if stream.received:
            m.child(m.request_bytes, call.listener).inc(stream.received)
        if out.bytes_out:
            m.child(m.response_bytes, call.listener).inc(out.bytes_out)
        if state.access_log.enabled:
            traceparent = None
            for k, v in call.headers:
                if k == b"traceparent":
                    traceparent = v.decode("latin-1")
                    break
            state.access_log.write({
                "listener": call.listener,
                "direction": call.direction,
                "route": route,
                "cluster": cluster,
                "upstream": out.upstream or None,
                "method": call.method,
                "authority": call.authority,
                "path": call.path,
                "protocol": call.protocol.value,
                "status": out.status,
                "grpc_status": int(out.grpc_status) if out.grpc_status.isdigit() else None,
                "reason": out.reason or None,
                "duration_ms": round(duration * 1000, 3),
                "bytes_in": stream.received,
                "bytes_out": out.bytes_out,
                "request_id": call.request_id,
                "traceparent": traceparent,
                "peer": call.peer.address,
                "security": call.peer.security,
                "peer_identity": call.peer.identity,
                "response_flags": call.flags,
                **(call.log_fields or {}),  # what filters added (the authz decision, ...)
            })


async def _pump(call: Call, source: Stream, target: Stream, observers: list[ChunkObserver]) -> int:
    """Forward `source`'s body and trailers to `target`; returns the bytes sent.

    Each chunk is acknowledged to its sender only when the next one is read,
    i.e. after it was handed to the other side: end-to-end back-pressure.
    """
    send = target.link.send_data
    sent = 0
    while True:
        chunk = await source.read()
        if not chunk:
            break
        for observe in observers:
            observe(call, chunk)
        sent += len(chunk)
        last = source.ended and not source.chunks and source.trailers is None
        await send(target, chunk, last)
        if last:
            source.release()
            return sent
    source.release()
    if source.trailers is not None:
        target.link.send_headers(target, source.trailers, True)
    else:
        target.link.end_stream(target)
    return sent


async def _pump_request(call: Call, body: Body, ustream: Stream, retrying: Retrying | None = None) -> None:
    """Forward the request body. For a call that may be retried, what earlier
    attempts sent goes again from the tape first, the rest is kept on it (and
    observed once), and the attempt's per-try timeout starts at the end."""
    tape = retrying.tape if retrying is not None else None
    link = ustream.link
    try:
        if tape is None and isinstance(body, Stream):
            await _pump(call, body, ustream, call.request_observers)
            return
        # A body a filter put in place, or one kept for retries: forward it as it comes.
        if tape is not None:
            for chunk in tape.chunks:
                await link.send_data(ustream, chunk, False)
        while chunk := await body.read():
            for observe in call.request_observers:
                observe(call, chunk)
            if tape is not None:
                tape.add(chunk)  # before it is sent: a cancelled send must not lose it
            await link.send_data(ustream, chunk, False)
        if body.trailers is not None:
            link.send_headers(ustream, body.trailers, True)
        else:
            link.end_stream(ustream)
        if retrying is not None:
            retrying.start(trio.current_time())
    except StreamReset:
        # Either side reset: the response side sees it and answers for the call.
        pass


@dataclass(frozen=True, slots=True)
class _Retry:
    """An upstream reply the route retries instead of forwarding (its outcome, for the guard)."""

    delay: float
    status: int
    grpc_status: str


def _retry_reply(retrying: Retrying, head: Headers, ustream: Stream) -> _Retry | None:
    """The upstream's response head: a _Retry if it is retried rather than forwarded."""
    status = _head_status(head)
    # A gRPC failure comes trailers-only (its status in the head, the stream ended).
    grpc_status = _grpc_status(head) if retrying.call.is_grpc and ustream.ended else ""
    condition = retry.http_condition(retrying.policy, status, grpc_status or None)
    if condition is None:
        return None
    delay = retrying.decide(condition)
    return None if delay is None else _Retry(delay, status, grpc_status)


async def _wait_head(ustream: Stream, retrying: Retrying | None) -> Headers:
    """The upstream's response head, within the attempt's per-try timeout
    (which a streamed request's pump starts once the body is all sent)."""
    if retrying is None or not retrying.policy.per_try_timeout:
        return await ustream.wait_head()
    with trio.CancelScope(deadline=retrying.try_deadline) as scope:
        retrying.scope = scope
        try:
            return await ustream.wait_head()
        finally:
            retrying.scope = None
    raise PerTryTimeout(f"no response within per_try_timeout ({retrying.policy.per_try_timeout:g}s)")


def _failure_kind(failure: Exception) -> str | None:
    """What retry_on calls a failed attempt, or None if it is never retried."""
    if isinstance(failure, StreamReset):
        return retry.REFUSED_STREAM if failure.code == ErrorCodes.REFUSED_STREAM else retry.RESET
    if isinstance(failure, PerTryTimeout):
        return retry.PER_TRY_TIMEOUT
    return None


def complete(call: Call, done: Completion) -> None:
    """Run a finished call's completion hooks; a failing hook is logged, never raised."""
    for hook in call.completion_hooks:
        try:
            hook(call, done)
        except Exception:
            log.exception("a completion hook failed on call %s", call.request_id)


def _head_status(head: Headers) -> int:
    """A response head's :status (the codec puts it first)."""
    return int(head[0][1]) if head[0][0] == b":status" else int(dict(head)[b":status"])


def _grpc_status(headers: Headers) -> str:
    for k, v in headers:
        if k == b"grpc-status":
            return v.decode("latin-1")
    return ""


# gRPC spec (http-grpc-status-mapping.md): HTTP status -> gRPC status.
_GRPC_FOR_HTTP = {
    400: status.INTERNAL, 401: status.UNAUTHENTICATED, 403: status.PERMISSION_DENIED,
    404: status.UNIMPLEMENTED, 429: status.UNAVAILABLE, 502: status.UNAVAILABLE,
    503: status.UNAVAILABLE, 504: status.UNAVAILABLE,
}


def _grpc_for_http(http_status: int) -> int:
    return _GRPC_FOR_HTTP.get(http_status, status.UNKNOWN)


__all__ = ["HttpProxy", "ListenerState", "complete"]
