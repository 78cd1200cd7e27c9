"""The filter interface and the chain that runs filters in order.

Knows: Call, Response, local replies. Must not: import codecs or drivers, or
do I/O except through clients injected at construction.

A filter is a class with up to three hooks, each optional:

* ``on_request(call)`` returns ``CONTINUE`` or a ``Respond`` (answer locally,
  e.g. deny, shed, fault); it may set ``call.cluster`` to pick the target, or
  change ``call.headers``. It may also raise a ``meshproxy.errors.ProxyError``.
* ``on_response(call, response)`` runs in reverse order once the upstream
  (or a local reply) answered; it may change ``response.headers``.
* body chunks: append a callable to ``call.request_observers`` or
  ``call.response_observers`` in ``on_request`` to see each chunk as it is
  forwarded, without buffering the body.

``from_options(options)`` builds the filter from its config mapping (every
key of the filter's entry but ``name``); it raises ``FilterOptionError`` for a
bad option, which the config loader reports with its key path. When the app
builds a listener's chain it then calls ``bind(context)`` once: a
``FilterContext`` with the listener, the node's service and unit, and the
metrics (filters that count or that speak for the node override it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from meshproxy import status
from meshproxy.call import Call, Headers, Response
from meshproxy.config import FilterOptionError

if TYPE_CHECKING:
    from meshproxy.metrics import Metrics

__all__ = [
    "CONTINUE", "Chain", "Continue", "Filter", "FilterContext", "FilterOptionError", "Options", "Respond",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Continue:
    pass


CONTINUE = Continue()


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the call locally. For gRPC calls the reply is trailers-only with
    ``grpc_status`` (derived from ``status`` when None) and ``message``."""

    status: int
    message: str = ""
    grpc_status: int | None = None
    headers: Headers = field(default_factory=list)
    reason: str = "filter"  # metric label: keep it to a small fixed set per filter


@dataclass(frozen=True, slots=True)
class FilterContext:
    """Where a filter runs: given to ``Filter.bind`` when a listener's chain is built.

    Config validation builds filters without one, so a filter must work unbound
    (no metrics, the default node)."""

    listener: str = ""
    direction: str = ""
    node_service: str = "meshproxy"
    node_unit: str = ""
    metrics: Metrics | None = None
    # The listener's clusters by name (their endpoints' health), for filters that pick one.
    clusters: Mapping[str, Any] | None = None


class Filter:
    """Base class; override the hooks you need (the chain skips the others)."""

    name: ClassVar[str] = ""
    # True for a filter whose on_request may wait (a queue, a callout, a delay):
    # a Thrift connection then runs each call as a task of its own, so one
    # waiting call holds up neither the calls behind it nor noticing a client leave.
    may_wait: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Filter:
        Options(options).done()
        return cls()

    def bind(self, context: FilterContext) -> None:
        """Called once after ``from_options`` when the app builds a listener's chain."""
        return None

    def adopt(self, previous: Filter) -> bool:
        """On a config reload, `previous` is a filter of the same type from the chain
        being replaced. If it is the same filter in substance, take over its
        run-time state (rate limits' buckets) and return True."""
        return False

    async def on_request(self, call: Call) -> Continue | Respond:
        return CONTINUE

    def clusters_named(self) -> list[tuple[str, str, str | None]]:
        """The clusters this filter's options name, for the config's cross-checks:
        (option key, cluster name, the protocol it must speak, or None for the listener's)."""
        return []

    async def on_response(self, call: Call, response: Response) -> None:
        return None


