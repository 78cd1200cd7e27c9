"""Mirrored calls: a bounded queue between the calls and a sink, and the spool format.

Knows: records (a MessagePack head and the captured bytes), the file spool (segments
of length-prefixed, CRC-checked records; rotation, retention, fsync policy),
and how a writer thread drains the queue in batches. Must not: slow a call.
`submit()` is O(1), never blocks and never raises: when the queue is full
the record is dropped and counted. Sink I/O runs in the writer thread, so a
stalled disk stalls only the writer, never the event loop.

Accounting: every record a filter hands in is `sampled`; it is then
`written`, or `dropped` with a reason, or still `in flight` (queued or being
written), so at any scrape sampled = written + dropped + in flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from meshproxy.config import MirrorConfig
from meshproxy.metrics import Metrics

log = logging.getLogger(__name__)

MAGIC = b"MPMR"
_HEAD = struct.Struct("!4sII")  # magic, payload length, crc32 of the payload
_META = struct.Struct("!I")  # head length, then the head (MessagePack), then request and response bytes
SEGMENT_PREFIX, SEGMENT_SUFFIX = "mirror-", ".spool"
# Records per batch a writer takes at most (one write and at most one fsync each).
BATCH = 512
RECONNECT_BACKOFF_MAX = 30.0
# The longest one sink write may block (Redis socket timeout 2 s, NATS acks 5 s).
SINK_WRITE_TIMEOUT = 5.0
# A writer thread that failed to start (the process is out of threads) is tried again this often, not per record.
START_RETRY = 1.0
# Head fields that hold header lists: bytes pairs on the wire, text pairs once decoded.
HEADER_FIELDS = ("request_headers", "response_headers", "response_trailers")
# The mirror filter's head: a MessagePack array in this order, cheaper to build
# and pack than a map (this runs once per mirrored call). A head without the
# last four fields captured no response. `decode_meta` turns it into the map
# that tools read, adding `id` (run-seq), `duration_ms` and `traceparent`.
FIELDS = ("run", "seq", "start", "end", "listener", "direction", "protocol", "service", "method", "path", "scheme",
          "route", "cluster", "upstream", "status", "grpc_status", "reason", "request_id", "request_headers",
          "request_bytes", "request_truncated", "response_headers", "response_trailers", "response_bytes",
          "response_truncated")
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_REQUEST_BYTES, _RESPONSE_BYTES = _INDEX["request_bytes"], _INDEX["response_bytes"]
_REQUEST_ONLY = _INDEX["response_headers"]  # the length of a head that captured no response
# A map head (any record not built by the filter) may leave these out when they hold their default.
DEFAULTS: dict[str, Any] = {
    "route": None, "cluster": None, "upstream": None, "grpc_status": None, "reason": None, "traceparent": None,
    "request_truncated": False,
}
RESPONSE_DEFAULTS: dict[str, Any] = {"response_trailers": None, "response_truncated": False}


@dataclass(slots=True)
class Record:
    """One mirrored call. `meta` is the head: the filter's FIELDS array, or a map of scalars and header lists.

    A filter may hand in header lists as (bytes, bytes) pairs and bodies as the
    chunks it saw; `encode` writes them as they are (no decoding or joining on
    the call path) and `decode` gives back a map with [str, str] pairs (latin-1) and bytes.
    """

    meta: dict[str, Any] | list[Any]
    request: bytes | list[bytes] = b""
    response: bytes | list[bytes] = b""


_BYTES = (bytes, bytearray)  # not `bytes | bytearray`: that builds a union object on every call


def _parts(data: bytes | list[bytes]) -> list[bytes]:
    return [data] if isinstance(data, _BYTES) else data


_packers = threading.local()


def _pack(head: Any) -> bytes:
    """msgpack.packb without building a Packer on every call (0.7 of packb's
    4.6 µs for a record head here). A Packer is not thread-safe: one per thread."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer()
    return packer.pack(head)


def _sized(record: Record) -> tuple[list[bytes], list[bytes], int]:
    """The record's request and response chunks, and their total size, with each side's count in the head.

    The mirror filter counts as it captures and puts the counts in its head;
    they are summed here only for a map head built without them.
    """
    req, resp = _parts(record.request), _parts(record.response)
    meta = record.meta
    if isinstance(meta, list):
        return req, resp, meta[_REQUEST_BYTES] + (meta[_RESPONSE_BYTES] if len(meta) > _RESPONSE_BYTES else 0)
    if "response_bytes" not in meta:
        meta["request_bytes"] = sum(map(len, req))
        meta["response_bytes"] = sum(map(len, resp))
    return req, resp, meta["request_bytes"] + meta["response_bytes"]


