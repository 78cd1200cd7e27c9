"""Log lines that a flood of calls cannot turn into a flood of lines.

Knows: how often a line of one kind may be written. Must not: decide policy.
The access control filters log a line when they let a failing call through
(dry run) or refuse one; at thousands of calls a second that must stay a few
lines a minute, each saying how many it stands for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """At most one line per `interval` seconds per key; the first one at once.

    A line written after a quiet spell says how many were held back since the
    previous one, so the counts still add up in the log.
    """

    __slots__ = ("_clock", "_held", "_last", "interval", "logger")

    def __init__(
        self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Write `msg % args` unless a line of `key` was written less than `interval` ago."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it in the last %.0fs)"
            args = (*args, held, now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args)
        return True