class Options:
    """Reads a filter's options: typed getters, and unknown keys are errors."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw
        self._seen: set[str] = set()

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        self._seen.add(key)
        if key not in self._raw:
            return default
        try:
            return parse(self._raw[key])
        except ValueError as e:
            raise FilterOptionError(key, str(e)) from None

    def section(self, key: str) -> Options:
        self._seen.add(key)
        value = self._raw.get(key, {})
        if not isinstance(value, dict):
            raise FilterOptionError(key, "expected a mapping")
        return _Nested(value, key)

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            expected = ", ".join(sorted(self._seen)) or "none"
            raise FilterOptionError(unknown[0], f"unknown option (expected: {expected})")


# Option parsers shared by the built-in filters (each raises ValueError; Options adds the key).


def flag(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw


def text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected a non-empty string, got {raw!r}")
    return raw


def share(raw: Any) -> float:
    """A sampling share, 0 to 1."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        raise ValueError(f"expected a share from 0 to 1, got {raw!r}")
    return float(raw)


def positive_number(what: str) -> Callable[[Any], float]:
    """A finite number above zero; `what` names it in the error ("calls per second")."""

    def parse(raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0 or not math.isfinite(raw):
            raise ValueError(f"expected {what} greater than 0, got {raw!r}")
        return float(raw)

    return parse


def whole_number(least: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < least:
            raise ValueError(f"expected a whole number >= {least}, got {raw!r}")
        return raw

    return parse


def header_name(raw: Any) -> bytes:
    """A header / Thrift metadata name, lower-cased: ASCII, no whitespace or colon."""
    if not isinstance(raw, str) or not raw or not raw.isascii() or any(c in raw for c in " :\t\r\n"):
        raise ValueError(f"expected a header name, got {raw!r}")
    return raw.lower().encode("ascii")


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse


class _Nested(Options):
    def __init__(self, raw: dict[str, Any], prefix: str) -> None:
        super().__init__(raw)
        self._prefix = prefix

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        try:
            return super().get(key, parse, default)
        except FilterOptionError as e:
            raise FilterOptionError(f"{self._prefix}.{e.key}", e.message) from None

    def done(self) -> None:
        try:
            super().done()
        except FilterOptionError as e:
            raise FilterOptionError(f"{self._prefix}.{e.key}", e.message) from None


def client_gone(call: Call, message: str) -> Respond:
    """The answer to a call whose client left while a filter held it: nobody
    reads it (499, nginx's "client closed request"), but it keeps the call from
    going upstream and is what the access log and Thrift's bookkeeping see."""
    call.flag("client_gone")
    return Respond(499, message, status.CANCELLED, reason="client_gone")


def _overrides(f: Filter, hook: str) -> bool:
    return getattr(type(f), hook) is not getattr(Filter, hook)


class Chain:
    """Runs request hooks in order and response hooks in reverse order.

    Hooks a filter does not override are not called at all, so a chain of
    filters that only look at requests costs nothing on responses.
    """

    __slots__ = ("_request", "_response", "filters", "may_wait")

    def __init__(self, filters: list[Filter]) -> None:
        self.filters = tuple(filters)
        self.may_wait = any(f.may_wait for f in filters)
        self._request = tuple(
            (i, f.on_request) for i, f in enumerate(filters) if _overrides(f, "on_request")
        )
        self._response = tuple(
            (i, f.on_response) for i, f in reversed(list(enumerate(filters)))
            if _overrides(f, "on_response")
        )

    @property
    def has_request_hooks(self) -> bool:
        return bool(self._request)

    @property
    def has_response_hooks(self) -> bool:
        return bool(self._response)

    async def on_request(self, call: Call) -> tuple[Respond | None, int]:
        """Run request hooks; (the local reply or None, how many filters ran)."""
        for i, hook in self._request:
            verdict = await hook(call)
            if verdict is not CONTINUE and isinstance(verdict, Respond):
                return verdict, i + 1
        return None, len(self.filters)

    async def on_response(self, call: Call, response: Response, ran: int) -> None:
        """Response hooks of the filters that saw the request, last first."""
        for i, hook in self._response:
            if i < ran:
                await hook(call, response)

    def __repr__(self) -> str:
        return f"<Chain {[type(f).__name__ for f in self.filters]}>"
