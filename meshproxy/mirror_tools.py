"""`meshproxy mirror tail SOURCE`: mirrored calls as JSON lines, bodies summarised."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from meshproxy.mirror import Record, read_segment, segments

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