def encode(record: Record) -> bytes:
    """The record as the spool (and NATS) carries it: checked head, then the payload.

    The head is MessagePack, not JSON: it packs bytes as they are and costs a
    fifth of json.dumps. One join and one checksum over it: cheaper than a
    checksum per part.
    """
    req, resp, _ = _sized(record)
    head = _pack(record.meta)
    payload = b"".join([_META.pack(len(head)), head, *req, *resp])
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _head_field(meta: dict[str, Any] | list[Any], name: str) -> Any:
    """One head field, from either form of head (None if absent)."""
    if isinstance(meta, dict):
        return meta.get(name)
    i = _INDEX[name]
    return meta[i] if i < len(meta) else None


def decode_meta(head: bytes) -> dict[str, Any]:
    meta = msgpack.unpackb(head)
    if isinstance(meta, list):
        meta = _from_fields(meta)
    elif not isinstance(meta, dict):
        raise ValueError("record head is neither a map nor a field array")
    for name in HEADER_FIELDS:
        pairs = meta.get(name)
        if pairs:
            meta[name] = [[_text(k), _text(v)] for k, v in pairs]
    for defaults in (DEFAULTS, RESPONSE_DEFAULTS) if "response_headers" in meta else (DEFAULTS,):
        for k, v in defaults.items():
            meta.setdefault(k, v)
    return meta


def _from_fields(values: list[Any]) -> dict[str, Any]:
    if len(values) not in (_REQUEST_ONLY, len(FIELDS)):
        raise ValueError(f"record head has {len(values)} fields")
    given = dict(zip(FIELDS, values, strict=False))  # a head without a response is shorter
    meta = {"id": f"{given.pop('run')}-{given.pop('seq'):08x}", **given}
    meta["duration_ms"] = round((meta["end"] - meta["start"]) * 1000, 3)
    meta["traceparent"] = next((_text(v) for k, v in meta["request_headers"] if k == b"traceparent"), None)
    meta.setdefault("response_bytes", 0)
    return meta


def _text(b: bytes | str) -> str:
    return b.decode("latin-1") if isinstance(b, bytes) else b


def decode(payload: bytes) -> Record:
    (n,) = _META.unpack_from(payload)
    meta = decode_meta(payload[4 : 4 + n])
    at = 4 + n
    req = payload[at : at + meta["request_bytes"]]
    resp = payload[at + meta["request_bytes"] : at + meta["request_bytes"] + meta["response_bytes"]]
    return Record(meta, req, resp)


def read_segment(path: Path) -> Iterator[Record]:
    """The records of one segment, up to the first incomplete or damaged one (a torn tail)."""
    return records_in(path.read_bytes())


def records_in(data: bytes) -> Iterator[Record]:
    """The records in `data` (a segment, a published message), up to the first incomplete or damaged one."""
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, size, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + size
        if magic != MAGIC or end > len(data):
            return
        payload = data[pos + _HEAD.size : end]
        if zlib.crc32(payload) != crc:
            return
        try:
            yield decode(payload)
        except (ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException):
            return
        pos = end


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))


def read_spool(directory: Path) -> Iterator[Record]:
    for path in segments(directory):
        yield from read_segment(path)


# -- the file sink (runs in the writer thread) ------------------------------------------


