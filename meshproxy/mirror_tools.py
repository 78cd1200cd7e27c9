"""`meshproxy mirror tail SOURCE`: mirrored calls as JSON lines, bodies summarised."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshproxy.mirror import Record, decode_meta, read_segment, read_spool, records_in, segments

# Bytes of each body shown (as text if it decodes, else hex).
PREVIEW = 48
# --follow: how often a spool is looked at again; how long one queue read waits.
FOLLOW_POLL = 0.5
FOLLOW_BLOCK_MS = 1000


def summary(record: Record) -> dict[str, Any]:
    out = dict(record.meta)
    out["request_body"] = _body(record.request)
    if "response_headers" in out:
        out["response_body"] = _body(record.response)
    return out


def _body(data: bytes) -> dict[str, Any]:
    head = data[:PREVIEW]
    try:
        preview: str = head.decode("utf-8")
        kind = "text"
    except UnicodeDecodeError:
        preview, kind = head.hex(), "hex"
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16], kind: preview}


SOURCES = "a spool directory, redis://HOST:PORT[/DB]#STREAM or nats://HOST:PORT#SUBJECT"


def read_records(source: str, follow: bool = False) -> Iterator[Record]:
    """Every record of a source, oldest first; with `follow`, then each new one as it arrives.

    ValueError for a source that is none of SOURCES.
    """
    if source.startswith("redis://"):
        return _from_redis(source, follow)
    if source.startswith("nats://"):
        return _from_nats(source, follow)
    directory = Path(source)
    if not directory.is_dir():
        raise ValueError(f"{source}: not {SOURCES}")
    return _from_spool(directory) if follow else read_spool(directory)


def _from_spool(directory: Path) -> Iterator[Record]:
    seen: dict[Path, int] = {}  # records already given per segment
    while True:
        live = segments(directory)
        for path in live:
            done = seen.get(path, 0)
            for i, record in enumerate(read_segment(path)):
                if i >= done:
                    seen[path] = i + 1
                    yield record
        for path in set(seen) - set(live):  # deleted by retention
            del seen[path]
        time.sleep(FOLLOW_POLL)


def _from_redis(source: str, follow: bool) -> Iterator[Record]:
    import redis

    try:
        yield from _redis_entries(source, follow)
    except redis.RedisError as e:
        raise ValueError(f"{source}: {e}") from None


def _redis_entries(source: str, follow: bool) -> Iterator[Record]:
    import redis

    url, _, stream = source.partition("#")
    stream = stream or "meshproxy-mirror"
    # The blocking read below waits up to FOLLOW_BLOCK_MS: the socket must wait longer.
    client = redis.Redis.from_url(url, socket_timeout=5.0 + FOLLOW_BLOCK_MS / 1000)
    start, last = "-", "0-0"
    while True:
        entries = client.xrange(stream, min=start, count=1000)
        for entry_id, fields in entries:
            yield _redis_record(fields)
            last = entry_id.decode()
            start = "(" + last
        if len(entries) < 1000:
            break
    while follow:
        for _, entries in client.xread({stream: last}, count=1000, block=FOLLOW_BLOCK_MS) or ():
            for entry_id, fields in entries:
                yield _redis_record(fields)
                last = entry_id.decode()


def _redis_record(fields: dict[bytes, bytes]) -> Record:
    return Record(decode_meta(fields[b"meta"]), fields.get(b"request", b""), fields.get(b"response", b""))


def _from_nats(source: str, follow: bool) -> Iterator[Record]:
    """The stream's messages through an ordered consumer from the first one.

    nats-py is asyncio: it runs on a thread of its own and hands records over
    through a bounded queue, so a slow reader of this iterator slows the fetch.
    """
    import asyncio
    import queue
    import threading

    import nats

    url, _, subject = source.partition("#")
    subject = subject or "meshproxy.mirror"
    handoff: queue.Queue[Record | BaseException | None] = queue.Queue(maxsize=1000)
    stop = threading.Event()

    async def fetch() -> None:
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=5)
            stream = await js.find_stream_name_by_subject(subject)
            pending = (await js.stream_info(stream)).state.messages
            sub = await js.subscribe(subject, ordered_consumer=True)
            while not stop.is_set() and (follow or pending > 0):
                try:
                    msg = await sub.next_msg(timeout=FOLLOW_BLOCK_MS / 1000)
                except nats.errors.TimeoutError:
                    if not follow:  # nothing more within the wait: the backlog is done
                        return
                    continue
                pending -= 1
                for record in _decode_blob(msg.data or b""):
                    while not stop.is_set():
                        try:
                            handoff.put(record, timeout=0.5)
                            break
                        except queue.Full:
                            await asyncio.sleep(0)
        finally:
            await nc.close()

    def run() -> None:
        try:
            asyncio.run(fetch())
            handoff.put(None)
        except BaseException as e:  # handed to the reader, raised there
            handoff.put(e)

    threading.Thread(target=run, name="mirror-tail-nats", daemon=True).start()
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise ValueError(f"{source}: {item or type(item).__name__}") from item
            yield item
    finally:
        stop.set()


def _decode_blob(blob: bytes) -> list[Record]:
    """One published record (the spool's record bytes), or nothing if it does not check out."""
    return list(itertools.islice(records_in(blob), 1))


def tail(source: str, follow: bool, protocol: str | None, path_prefix: str | None, listener: str | None) -> int:
    def wanted(m: dict[str, Any]) -> bool:
        return (
            (not protocol or m.get("protocol") == protocol)
            and (not path_prefix or str(m.get("path", "")).startswith(path_prefix))
            and (not listener or m.get("listener") == listener)
        )

    try:
        for record in read_records(source, follow):
            if wanted(record.meta):
                print(json.dumps(summary(record), ensure_ascii=False), flush=True)
        return 0
    except ValueError as e:
        print(f"meshproxy mirror tail: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError):
        return 0


# -- replay --------------------------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.sent = self.ok = self.failed = self.differ = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        return {"sent": self.sent, "succeeded": self.ok, "failed": self.failed,
                "status_differs_from_record": self.differ, "latency_ms": {"p50": pct(0.5), "p99": pct(0.99)},
                "errors": self.errors}


def replay(source: str, target: str, pace: str, rate: float, limit: int | None, timeout: float) -> int:
    """Send the recorded calls to `target` (host:port) one at a time; print a summary (JSON)."""
    import trio

    try:
        records = list(read_records(source))
    except ValueError as e:
        print(f"meshproxy mirror replay: {e}", file=sys.stderr)
        return 2
    host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit():
        print(f"meshproxy mirror replay: --to wants host:port, got {target!r}", file=sys.stderr)
        return 2
    stats = _Stats()
    trio.run(_replay, records, host, int(port_text), pace, rate, limit, timeout, stats)
    print(json.dumps(stats.summary()), flush=True)
    return 0 if stats.failed == 0 else 1


async def _replay(records: list[Record], host: str, port: int, pace: str, rate: float, limit: int | None,
                  timeout: float, stats: _Stats) -> None:
    import trio

    from meshproxy.replay import H2Replayer, ThriftReplayer

    h2: H2Replayer | None = None
    thrift: ThriftReplayer | None = None
    first_start: float | None = None
    began = trio.current_time()
    if limit is not None:
        records = records[:limit]
    for i, record in enumerate(records):
        m = record.meta
        if pace == "original":
            first_start = m["start"] if first_start is None else first_start
            await trio.sleep_until(began + (m["start"] - first_start))
        elif pace == "rate":
            await trio.sleep_until(began + i / rate)
        stats.sent += 1
        started = trio.current_time()
        try:
            with trio.fail_after(timeout):
                if m.get("protocol") == "thrift":
                    thrift = thrift or await ThriftReplayer.connect(host, port)
                    status = await thrift.call(record)
                else:
                    h2 = h2 or await H2Replayer.connect(host, port)
                    status = await h2.call(record)
        except Exception as e:  # one failed call must not end the replay
            stats.failed += 1
            key = type(e).__name__
            stats.errors[key] = stats.errors.get(key, 0) + 1
            h2 = thrift = None  # reconnect for the next call
            continue
        stats.latencies.append(trio.current_time() - started)
        stats.ok += 1
        if m.get("status") and status != m["status"]:
            stats.differ += 1
        if sys.stderr.isatty():
            print(f"\rreplayed {i + 1}/{len(records)}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
