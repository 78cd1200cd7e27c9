"""Thrift connections over trio: downstream (serving) and upstream (pooled client).

Knows: reading messages off a Transport with the sans-IO Reader, writing
replies back in request order (or as they come when the client announced
out-of-order support), per-connection limits, deadlines, and matching upstream
replies to calls by rewritten seqid. Must not: route, filter or render
errors (the Thrift proxy does; it hands in callbacks).

No task per call: a downstream connection's reader task runs each request up
to the upstream write, the upstream connection's reader task completes it,
and one timer task per downstream connection expires deadlines.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from meshproxy.call import Peer
from meshproxy.codec import thrift
from meshproxy.codec.errors import ThriftError
from meshproxy.drivers.h2 import Parked
from meshproxy.drivers.transport import Transport, TransportClosed

log = logging.getLogger(__name__)


class Slot:
    """One downstream call that expects a reply.

    The proxy fills in what it needs; the driver calls `on_reply`,
    `on_timeout` or `on_lost` exactly once (whichever comes first).
    """

    __slots__ = (
        "conn",
        "context",
        "deadline",
        "done",
        "on_lost",
        "on_reply",
        "on_timeout",
        "ordered",
        "reply",
        "upstream",
        "upstream_seqid",
    )

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.deadline = math.inf
        self.done = False
        self.reply: bytes | None = None
        self.ordered = False  # its reply waits for the replies of earlier calls
        self.upstream: UpstreamConnection | None = None
        self.upstream_seqid = 0
        self.context: object = None
        self.on_reply: Callable[[Slot, thrift.Message], None] = _ignore_reply
        self.on_timeout: Callable[[Slot], None] = _ignore
        self.on_lost: Callable[[Slot, str], None] = _ignore_lost

    def __lt__(self, other: Slot) -> bool:  # heap ties
        return id(self) < id(other)


def _ignore(_: Slot) -> None:
    pass


def _ignore_reply(_: Slot, __: thrift.Message) -> None:
    pass


def _ignore_lost(_: Slot, __: str) -> None:
    pass


# Connections with output waiting for `flush_writes()`.
_dirty: list[_Connection] = []


def flush_writes() -> None:
    """Send what every connection gathered. Reader tasks call this after each
    batch of messages (before they wait for more bytes), so a batch of
    pipelined calls or replies costs one send() per connection, and a lone
    call costs no task switch; other writers (timers, tasks) call it too."""
    while _dirty:
        conns = _dirty[:]
        _dirty.clear()
        for conn in conns:
            conn.flush()


class _Connection:
    """A transport, its message reader, and a writer task for the backlog."""

    def __init__(self, transport: Transport, reader: thrift.Reader, idle_timeout: float) -> None:
        self.transport = transport
        self.reader = reader
        self.idle_timeout = idle_timeout
        self._writer_wake = Parked()
        self._out: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out at the next `flush_writes()`."""
        if not self._out:
            _dirty.append(self)
        self._out.append(data)

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self.transport.write(data)

    @property
    def busy(self) -> bool:
        """Calls are in flight: silence is not idleness."""
        return False

    async def _writer(self) -> None:
        transport = self.transport
        transport.on_backlog = self._writer_wake.wake
        while not transport.closed:
            if transport.has_backlog:
                await transport.drain_backlog()
            else:
                await self._writer_wake.wait()

    async def _messages(self, on_message: Callable[[thrift.Message], Awaitable[None]]) -> str:
        """Read until EOF or an error; returns why the connection ended."""
        reader = self.reader
        transport = self.transport
        while True:
            msg = reader.next()
            if msg is None:
                flush_writes()
                with trio.move_on_after(self.idle_timeout) as idle:
                    data = await transport.recv()
                if idle.cancelled_caught:
                    if self.busy:
                        continue
                    return "idle timeout"
                if not data:
                    return "closed by peer" if not reader.buffered else "closed mid-message"
                reader.feed(data)
                continue
            await on_message(msg)
            if transport.backlogged:
                flush_writes()  # what this batch queued must not wait for a slow reader
                await transport.drained()