class FileSink:
    def __init__(self, config: MirrorConfig) -> None:
        s = config.sink
        self.directory = Path(s.directory)
        self.segment_bytes = s.segment_bytes
        self.segment_age = s.segment_age
        self.retention_bytes = s.retention_bytes
        self.fsync = s.fsync
        self.fsync_interval = s.fsync_interval
        self._fd = -1
        self._size = 0
        self._opened = 0.0
        self._synced = 0.0
        self._next = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = segments(self.directory)
        self._next = int(existing[-1].name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]) + 1 if existing else 1
        self._rotate()

    def _rotate(self) -> None:
        if self._fd >= 0:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.directory / f"{SEGMENT_PREFIX}{self._next:010d}{SEGMENT_SUFFIX}"
        self._next += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._opened = time.monotonic()
        self._retain()

    def _retain(self) -> None:
        """Delete the oldest segments while the spool is over its byte cap (never the open one)."""
        files = segments(self.directory)
        total = sum(f.stat().st_size for f in files)
        for f in files[:-1]:
            if total <= self.retention_bytes:
                break
            total -= f.stat().st_size
            f.unlink(missing_ok=True)

    prepare = staticmethod(encode)

    def write(self, blobs: list[Any]) -> None:
        if self._fd < 0:
            self.open()
        if self._size >= self.segment_bytes or time.monotonic() - self._opened >= self.segment_age:
            self._rotate()
        total = sum(map(len, blobs))
        for i in range(0, len(blobs), 512):  # writev: no joined copy of the batch (IOV_MAX is 1024)
            chunk = blobs[i : i + 512]
            want = sum(map(len, chunk))
            n = os.writev(self._fd, chunk)
            if n < want:  # a short write (rare on regular files): finish it plainly
                rest = memoryview(b"".join(chunk))[n:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        self._size += total
        now = time.monotonic()
        if self.fsync == "always" or (self.fsync == "interval" and now - self._synced >= self.fsync_interval):
            os.fsync(self._fd)
            self._synced = now
        if self._size >= self.segment_bytes:
            self._retain()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                if self.fsync != "never":
                    os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


class RedisSink:
    """Redis Streams: one XADD per record (MAXLEN ~ caps the stream), a pipeline per batch.

    Fields: `meta` (the MessagePack head, as in the spool), `request` and `response` (the bytes), and
    `protocol`, `listener`, `path`, `status` for cheap server-side filtering.
    redis-py is blocking: it runs in the writer thread.
    """

    def __init__(self, config: MirrorConfig) -> None:
        import redis

        s = config.sink
        self.stream = s.stream
        self.maxlen = s.max_length
        self.client = redis.Redis.from_url(s.url, socket_timeout=2.0, socket_connect_timeout=2.0)

    @staticmethod
    def prepare(r: Record) -> dict[str, str | bytes | int]:
        return redis_fields(r)

    def write(self, prepared: list[Any]) -> None:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            for fields in prepared:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except redis.RedisError as e:
            raise OSError(f"redis: {e}") from None

    def close(self) -> None:
        self.client.close()


def redis_fields(r: Record) -> dict[str, str | bytes | int]:
    req, resp, _ = _sized(r)
    m = r.meta
    return {"meta": _pack(m), "request": b"".join(req), "response": b"".join(resp),
            "protocol": _head_field(m, "protocol") or "", "listener": _head_field(m, "listener") or "",
            "path": _head_field(m, "path") or "", "status": _head_field(m, "status") or 0}


class NatsSink:
    """NATS JetStream: one publish per record (the spool's record bytes), acknowledged.

    nats-py is asyncio: it gets an event loop of its own on a thread, and the
    writer thread hands it each batch and waits (bounded) for the acks.
    The stream (named after the subject) is created if it does not exist.
    """

    def __init__(self, config: MirrorConfig) -> None:
        import asyncio

        s = config.sink
        self.url, self.subject = s.url, s.subject
        self.stream_name = s.stream or self.subject.replace(".", "_").replace("*", "_").replace(">", "_")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mirror-nats", daemon=True)
        self._thread.start()
        self._nc: Any = None
        self._js: Any = None

    async def _connect(self) -> None:
        import nats

        self._nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
        self._js = self._nc.jetstream(timeout=2)
        try:
            await self._js.stream_info(self.stream_name)
        except Exception:
            await self._js.add_stream(name=self.stream_name, subjects=[self.subject])

    async def _publish(self, blobs: list[bytes]) -> None:
        if self._nc is None or self._nc.is_closed:
            await self._connect()
        acks = [self._js.publish(self.subject, b) for b in blobs]
        for ack in acks:
            await ack

    prepare = staticmethod(encode)

    def write(self, blobs: list[Any]) -> None:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(self._publish(blobs), self.loop)
        try:
            future.result(timeout=SINK_WRITE_TIMEOUT)
        except Exception as e:
            future.cancel()
            self._nc = None
            raise OSError(f"nats: {e or type(e).__name__}") from None

    def close(self) -> None:
        import asyncio

        if self._nc is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._nc.close(), self.loop).result(timeout=2.0)
        self.loop.call_soon_threadsafe(self.loop.stop)


def make_sink(config: MirrorConfig) -> FileSink | RedisSink | NatsSink:
    kind = config.sink.type
    if kind == "redis":
        return RedisSink(config)
    if kind == "nats":
        return NatsSink(config)
    return FileSink(config)


# -- the queue ---------------------------------------------------------------------------


