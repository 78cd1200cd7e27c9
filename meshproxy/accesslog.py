"""Access log: one JSON line per call, to stdout or a file.

Lines go into a bounded buffer that a task flushes every FLUSH_INTERVAL (or
when it fills); the call path never waits on the disk. When the buffer is
over its bound, lines are dropped and counted.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

import trio

from meshproxy.config import AccessLog as AccessLogConfig
from meshproxy.metrics import Metrics

FLUSH_INTERVAL = 0.5
# Lines held between flushes: beyond this, a stuck disk costs lines, not memory.
MAX_PENDING_LINES = 50_000


class AccessLog:
    def __init__(self, config: AccessLogConfig, metrics: Metrics) -> None:
        self.config = config
        self.enabled = config.enabled
        self._lines: list[str] = []
        self._dropped = metrics.access_log_dropped
        self._file: IO[str] | None = None
        self._wake = trio.Event()
        self._closed = False

    def open(self) -> None:
        if not self.enabled:
            return
        if self.config.path == "stdout":
            self._file = sys.stdout
        else:
            self._file = open(self.config.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if len(self._lines) >= MAX_PENDING_LINES:
            self._dropped.inc()
            self._wake.set()
            return
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        self._lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))

    def flush(self) -> None:
        if self._lines and self._file is not None:
            lines, self._lines = self._lines, []
            text = "\n".join(lines) + "\n"
            try:
                self._file.write(text)
            except UnicodeEncodeError:
                # A field no filter cleaned (a lone surrogate) must not stop the log, or the proxy.
                self._file.write(text.encode("utf-8", "backslashreplace").decode("utf-8"))
            self._file.flush()

    async def run(self) -> None:
        """Flush periodically, until closed (a reload replaces the log)."""
        try:
            while not self._closed:
                with trio.move_on_after(FLUSH_INTERVAL):
                    await self._wake.wait()
                    self._wake = trio.Event()
                # A blocking write to a local file or pipe; the bounded buffer
                # caps how much one flush can hold.
                self.flush()
        finally:
            self.flush()

    def close(self) -> None:
        self._closed = True
        self.enabled = False  # calls still running on an older config stop writing here
        self._wake.set()
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None
