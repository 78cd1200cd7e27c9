"""The protocol-agnostic model every filter sees: Call, Response, Body, Peer.

Knows: what a call is, independent of its wire protocol. Must not: parse
bytes, touch sockets, or decide policy. HTTP/2 streams and (later) Thrift
messages both become a Call; drivers fill it in, filters read and change it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

if TYPE_CHECKING:
    from meshproxy.config import Route

# Ordered, lower-case (name, value) byte pairs, pseudo-headers first. A plain
# list keeps the hot path free of wrapper objects; helpers below do lookups.
Headers = list[tuple[bytes, bytes]]


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of `name` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def set_header(headers: Headers, name: bytes, value: bytes) -> None:
    """Replace every `name` with one `name: value` (appended if absent)."""
    for i, (k, _) in enumerate(headers):
        if k == name:
            headers[i] = (name, value)
            headers[i + 1 :] = [(k2, v2) for k2, v2 in headers[i + 1 :] if k2 != name]
            return
    headers.append((name, value))


def remove_header(headers: Headers, name: bytes) -> None:
    headers[:] = [(k, v) for k, v in headers if k != name]


class Protocol(enum.Enum):
    HTTP2 = "http2"
    GRPC = "grpc"
    THRIFT = "thrift"


class Body(TypingProtocol):
    """A bounded async byte source with back-pressure.

    `read()` returns the next chunk, b"" once the body has ended. Bytes a
    reader got are only handed back to the sender's flow-control window when
    the reader calls `read()` again (or `release()`), i.e. once the previous
    chunk was forwarded: that is what makes a slow reader slow the writer.
    """

    ended: bool
    trailers: Headers | None

    async def read(self) -> bytes: ...

    def release(self) -> None: ...


class EmptyBody:
    """The body of a request or reply that has none (or has ended already)."""

    __slots__ = ("trailers",)
    ended = True

    def __init__(self, trailers: Headers | None = None) -> None:
        self.trailers = trailers

    async def read(self) -> bytes:
        return b""

    def release(self) -> None:
        pass


class BytesBody:
    """A body held whole in memory: local replies and small synthetic calls."""

    __slots__ = ("_data", "ended", "trailers")

    def __init__(self, data: bytes, trailers: Headers | None = None) -> None:
        self._data = data
        self.ended = not data
        self.trailers = trailers

    async def read(self) -> bytes:
        data, self._data = self._data, b""
        self.ended = True
        return data

    def release(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other side of the downstream connection."""

    address: str  # "127.0.0.1:5555" or "unix:/path"; never used as a metric label
    identity: str | None = None  # from the peer's certificate: SPIFFE URI SAN, else DNS SAN, else CN
    security: str = "plaintext"  # plaintext | tls | mutual_tls | shm


ChunkObserver = Callable[["Call", bytes], None]

# The access log's `response_flags`: what acted on a call, beyond its route.
RESPONSE_FLAGS = (
    "retried",  # more than one upstream attempt
    "retry_budget_exhausted",  # a retry was due but the budget (or max_retries) refused it
    "breaker_open",  # an open error breaker answered
    "overflow",  # a cluster concurrency cap answered
    "no_healthy_upstream",  # every endpoint was ejected or failed its health checks
    "ejected",  # the call's endpoint was ejected after it
    "rate_limited",
    "shed",  # the overload filter refused it
    "deadline_passed",  # its deadline had passed before dispatch
    "client_gone",  # its client had gone before dispatch
    "fault",
)


@dataclass(frozen=True, slots=True)
class Completion:
    """How a call ended, for filters that act once it is over (mirroring)."""

    status: int  # HTTP status sent (gRPC: 200), Thrift 200 for a reply; 0 if nothing was sent
    grpc_status: str
    reason: str  # the local reply's reason, "" if the upstream answered
    duration: float
    upstream: str
    trailers: Headers | None = None
    headers: Headers | None = None  # the response headers as sent, :status first; None if none were


CompletionHook = Callable[["Call", Completion], None]


@dataclass(eq=False, slots=True)
class Call:
    id: int
    protocol: Protocol
    peer: Peer
    listener: str
    direction: str
    authority: str
    method: str  # HTTP :method
    path: str  # :path; gRPC "/pkg.Svc/Method"
    headers: Headers  # regular headers only; pseudo-headers live in the fields above
    body: Body
    start: float  # trio time the call started
    deadline: float = math.inf  # absolute trio time; inf if none
    scheme: str = "http"
    request_id: str = ""
    route: Route | None = None
    cluster: str | None = None
    # Only the cluster's endpoints tagged with this unit (unit_routing `subset: true`).
    endpoint_unit: str | None = None
    # Filled in by the proxy for the access log and metrics.
    upstream_address: str = ""
    # Filters that want to see body chunks without buffering them register here.
    request_observers: list[ChunkObserver] = field(default_factory=list)
    response_observers: list[ChunkObserver] = field(default_factory=list)
    # Called once, after the last byte of the call; must not raise or block.
    completion_hooks: list[CompletionHook] = field(default_factory=list)
    # Per-call state of filters, by filter name (e.g. what the mirror filter captured).
    filter_state: dict[str, Any] = field(default_factory=dict)
    # Who called, once authenticated: a verified service ticket's subject, else
    # the mTLS peer identity; None until something vouched for the caller.
    principal: str | None = None
    # Extra access-log fields set by filters (the authz decision, the ticket
    # result); None until the first one, so calls without them allocate nothing.
    log_fields: dict[str, Any] | None = None
    # What acted on the call (RESPONSE_FLAGS), in order, for the access log's
    # `response_flags`; None until the first.
    flags: list[str] | None = None
    # True once the client gave up on the call (reset its stream, closed its
    # connection): a filter that makes calls wait checks it before dispatch.
    client_gone: Callable[[], bool] = lambda: False

    @property
    def is_grpc(self) -> bool:
        return self.protocol is Protocol.GRPC

    def log_field(self, name: str, value: Any) -> None:
        """Add `name: value` (JSON-serialisable) to this call's access-log line."""
        if self.log_fields is None:
            self.log_fields = {}
        self.log_fields[name] = value

    def flag(self, name: str) -> None:
        """Note that `name` (one of RESPONSE_FLAGS) acted on this call."""
        if self.flags is None:
            self.flags = [name]
        elif name not in self.flags:
            self.flags.append(name)


@dataclass(eq=False, slots=True)
class Response:
    status: int
    headers: Headers  # regular headers only; :status is `status`
    body: Body
    trailers: Headers | None = None

