"""`headers`: set, add and remove request and response headers.

    - name: headers
      request: {set: {x-env: prod}, add: {x-via: meshproxy}, remove: [x-debug]}
      response: {set: {x-served-by: meshproxy}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshproxy.call import Call, Headers, Response, remove_header, set_header
from meshproxy.codec.h2 import CONNECTION_SPECIFIC
from meshproxy.filters.base import CONTINUE, Continue, Filter, Options, Respond


def _pairs(raw: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping of header name to value")
    out = []
    for k, v in raw.items():
        out.append((_name(k), _value(v)))
    return tuple(out)


def _names(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list):
        raise ValueError("expected a list of header names")
    return tuple(_name(k) for k in raw)


def _name(raw: Any) -> bytes:
    if not isinstance(raw, str) or not raw or raw.startswith(":"):
        raise ValueError(f"header name must be a non-empty string without ':' first, got {raw!r}")
    name = raw.lower().encode("ascii", "replace")
    if name in CONNECTION_SPECIFIC:
        raise ValueError(f"{raw} is connection-specific and not allowed in HTTP/2")
    return name


def _value(raw: Any) -> bytes:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"header value must be a string, got {raw!r}")
    text = str(raw)
    if any(c in text for c in "\r\n\x00"):
        raise ValueError("header value must not contain CR, LF or NUL")
    return text.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Edits:
    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, opts: Options) -> Edits:
        edits = cls(opts.get("set", _pairs, ()), opts.get("add", _pairs, ()), opts.get("remove", _names, ()))
        opts.done()
        return edits

    def apply(self, headers: Headers) -> None:
        for name in self.remove:
            remove_header(headers, name)
        for name, value in self.set:
            set_header(headers, name, value)
        headers.extend(self.add)


class HeadersFilter(Filter):
    name = "headers"

    def __init__(self, request: Edits, response: Edits) -> None:
        self.request = request
        self.response = response

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HeadersFilter:
        opts = Options(options)
        request = Edits.parse(opts.section("request"))
        response = Edits.parse(opts.section("response"))
        opts.done()
        return cls(request, response)

    async def on_request(self, call: Call) -> Continue | Respond:
        self.request.apply(call.headers)
        return CONTINUE

    async def on_response(self, call: Call, response: Response) -> None:
        self.response.apply(response.headers)