class ServerConnection(_Connection):
    """A downstream connection: requests in, replies out in order."""

    def __init__(
        self,
        transport: Transport,
        reader: thrift.Reader,
        *,
        handler: Callable[[ServerConnection, thrift.Message], Awaitable[None]],
        on_protocol_error: Callable[[ServerConnection, ThriftError], None],
        max_pending: int,
        idle_timeout: float,
    ) -> None:
        super().__init__(transport, reader, idle_timeout)
        self.handler = handler
        self.on_protocol_error = on_protocol_error
        self.max_pending = max_pending
        self.out_of_order = False  # TTHeader's flag: the client matches replies by seqid
        self.pending: set[Slot] = set()
        self._order: deque[Slot] = deque()
        self._capacity = Parked()
        self._timers: list[tuple[float, Slot]] = []
        self._timer_scope = trio.CancelScope()
        self.end_reason = ""
        self.peer = Peer(transport.peer, transport.identity, transport.security)
        self.nursery: trio.Nursery | None = None
        self._reading = trio.CancelScope()
        self._finish_timeout = idle_timeout
        self._ended = trio.Event()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    # -- serving

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                with self._reading:
                    try:
                        self.end_reason = await self._messages(self._on_message)
                    except ThriftError as e:
                        self.end_reason = f"protocol error: {e}"
                        self.on_protocol_error(self, e)
                        # The error reply (if any) was written: flush it, then close.
                        self.flush()
                        await self.transport.flush_and_close(1.0, "protocol error")
                    except TransportClosed as e:
                        self.end_reason = str(e) or "closed"
                if self._reading.cancelled_caught and not self.transport.closed:
                    # Draining: finish the calls in flight. (A client's EOF is not
                    # a half-close: Thrift clients close when they are gone, and
                    # their calls are abandoned.)
                    self.end_reason = "draining"
                    with trio.move_on_after(self._finish_timeout):
                        while self.pending:
                            await self._capacity.wait()
                    self.flush()
                    await self.transport.flush_and_close(1.0, self.end_reason)
                else:
                    # The client is gone: its calls end as lost before their tasks are cancelled.
                    self._abandon()
                nursery.cancel_scope.cancel()
        finally:
            self.transport.close(self.end_reason or "closed")
            self._abandon()
            self._ended.set()

    async def close_gracefully(self, reason: str, timeout: float) -> None:
        """Stop reading requests, let the calls in flight finish (bounded), close."""
        self._finish_timeout = timeout
        self._reading.cancel()
        with trio.move_on_after(timeout + 2.0):
            await self._ended.wait()

    async def _on_message(self, msg: thrift.Message) -> None:
        while len(self.pending) >= self.max_pending and not self.transport.closed:
            flush_writes()  # the calls we wait for may still be queued
            await self._capacity.wait()
        await self.handler(self, msg)

    def _abandon(self) -> None:
        """The client is gone: the calls still in flight are lost (their upstreams forget them)."""
        for slot in list(self.pending):
            self.finish(slot)
            slot.on_lost(slot, "downstream closed")

    # -- slots

    def open_slot(self) -> Slot:
        slot = Slot(self)
        self.pending.add(slot)
        if not self.out_of_order:
            slot.ordered = True
            self._order.append(slot)
        return slot

    def set_deadline(self, slot: Slot, deadline: float) -> None:
        slot.deadline = deadline
        if deadline == math.inf:
            return
        timers = self._timers
        if len(timers) > 2 * len(self.pending) + 64:
            # Finished calls leave their entries behind; drop them now and then.
            timers[:] = [(d, s) for d, s in timers if not s.done]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, slot))
        if deadline < self._timer_scope.deadline:
            self._timer_scope.deadline = deadline

    def finish(self, slot: Slot) -> bool:
        """Mark a slot done; False if it already was (a reply raced a timeout)."""
        if slot.done:
            return False
        slot.done = True
        self.pending.discard(slot)
        upstream = slot.upstream
        if upstream is not None:
            upstream.forget(slot)
        self._capacity.wake()
        return True

    def deliver(self, slot: Slot, data: bytes) -> None:
        """Send a finished slot's reply: now if out of order, else once those before it are sent."""
        if not slot.ordered:
            self.write(data)
            return
        slot.reply = data
        order = self._order
        while order and order[0].reply is not None:
            head = order.popleft()
            if head.reply:
                self.write(head.reply)
            head.reply = None

    def drop(self, slot: Slot) -> None:
        """A slot that gets no reply after all: the replies after it need not wait for it."""
        if slot.ordered:
            self.deliver(slot, b"")

    # -- deadlines

    async def _timer(self) -> None:
        timers = self._timers
        while True:
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                _, slot = heapq.heappop(timers)
                if not slot.done:
                    slot.on_timeout(slot)
            flush_writes()
            self._timer_scope = trio.CancelScope(deadline=timers[0][0] if timers else math.inf)
            with self._timer_scope:  # until the earliest deadline, which set_deadline may move up
                await trio.sleep_forever()


