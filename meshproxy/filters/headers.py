"""`headers`: set, add and remove request and response headers.

    - name: headers
      request: {set: {x-env: prod}, add: {x-via: meshproxy}, remove: [x-debug]}
      response: {set: {x-served-by: meshproxy}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshproxy.call import Call, Headers, Response, remove_header, set_header
from meshproxy.fields import field_problem
from meshproxy.filters.base import CONTINUE, Continue, Filter, Options, Respond


def _pairs(raw: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping of header name to value")
    return _checked(tuple((_name(k), _value(v)) for k, v in raw.items()))


def _names(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list):
        raise ValueError("expected a list of header names")
    return tuple(_name(k) for k in raw)


def _name(raw: Any) -> bytes:
    if not isinstance(raw, str) or not raw.isascii():
        raise ValueError(f"header name must be an ASCII string, got {raw!r}")
    name = raw.lower().encode("ascii")
    problem = field_problem(name, b"trailers")  # a value every name accepts
    if problem:
        raise ValueError(problem)
    return name


def _value(raw: Any) -> bytes:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"header value must be a string, got {raw!r}")
    return str(raw).encode("utf-8")


def _checked(pairs: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    for name, value in pairs:
        problem = field_problem(name, value)
        if problem:
            raise ValueError(problem)
    return pairs


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
