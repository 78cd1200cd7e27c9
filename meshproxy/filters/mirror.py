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

import os
import random
import time
from typing import Any

from meshproxy import mirror
from meshproxy.call import Call, Completion, Headers, Response
from meshproxy.filters.base import CONTINUE, Continue, Filter, FilterOptionError, Options

DEFAULT_REDACT = ("authorization", "cookie", "set-cookie", "proxy-authorization", "x-ticket", "tt.acl_token")
REDACTED = "<redacted>"


def _ratio(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        raise ValueError(f"expected a share from 0 to 1, got {raw!r}")
    return float(raw)


def _size(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"expected a byte count of 0 or more, got {raw!r}")
    return raw


def _bool(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw


def _names(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ValueError("expected a list of header / metadata names")
    return tuple(x.lower().encode() for x in raw)


class _Capture:
    """What one mirrored call collects while it runs."""

    __slots__ = ("limit", "request", "request_cut", "request_size", "response", "response_cut", "response_headers",
                 "response_size", "started")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.started = time.time()
        # The chunks as forwarded (no copy); encode joins them once.
        self.request: list[bytes] = []
        self.response: list[bytes] = []
        self.request_size = self.response_size = 0
        self.request_cut = self.response_cut = False
        self.response_headers: Headers | None = None


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
        sample = o.get("sample", _ratio, 1.0)
        max_body = o.get("max_body_bytes", _size, 65536)
        capture_response = o.get("capture_response", _bool, False)
        redact = o.get("redact", _names, tuple(n.encode() for n in DEFAULT_REDACT))
        m = o.section("match")
        match = {
            "service": m.get("service", _text, None),
            "method": m.get("method", _text, None),
            "path_prefix": m.get("path_prefix", _text, None),
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
        capture = _Capture(self.max_body_bytes)
        call.request_observers.append(lambda c, chunk: _keep(capture, chunk, True))
        if self.capture_response:
            call.response_observers.append(lambda c, chunk: _keep(capture, chunk, False))
        call.completion_hooks.append(lambda c, done: self._submit(c, done, capture))
        call.filter_state["mirror"] = capture
        return CONTINUE

    async def on_response(self, call: Call, response: Response) -> None:
        capture = call.filter_state.get("mirror")
        if capture is not None and self.capture_response:
            capture.response_headers = [(k, v) for k, v in response.headers]
            capture.response_headers.insert(0, (b":status", str(response.status).encode()))

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

    def _submit(self, call: Call, done: Completion, capture: _Capture) -> None:
        sink = mirror.current()
        if sink is None:
            return
        meta: dict[str, Any] = {
            "id": os.urandom(12).hex(),
            "start": capture.started,
            "end": time.time(),
            "listener": call.listener,
            "direction": call.direction,
            "protocol": call.protocol.value,
            "service": call.authority,
            "method": call.method,
            "path": call.path,
            "scheme": call.scheme,
            "route": call.route.name if call.route is not None else None,
            "cluster": call.cluster,
            "upstream": done.upstream or None,
            "status": done.status,
            "grpc_status": done.grpc_status or None,
            "reason": done.reason or None,
            "duration_ms": round(done.duration * 1000, 3),
            "request_id": call.request_id,
            "request_headers": self._headers(call.headers),
            "request_truncated": capture.request_cut,
        }
        for k, v in call.headers:
            if k == b"traceparent":
                meta["traceparent"] = v.decode("latin-1")
        if self.capture_response:
            meta["response_headers"] = self._headers(capture.response_headers or [])
            meta["response_trailers"] = self._headers(done.trailers) if done.trailers else None
            meta["response_truncated"] = capture.response_cut
        sink.submit(mirror.Record(meta, capture.request, capture.response))

    def _headers(self, headers: Headers) -> list[list[str]]:
        redact = self.redact
        return [
            [k.decode("latin-1"), REDACTED if k in redact else v.decode("latin-1")] for k, v in headers
        ]


def _keep(capture: _Capture, chunk: bytes, request: bool) -> None:
    if request:
        room = capture.limit - capture.request_size
        if len(chunk) > room:
            chunk = chunk[: max(room, 0)]
            capture.request_cut = True
        capture.request.append(chunk)
        capture.request_size += len(chunk)
    else:
        room = capture.limit - capture.response_size
        if len(chunk) > room:
            chunk = chunk[: max(room, 0)]
            capture.response_cut = True
        capture.response.append(chunk)
        capture.response_size += len(chunk)


def _text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected a non-empty string, got {raw!r}")
    return raw


def _header_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError("expected a mapping of header names to values")
    return {k: str(v) for k, v in raw.items()}


__all__ = ["FilterOptionError", "MirrorFilter"]