# -- upstream -----------------------------------------------------------------


class UpstreamConnection(_Connection):
    """A pooled upstream connection: calls from many clients, matched back by seqid."""

    def __init__(
        self,
        transport: Transport,
        reader: thrift.Reader,
        *,
        endpoint: str,
        max_requests: int,
        idle_timeout: float,
        on_protocol_error: Callable[[], None],
    ) -> None:
        super().__init__(transport, reader, idle_timeout)
        self.endpoint = endpoint
        self.max_requests = max_requests
        self.on_protocol_error = on_protocol_error
        self.waiting: dict[int, Slot] = {}
        self._seqids = itertools.count(1)
        self.capacity_changed: Callable[[], None] = lambda: None
        self.closed_reason = ""

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def next_seqid(self) -> int:
        seqid = next(self._seqids)
        if seqid > 0x7FFFFFFF:
            self._seqids = itertools.count(2)
            seqid = 1
        while seqid in self.waiting:  # after wrapping, skip ids still in flight
            seqid = next(self._seqids)
        return seqid

    def send(self, data: bytes, slot: Slot | None, seqid: int) -> None:
        """Write a call; a slot (None for oneway) waits for the reply with `seqid`."""
        if slot is not None:
            slot.upstream = self
            slot.upstream_seqid = seqid
            self.waiting[seqid] = slot
        self.write(data)

    def forget(self, slot: Slot) -> None:
        if self.waiting.get(slot.upstream_seqid) is slot:
            del self.waiting[slot.upstream_seqid]
            self.capacity_changed()
        slot.upstream = None

    async def run(self) -> None:
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    reason = await self._messages(self._on_reply)
                except ThriftError as e:
                    reason = f"protocol error: {e}"
                    self.on_protocol_error()
                    log.warning("upstream %s: %s", self.endpoint, e)
                except TransportClosed as e:
                    reason = str(e) or "closed"
                nursery.cancel_scope.cancel()
        finally:
            self.closed_reason = reason
            self.transport.close(reason)
            self._fail_all(f"upstream connection {reason}")

    async def _on_reply(self, msg: thrift.Message) -> None:
        if msg.head.mtype != thrift.REPLY and msg.head.mtype != thrift.EXCEPTION:
            raise ThriftError(f"the upstream sent a message of type {msg.head.mtype}")
        slot = self.waiting.pop(msg.head.seqid, None)
        if slot is None:
            return  # its call timed out or its client left: nobody waits
        slot.upstream = None
        self.capacity_changed()
        if not slot.done:
            slot.on_reply(slot, msg)

    def _fail_all(self, reason: str) -> None:
        waiting = list(self.waiting.values())
        self.waiting.clear()
        for slot in waiting:
            slot.upstream = None
            if not slot.done:
                slot.on_lost(slot, reason)
        flush_writes()
        self.capacity_changed()

    async def close_gracefully(self, timeout: float) -> None:
        """Let the calls in flight finish (bounded), then close."""
        with trio.move_on_after(timeout):
            while self.waiting and not self.transport.closed:
                await trio.sleep(0.05)
        self.transport.close("pool closed")
