"""Thrift proxying of one call: Call, filters, route, upstream, reply.

Knows: how a Thrift message becomes a Call (service, method, metadata,
deadline), how a call is written to an upstream connection in the cluster's
framing and its reply written back in the caller's, and how failures become
TApplicationException replies (the one place they are rendered for Thrift).
Must not: parse bytes beyond what the codec gives, or choose endpoints.
"""

from __future__ import annotations

import logging
import math
import os
import random
from typing import Any

import trio

from meshproxy import retry
from meshproxy.attempts import Budgets, Retrying
from meshproxy.call import BytesBody, Call, Completion, Headers, Protocol, Response
from meshproxy.codec import theader, thrift, ttheader
from meshproxy.codec.errors import ThriftError
from meshproxy.drivers.thrift import ServerConnection, Slot, flush_writes
from meshproxy.errors import (
    NoRoute,
    PerTryTimeout,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshproxy.filters.base import Respond
from meshproxy.proxy import ListenerState, complete
from meshproxy.upstream.guard import Admission
from meshproxy.upstream.thrift_cluster import ThriftCluster, ThriftEndpointPool

log = logging.getLogger(__name__)

# Method label values per listener; past this, calls count under "other".
MAX_METHOD_LABELS = 1000

_PROTOCOLS = {"binary": thrift.BINARY, "compact": thrift.COMPACT}
_STATUS = {code: str(code) for code in range(100, 600)}


class _Pending:
    """One call between its request and its end."""

    __slots__ = ("admission", "call", "chain", "changed", "cluster", "conn", "last", "msg", "pool", "ran",
                 "recorded", "retrying", "state", "transport")

    def __init__(self, call: Call, msg: thrift.Message, conn: ServerConnection, state: ListenerState) -> None:
        self.call = call
        self.msg = msg
        self.conn = conn
        self.state = state
        self.cluster: ThriftCluster | None = None
        self.pool: ThriftEndpointPool | None = None  # while an attempt is in flight
        self.last: ThriftEndpointPool | None = None  # the latest attempt's endpoint
        self.admission: Admission | None = None  # the latest attempt's, until its outcome is counted
        self.retrying: Retrying | None = None
        self.transport = ""  # the upstream framing
        self.changed = False  # filters changed the metadata: re-encode the header
        self.ran = 0
        self.chain = state.chain
        self.recorded = False  # metrics, the access log and completion hooks: once per call


class ThriftProxy:
    """The call handler of one Thrift listener."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state
        self._ids = 0
        self._budgets = Budgets()
        self._rng = random.Random()
        self._method_labels: set[tuple[str, str]] = set()
        self._children: dict[tuple[object, ...], tuple[Any, ...]] = {}

    # -- requests

    async def handle(self, conn: ServerConnection, msg: thrift.Message) -> None:
        state = self.state
        head = msg.head
        mtype = head.mtype
        if mtype != thrift.CALL and mtype != thrift.ONEWAY:
            raise ThriftError(f"a client sent a message of type {mtype}", head.seqid)
        header = msg.header
        if header is not None and header.out_of_order and not conn.pending:
            conn.out_of_order = True
        now = trio.current_time()
        service, _, method = head.name.rpartition(":")  # TMultiplexedProtocol: "Service:method"
        metadata: Headers = header.metadata() if header is not None else []
        deadline = math.inf
        request_id = ""
        if metadata:
            for k, v in metadata:
                if k == ttheader.TO_SERVICE_NAME and not service:
                    service = v.decode("utf-8", "replace")
                elif k == ttheader.RPC_TIMEOUT_NAME and v.isdigit() and int(v) > 0:
                    deadline = now + int(v) / 1000
                elif k == b"x-request-id":
                    request_id = v.decode("latin-1")
        if not service:
            service = state.config.thrift.service
        self._ids += 1
        call = Call(
            id=self._ids,
            protocol=Protocol.THRIFT,
            peer=conn.peer,
            listener=state.config.name,
            direction=state.config.direction,
            authority=service,
            method="oneway" if mtype == thrift.ONEWAY else "call",
            path=f"/{service}/{method}",
            headers=metadata,
            body=BytesBody(msg.frame),
            start=now,
            deadline=deadline,
            scheme="thrift",
            request_id=request_id or os.urandom(8).hex(),
        )
        p = _Pending(call, msg, conn, state)
        slot = conn.open_slot() if mtype == thrift.CALL else None
        if slot is not None:
            call.client_gone = lambda: slot.done
            # From now on a client that leaves ends the call (counted once, hooks run),
            # wherever it is: in a filter, waiting for a connection, or upstream.
            slot.context = p
            slot.on_lost = self._on_lost
        route = state.router.match(call.path, call.headers)
        if route is not None:
            call.route = route
            call.cluster = state.router.cluster_for(route, call.headers)
            if route.timeout > 0 and call.start + route.timeout < call.deadline:
                call.deadline = call.start + route.timeout
        p.chain = state.chain_for(route)
        if slot is not None and p.chain.may_wait:
            # A filter may hold this call: the connection goes on reading meanwhile
            # (the calls behind it, a client that leaves); replies keep their order.
            conn.nursery.start_soon(self._run, p, slot, True)
        else:
            await self._run(p, slot)

    async def _run(self, p: _Pending, slot: Slot | None, task: bool = False) -> None:
        try:
            await self._handle(p, slot)
        finally:
            if task:
                flush_writes()  # no reader's batch end will send what this task wrote

    async def _handle(self, p: _Pending, slot: Slot | None) -> None:
        try:
            await self._forward(p, slot)
        except ProxyError as e:
            self._fail(p, slot, e)
        except trio.Cancelled:
            # Draining stopped this call before it went upstream: it gets no reply.
            if slot is not None and p.conn.finish(slot):
                p.conn.drop(slot)
            self._abandon(p)
            self._record(p, 0, "draining", "draining", 0)
            raise

    async def _forward(self, p: _Pending, slot: Slot | None) -> None:
        call, msg, state, chain, route = p.call, p.msg, p.state, p.chain, p.call.route
        changed = False
        if chain.has_request_hooks:
            flush_writes()  # a filter may wait: earlier calls of this batch go out first
            before = list(call.headers)
            respond, p.ran = await chain.on_request(call)
            if respond is not None:
                self._filter_reply(p, slot, respond)
                return
            changed = call.headers != before
        else:
            p.ran = len(chain.filters)
        if call.cluster is None:
            raise NoRoute(f"no route for {call.path}")
        cluster: ThriftCluster | None = state.clusters.get(call.cluster)
        if cluster is None:
            raise UpstreamUnavailable(f"unknown cluster '{call.cluster}'")
        wanted = _PROTOCOLS.get(cluster.options.protocol)
        if wanted is not None and wanted != msg.head.protocol:
            raise UpstreamUnavailable(
                f"cluster '{cluster.name}' speaks {cluster.options.protocol}, "
                f"the call {thrift.PROTOCOL_NAMES[msg.head.protocol]}"
            )
        p.cluster = cluster
        p.transport = cluster.fixed_transport(msg.transport)
        p.changed = changed
        policy = route.retry if route is not None else None
        if policy is not None and policy.attempts > 1 and slot is not None:
            method = call.path.rpartition("/")[2]
            p.retrying = Retrying(call, cluster.name, cluster.guard, policy, self._budgets.for_route(route),
                                  state.metrics, self._rng, thrift_method=method)
        for observe in call.request_observers:
            observe(call, msg.frame)
        await self._dispatch(p, slot)

    async def _dispatch(self, p: _Pending, slot: Slot | None) -> None:
        """Send one attempt of the call: admitted by the cluster's guard, on a
        connection with room (connect failures retried as the route allows)."""
        call, cluster = p.call, p.cluster
        assert cluster is not None
        guard = cluster.guard
        retrying = p.retrying
        while True:
            now = trio.current_time()
            admission = None if not guard.active else \
                guard.admit(call.path, now) if retrying is None else retrying.admit(guard, call.path, now)
            ready = cluster.ready(p.transport, call.endpoint_unit) if p.last is None else None
            if ready is not None:
                pool, link = ready
                break
            try:
                with trio.move_on_at(call.deadline) as waited:
                    pool, link = await cluster.acquire(p.transport, call.endpoint_unit, p.last)
            except UpstreamUnavailable:
                guard.abandon(admission)
                if retrying is not None and await retrying.again(retry.CONNECT_FAILURE):
                    continue
                raise
            except BaseException:
                guard.abandon(admission)
                raise
            if waited.cancelled_caught:
                guard.abandon(admission)
                raise UpstreamTimeout("deadline exceeded waiting for an upstream connection")
            if slot is not None and slot.done:
                guard.abandon(admission)
                return  # the client left while we waited
            break
        p.last = pool
        call.upstream_address = pool.name
        seqid = link.next_seqid()
        try:
            data = self._upstream_frame(p, p.transport, seqid, p.changed)
        except BaseException:
            guard.abandon(admission)
            raise
        p.pool = pool
        cluster.call_started(pool)
        if slot is None:  # oneway: written is done, with no outcome to count
            guard.abandon(admission)
            link.send(data, None, seqid)
            cluster.call_done(pool)
            self._record(p, 200, "", "oneway", len(data))
            return
        p.admission = admission
        slot.on_reply = self._on_reply
        slot.on_timeout = self._on_timeout
        link.send(data, slot, seqid)
        deadline = call.deadline
        if retrying is not None:
            retrying.start(trio.current_time())
            deadline = min(deadline, retrying.try_deadline)
        if deadline != math.inf:
            p.conn.set_deadline(slot, deadline)

    def _upstream_frame(self, p: _Pending, transport: str, seqid: int, changed: bool) -> bytes:
        msg, call = p.msg, p.call
        if transport == msg.transport and not changed:
            return thrift.reframe_with_seqid(msg, seqid)
        payload = thrift.message_with_seqid(msg, seqid)
        if transport in (thrift.FRAMED, thrift.BUFFERED):
            return thrift.wrap(transport, payload)
        header: theader.Header | ttheader.Header
        if transport == msg.transport and msg.header is not None:
            header = msg.header
            header.set_metadata(call.headers)
        else:
            pairs = list(call.headers)
            if transport == thrift.TTHEADER:
                header = ttheader.Header(flags=0)
                pairs += self._ttheader_identity(call, pairs)
            else:
                header = theader.Header()
            header.protocol_id = msg.head.protocol
            header.set_metadata(pairs)
        header.seqid = seqid
        return header.encode(payload)

    def _ttheader_identity(self, call: Call, pairs: Headers) -> Headers:
        """What a Kitex server expects of a caller that had no TTHeader."""
        have = {k for k, _ in pairs}
        method = call.path.rpartition("/")[2]
        extra: Headers = []
        if ttheader.FROM_SERVICE_NAME not in have:
            extra.append((ttheader.FROM_SERVICE_NAME, self.state.node_service.encode()))
        if ttheader.TO_SERVICE_NAME not in have:
            extra.append((ttheader.TO_SERVICE_NAME, (call.authority or call.cluster or "").encode()))
        if ttheader.TO_METHOD_NAME not in have:
            extra.append((ttheader.TO_METHOD_NAME, method.encode()))
        if ttheader.RPC_TIMEOUT_NAME not in have and call.deadline != math.inf:
            left = max(1, int((call.deadline - trio.current_time()) * 1000))
            extra.append((ttheader.RPC_TIMEOUT_NAME, str(left).encode()))
        return extra

    # -- replies (called from the upstream connection's reader task)

    def _on_reply(self, slot: Slot, reply: thrift.Message) -> None:
        p: _Pending = slot.context  # type: ignore[assignment]
        conn = p.conn
        if not conn.finish(slot):
            return
        # A TApplicationException is the server failing the call; a declared exception is a reply.
        self._account(p, 500 if reply.head.mtype == thrift.EXCEPTION else 200)
        self._done_upstream(p)
        if p.chain.has_response_hooks:
            conn.nursery.start_soon(self._respond_with_filters, p, slot, reply)
            return
        data = self._downstream_frame(p, reply, None)
        conn.deliver(slot, data)
        result = "reply" if reply.head.mtype == thrift.REPLY else "exception"
        self._record(p, 200, "", result, len(data), reply)

    async def _respond_with_filters(self, p: _Pending, slot: Slot, reply: thrift.Message) -> None:
        response = Response(200, reply.header.metadata() if reply.header is not None else [], BytesBody(reply.payload))
        try:
            await p.chain.on_response(p.call, response, p.ran)
        except Exception:
            log.exception("a response filter failed on call %s", p.call.request_id)
        data = self._downstream_frame(p, reply, response.headers)
        p.conn.deliver(slot, data)
        flush_writes()
        self._record(p, 200, "", "reply" if reply.head.mtype == thrift.REPLY else "exception", len(data), reply)

    def _downstream_frame(self, p: _Pending, reply: thrift.Message, metadata: Headers | None) -> bytes:
        msg = p.msg
        seqid = msg.head.seqid
        for observe in p.call.response_observers:
            observe(p.call, reply.frame)
        if reply.transport == msg.transport and metadata is None:
            return thrift.reframe_with_seqid(reply, seqid)
        payload = thrift.message_with_seqid(reply, seqid)
        if msg.transport in (thrift.FRAMED, thrift.BUFFERED):
            return thrift.wrap(msg.transport, payload)
        if metadata is None:
            metadata = reply.header.metadata() if reply.header is not None else []
        header = self._reply_header(msg, reply.head.protocol)
        header.set_metadata(metadata)
        return header.encode(payload)

    @staticmethod
    def _reply_header(msg: thrift.Message, protocol: int) -> theader.Header | ttheader.Header:
        flags = msg.header.flags if msg.header is not None else 0
        seqid = msg.header.seqid if msg.header is not None else msg.head.seqid
        if msg.transport == thrift.TTHEADER:
            return ttheader.Header(seqid, protocol, flags)
        return theader.Header(seqid, protocol, flags)

    def _on_timeout(self, slot: Slot) -> None:
        p: _Pending = slot.context  # type: ignore[assignment]
        now = trio.current_time()
        if now < slot.deadline:
            return  # the timer of an earlier attempt
        if now < p.call.deadline and p.pool is not None:
            # The per-try timeout: this attempt is given up, the call perhaps not.
            per_try = p.retrying.policy.per_try_timeout if p.retrying is not None else 0.0
            self._attempt_failed(p, slot, retry.PER_TRY_TIMEOUT,
                                 PerTryTimeout(f"no reply within per_try_timeout ({per_try:g}s)"))
            return
        if not p.conn.finish(slot):
            return
        self._account(p, 0, local_failure=True)
        self._done_upstream(p)
        self._local_reply(p, slot, UpstreamTimeout("deadline exceeded"))

    def _on_lost(self, slot: Slot, reason: str) -> None:
        p: _Pending = slot.context  # type: ignore[assignment]
        if slot.done:  # the client went away first
            self._abandon(p)
            self._done_upstream(p)
            self._record(p, 0, "downstream_closed", "downstream_closed", 0)
            return
        self._attempt_failed(p, slot, retry.RESET, UpstreamUnavailable(reason))

    def _attempt_failed(self, p: _Pending, slot: Slot, kind: str, failure: ProxyError) -> None:
        """An attempt ended without a reply: send the call again if its route
        allows, else answer with `failure`."""
        self._account(p, 0, local_failure=True)
        self._done_upstream(p)
        upstream = slot.upstream
        if upstream is not None:
            upstream.forget(slot)  # a late reply to this attempt is dropped
            if p.cluster is not None and not p.cluster.options.mux:
                # An in-order upstream still works on the abandoned call: whatever
                # is sent on this connection next would wait behind it.
                upstream.transport.close("a call on it was abandoned (per-try timeout)")
        delay = p.retrying.failure_delay(kind) if p.retrying is not None else None
        if delay is None:
            if p.conn.finish(slot):
                self._local_reply(p, slot, failure)
            return
        # Until the next attempt is sent, only the call's own deadline applies.
        p.conn.set_deadline(slot, p.call.deadline)
        p.conn.nursery.start_soon(self._retry, p, slot, delay)

    async def _retry(self, p: _Pending, slot: Slot, delay: float) -> None:
        await trio.sleep(delay)
        if slot.done:  # the deadline passed or the client left during the backoff
            return
        try:
            await self._dispatch(p, slot)
        except ProxyError as e:
            self._fail(p, slot, e)
        flush_writes()

    def _account(self, p: _Pending, status: int, local_failure: bool = False) -> None:
        """Tell the cluster's guard how the latest attempt went."""
        admission, p.admission = p.admission, None
        if admission is None or p.cluster is None:
            return
        if p.cluster.guard.done(admission, p.last, trio.current_time(), status, "", local_failure) == "ejected":
            p.call.flag("ejected")

    @staticmethod
    def _abandon(p: _Pending) -> None:
        admission, p.admission = p.admission, None
        if admission is not None and p.cluster is not None:
            p.cluster.guard.abandon(admission)

    def _done_upstream(self, p: _Pending) -> None:
        if p.cluster is not None and p.pool is not None:
            p.cluster.call_done(p.pool)
            p.pool = None

    # -- local replies

    def _fail(self, p: _Pending, slot: Slot | None, e: ProxyError) -> None:
        if slot is not None and not p.conn.finish(slot):
            return
        self._done_upstream(p)
        self._local_reply(p, slot, e)

    def _filter_reply(self, p: _Pending, slot: Slot | None, r: Respond) -> None:
        if slot is not None and not p.conn.finish(slot):
            return  # the client left while a filter held the call (counted then)
        kind = thrift.UNKNOWN_METHOD if r.status == 404 else thrift.INTERNAL_ERROR
        self._reply_exception(p, slot, kind, r.message or r.reason, r.status, r.reason)

    def _local_reply(self, p: _Pending, slot: Slot | None, e: ProxyError) -> None:
        if e.flag is not None:
            p.call.flag(e.flag)
        kind = thrift.UNKNOWN_METHOD if isinstance(e, NoRoute) else thrift.INTERNAL_ERROR
        self._reply_exception(p, slot, kind, f"{e.reason}: {e.message}", e.http_status, e.reason)

    def _reply_exception(self, p: _Pending, slot: Slot | None, kind: int, message: str, status: int, reason: str) -> None:
        m = p.state.metrics
        m.child(m.local_replies, p.call.listener, reason).inc()
        if slot is None:  # oneway: no reply exists to carry the error
            self._record(p, status, reason, reason, 0)
            return
        data = exception_frame(p.msg, kind, message, status)
        p.conn.deliver(slot, data)
        self._record(p, status, reason, reason, len(data))

    # -- metrics and the access log

    def _record(
        self, p: _Pending, status: int, reason: str, result: str, bytes_out: int, reply: thrift.Message | None = None
    ) -> None:
        if p.recorded:
            return
        p.recorded = True
        if p.retrying is not None:
            p.retrying.finish()
        call, state = p.call, p.state
        route = call.route.name if call.route is not None else "-"
        cluster = call.cluster or "-"
        key = (route, cluster, status, result, call.path)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._metric_children(state, route, cluster, status, result, call)
        requests, duration_hist, thrift_calls, request_bytes, response_bytes = children
        requests.inc()
        duration = trio.current_time() - call.start
        duration_hist.observe(duration)
        if call.completion_hooks:
            # The reply waits for the batch's flush_writes(), after the hooks (mirroring
            # encodes a record). With no other call in flight, batching gains nothing.
            if not p.conn.pending:
                p.conn.flush()
            headers = None
            if reply is not None:
                headers = [(b":status", b"200"), *(reply.header.metadata() if reply.header is not None else ())]
            complete(call, Completion(status, "", reason, duration, call.upstream_address, None, headers))
        thrift_calls.inc()
        request_bytes.inc(len(p.msg.frame))
        if bytes_out:
            response_bytes.inc(bytes_out)
        if state.access_log.enabled:
            state.access_log.write({
                "listener": call.listener,
                "direction": call.direction,
                "route": route,
                "cluster": cluster,
                "upstream": call.upstream_address or None,
                "method": call.method,
                "authority": call.authority,
                "path": call.path,
                "protocol": "thrift",
                "thrift_transport": p.msg.transport,
                "seqid": p.msg.head.seqid,
                "status": status,
                "result": result,
                "reason": reason or None,
                "duration_ms": round(duration * 1000, 3),
                "bytes_in": len(p.msg.frame),
                "bytes_out": bytes_out,
                "request_id": call.request_id,
                "peer": call.peer.address,
                "security": call.peer.security,
                "peer_identity": call.peer.identity,
                "response_flags": call.flags,
                **(call.log_fields or {}),  # what filters added (the authz decision, ...)
            })

    def _metric_children(
        self, state: ListenerState, route: str, cluster: str, status: int, result: str, call: Call
    ) -> tuple[Any, ...]:
        """The metric children of one outcome, looked up once (label sets are bounded)."""
        m = state.metrics
        if len(self._children) > MAX_METHOD_LABELS * 16:
            self._children.clear()
        labels = (call.listener, call.direction, route, cluster)
        service, method = self._method_label(call)
        return (
            m.child(m.requests, *labels, _STATUS.get(status, "0"), "-"),
            m.child(m.request_duration, *labels),
            m.child(m.thrift_calls, call.listener, call.direction, service, method, result),
            m.child(m.request_bytes, call.listener),
            m.child(m.response_bytes, call.listener),
        )

    def _method_label(self, call: Call) -> tuple[str, str]:
        key = (call.authority, call.path.rpartition("/")[2])
        labels = self._method_labels
        if key in labels:
            return key
        if len(labels) < MAX_METHOD_LABELS:
            labels.add(key)
            return key
        return ("other", "other")

    def protocol_error(self, conn: ServerConnection, e: ThriftError) -> None:
        """A malformed frame: answer PROTOCOL_ERROR if its seqid is known; the driver closes."""
        m = self.state.metrics
        m.child(m.downstream_protocol_errors, self.state.config.name, "connection").inc()
        log.info("listener %s: %s: %s", self.state.config.name, conn.transport.peer, e)
        if e.seqid is None or conn.reader.transport is None:
            return
        protocol = conn.reader.protocol if conn.reader.protocol is not None else thrift.BINARY
        head = thrift.Head("", thrift.CALL, e.seqid, protocol, True, -1, 0)
        msg = thrift.Message(conn.reader.transport, head, b"", 0, None)
        conn.write(exception_frame(msg, thrift.PROTOCOL_ERROR, f"protocol error: {e}", 400))


def exception_frame(msg: thrift.Message, kind: int, message: str, status: int) -> bytes:
    """A TApplicationException reply to `msg`, in its transport and protocol."""
    head = msg.head
    payload = thrift.application_exception(head.name, head.seqid, kind, message, head.protocol, head.strict)
    if msg.transport in (thrift.FRAMED, thrift.BUFFERED):
        return thrift.wrap(msg.transport, payload)
    header = ThriftProxy._reply_header(msg, head.protocol)
    if isinstance(header, ttheader.Header):
        # Kitex reads a failed call's reason from these string keys too.
        header.set_metadata([(b"biz-status", str(status).encode()), (b"biz-message", message.encode())])
    return header.encode(payload)
