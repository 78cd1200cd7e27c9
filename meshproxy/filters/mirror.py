"""`mirror`: copy a share of calls into the mirror queue (meshproxy/mirror.py).

    - name: mirror
      sample: 0.1                  # share of matching calls, 0..1
      max_body_bytes: 65536        # per direction; longer bodies are cut and flagged
      capture_response: true       # also the status, headers, trailers and body
      match: {service: Echo, method: echo, path_prefix: /echo., headers: {x-tenant: a}}
      redact: [authorization, cookie, set-cookie, x-ticket]   # the default list

The call path only appends to bounded buffers and hands one record to the
queue when the call is over; it never waits and never fails the call. For
Thrift the whole framed message (and the framed reply) is captured, so a
record replays byte for byte.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import Any

from meshproxy import mirror
from meshproxy.call import Call, Completion, Headers
from meshproxy.filters.base import (
    CONTINUE,
    Continue,
    Filter,
    FilterOptionError,
    Options,
    flag,
    share,
    text,
)

DEFAULT_REDACT = ("authorization", "cookie", "set-cookie", "proxy-authorization", "x-ticket", "x-mesh-ticket",
                  "tt.acl_token")
REDACTED = b"<redacted>"


def _size(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"expected a byte count of 0 or more, got {raw!r}")
    return raw


def _names(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ValueError("expected a list of header / metadata names")
    return tuple(x.lower().encode() for x in raw)


class _Capture:
    """What one mirrored call collects while it runs; its methods are the call's hooks."""

    __slots__ = ("filter", "request", "request_cut", "request_room", "response", "response_cut", "response_room")

    def __init__(self, f: MirrorFilter) -> None:
        self.filter = f
        # The chunks as forwarded (no copy); encode writes them as they are.
        self.request: list[bytes] = []
        self.response: list[bytes] = []
        self.request_room = self.response_room = f.max_body_bytes
        self.request_cut = self.response_cut = False

    def on_request_chunk(self, call: Call, chunk: bytes) -> None:
        if len(chunk) > self.request_room:
            chunk = chunk[: self.request_room]
            self.request_cut = True
        self.request.append(chunk)
        self.request_room -= len(chunk)

    def on_response_chunk(self, call: Call, chunk: bytes) -> None:
        if len(chunk) > self.response_room:
            chunk = chunk[: self.response_room]
            self.response_cut = True
        self.response.append(chunk)
        self.response_room -= len(chunk)

    def on_complete(self, call: Call, done: Completion) -> None:
        sink = mirror.current()
        if sink is None:
            return
        f = self.filter
        end = time.time()
        route = call.route
        redacted = f.redacted
        # mirror.FIELDS, in order; decode_meta derives the id, duration and traceparent.
        head = [
            _RUN, next(_seq), end - done.duration, end, call.listener, call.direction, call.protocol.value,
            call.authority, call.method, call.path, call.scheme, route.name if route is not None else None,
            call.cluster, done.upstream or None, done.status, done.grpc_status or None, done.reason or None,
            call.request_id, redacted(call.headers), f.max_body_bytes - self.request_room, self.request_cut,
        ]
        if f.capture_response:
            head += (redacted(done.headers) if done.headers else [], redacted(done.trailers) if done.trailers else None,
                     f.max_body_bytes - self.response_room, self.response_cut)
        sink.submit(mirror.Record(head, self.request, self.response))


# Record ids are run-seq: a random prefix per process start, and a count within it.
_RUN = os.urandom(6).hex()
_seq = itertools.count(1)


class MirrorFilter(Filter):
    name = "mirror"

    def __init__(
        self,
        sample: float,
        max_body_bytes: int,
        capture_response: bool,
        redact: tuple[bytes, ...],
        match: dict[str, Any],
    ) -> None:
        self.sample = sample
        self.max_body_bytes = max_body_bytes
        self.capture_response = capture_response
        self.redact = frozenset(redact)
        self.service = match.get("service")
        self.method = match.get("method")
        self.path_prefix = match.get("path_prefix")
        self.headers = tuple((k.lower().encode(), str(v).encode()) for k, v in (match.get("headers") or {}).items())
        self._random = random.random

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MirrorFilter:
        o = Options(options)
        sample = o.get("sample", share, 1.0)
        max_body = o.get("max_body_bytes", _size, 65536)
        capture_response = o.get("capture_response", flag, False)
        redact = o.get("redact", _names, tuple(n.encode() for n in DEFAULT_REDACT))
        m = o.section("match")
        match = {
            "service": m.get("service", text, None),
            "method": m.get("method", text, None),
            "path_prefix": m.get("path_prefix", text, None),
            "headers": m.get("headers", _header_map, None),
        }
        m.done()
        o.done()
        return cls(sample, max_body, capture_response, redact, match)

    async def on_request(self, call: Call) -> Continue:
        if self.sample < 1.0 and self._random() >= self.sample:
            return CONTINUE
        if not self._matches(call):
            return CONTINUE
        capture = _Capture(self)
        call.request_observers.append(capture.on_request_chunk)
        if self.capture_response:
            call.response_observers.append(capture.on_response_chunk)
        call.completion_hooks.append(capture.on_complete)
        return CONTINUE

    def _matches(self, call: Call) -> bool:
        if self.service is not None and call.authority != self.service and not call.path.startswith(f"/{self.service}/"):
            return False
        if self.method is not None and call.path.rpartition("/")[2] != self.method:
            return False
        if self.path_prefix is not None and not call.path.startswith(self.path_prefix):
            return False
        for name, value in self.headers:
            if not any(k == name and v == value for k, v in call.headers):
                return False
        return True

    def redacted(self, headers: Headers) -> Headers:
        """A copy with the values of redacted names replaced (the pairs stay bytes: encode packs them as is)."""
        redact = self.redact
        return [kv if kv[0] not in redact else (kv[0], REDACTED) for kv in headers]


def _header_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError("expected a mapping of header names to values")
    return {k: str(v) for k, v in raw.items()}


__all__ = ["FilterOptionError", "MirrorFilter"]