@dataclass
class Mirror:
    """The queue and its writer: a thread of its own, started by the first
    record, that wakes every `flush_interval` (or when a batch is full) and
    hands the sink a batch.

    The writer is a plain thread, not a trio task handing each batch to a
    worker thread: that hand-off ran on the event loop once per batch and
    delayed whatever call was in flight then (p99 at concurrency 1 was 20%
    above plain). The thread holds the GIL only to pop a batch and count it;
    the sink's I/O releases it. deque append/popleft are atomic, so the
    queue needs no lock.
    """

    config: MirrorConfig
    metrics: Metrics
    _queue: deque[Any] = field(default_factory=deque)  # records as the sink will write them
    _closed: bool = False
    _deadline: float = math.inf  # time.monotonic() past which the writer writes no more
    _thread: threading.Thread | None = None
    _retry_start_at: float = 0.0  # after a failed thread start, not before this (time.monotonic())

    def __post_init__(self) -> None:
        self._counts = self.metrics.mirror
        self._latency = self.metrics.mirror_sink_seconds
        self.sink = make_sink(self.config)
        self._prepare = self.sink.prepare
        self._wake = threading.Event()  # a full batch, or closing
        self._stop = threading.Event()  # closing: cuts a reconnect backoff short

    def submit(self, record: Record) -> bool:
        """From the call path: O(1), never blocks, never raises."""
        counts = self._counts
        counts.sampled += 1
        if _sized(record)[2] > self.config.max_record_bytes:
            counts.dropped["too_large"] += 1
            return False
        if self._closed or len(self._queue) >= self.config.queue_size:
            counts.dropped["queue_full" if not self._closed else "shutdown"] += 1
            return False
        # Encoded now, a call at a time: the cost is spread evenly instead of
        # arriving as one burst per batch in front of whatever call comes next.
        self._queue.append(self._prepare(record))
        counts.enqueued += 1
        if self._thread is None:
            self._start()  # on the first record: a process that mirrors nothing runs no writer
        elif len(self._queue) >= BATCH and not self._wake.is_set():
            self._wake.set()
        return True

    def _start(self) -> None:
        now = time.monotonic()
        if now < self._retry_start_at:
            return
        thread = threading.Thread(target=self._write_loop, name="mirror-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # can't start new thread: records stay queued (bounded) until a retry works
            self._retry_start_at = now + START_RETRY
            log.error("mirror: cannot start the writer thread: %s; trying again in %.0f s", e, START_RETRY)
            return
        self._thread = thread

    def _write_loop(self) -> None:
        """Batches every flush_interval (or when a batch is full); after a failed batch, backs off."""
        backoff = 0.0
        while True:
            self._wake.wait(self.config.flush_interval)
            self._wake.clear()
            closing = self._closed
            while self._queue and time.monotonic() < self._deadline:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                if self._write(batch):
                    backoff = 0.0
                    continue
                if closing:
                    return  # the sink is down at shutdown: close() drops the rest
                # The sink is down: this batch is lost (counted); wait before trying again,
                # while new records queue up to the bound and then drop.
                backoff = min(max(backoff * 2, 0.1), RECONNECT_BACKOFF_MAX)
                self._stop.wait(backoff)
                break
            if closing:
                return

    def _write(self, batch: list[Any]) -> bool:
        start = time.monotonic()
        try:
            self.sink.write(batch)
        except Exception as e:  # OSError from every sink; anything else must not end the writer either
            log.warning("mirror sink: %s; %d records dropped", e, len(batch))
            self._counts.dropped["sink_down"] += len(batch)
            if isinstance(self.sink, FileSink):
                with contextlib.suppress(OSError):
                    self.sink.close()
            return False
        self._latency.observe(time.monotonic() - start)
        self._counts.written += len(batch)
        return True

    async def close(self, timeout: float) -> None:
        """Stop taking records; flush what is queued within `timeout`; drop (and count) the rest."""
        self._deadline = time.monotonic() + timeout
        self._closed = True
        if self._thread is None and self._queue:
            self._retry_start_at = 0.0  # a writer that could not start at submit gets one last try
            self._start()
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            # A sink write past the deadline (a stalled Redis) is bounded by its own socket timeout.
            await trio.to_thread.run_sync(self._thread.join, timeout + SINK_WRITE_TIMEOUT)
        if self._queue:
            n = len(self._queue)
            self._queue.clear()
            self._counts.dropped["shutdown"] += n
            self._counts.discarded += n
        if self._thread is not None and self._thread.is_alive():
            log.warning("mirror sink: the writer is still busy after %.1f s; the sink is left open", timeout)
            return
        await trio.to_thread.run_sync(self.sink.close)

    def abandon(self) -> None:
        """The process is going down without close(): the writer stops after its current batch."""
        self._deadline = 0.0
        self._closed = True
        self._stop.set()
        self._wake.set()


# The process's mirror, for the mirror filter (filters are built from config alone).
_current: Mirror | None = None


def install(mirror: Mirror | None) -> None:
    global _current
    _current = mirror


def current() -> Mirror | None:
    return _current
