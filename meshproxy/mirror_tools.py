"""`meshproxy mirror tail SOURCE`: mirrored calls as JSON lines, bodies summarised."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from meshproxy.mirror import Record, read_segment, read_spool, segments

# Bytes of each body shown (as text if it decodes, else hex).
PREVIEW = 48


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


def tail(source: str, follow: bool, protocol: str | None, path_prefix: str | None, listener: str | None) -> int:
    directory = Path(source)
    if not directory.is_dir():
        print(f"meshproxy mirror tail: {source}: not a spool directory", file=sys.stderr)
        return 2
    seen: dict[Path, int] = {}  # records already printed per segment
    try:
        while True:
            for path in segments(directory):
                done = seen.get(path, 0)
                for i, record in enumerate(read_segment(path)):
                    if i < done:
                        continue
                    seen[path] = i + 1
                    m = record.meta
                    if protocol and m.get("protocol") != protocol:
                        continue
                    if path_prefix and not str(m.get("path", "")).startswith(path_prefix):
                        continue
                    if listener and m.get("listener") != listener:
                        continue
                    print(json.dumps(summary(record), ensure_ascii=False), flush=True)
            if not follow:
                return 0
            time.sleep(0.5)
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

    directory = Path(source)
    if not directory.is_dir():
        print(f"meshproxy mirror replay: {source}: not a spool directory", file=sys.stderr)
        return 2
    host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit():
        print(f"meshproxy mirror replay: --to wants host:port, got {target!r}", file=sys.stderr)
        return 2
    stats = _Stats()
    trio.run(_replay, directory, host, int(port_text), pace, rate, limit, timeout, stats)
    print(json.dumps(stats.summary()), flush=True)
    return 0 if stats.failed == 0 else 1


async def _replay(directory: Path, host: str, port: int, pace: str, rate: float, limit: int | None,
                  timeout: float, stats: _Stats) -> None:
    import trio

    from meshproxy.replay import H2Replayer, ThriftReplayer

    h2: H2Replayer | None = None
    thrift: ThriftReplayer | None = None
    first_start: float | None = None
    began = trio.current_time()
    records = list(read_spool(directory))
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
