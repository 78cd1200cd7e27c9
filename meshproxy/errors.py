"""Typed failures, each carrying the reply it becomes at the edge.

Knows: which phase failed and what that means for HTTP and gRPC. Must not:
render bytes (drivers do that, once, per protocol).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshproxy import status

if TYPE_CHECKING:
    from meshproxy.config import Fallback


class ProxyError(Exception):
    """Base: a failure that becomes a local reply (or a reset, if the reply started)."""

    http_status = 500
    grpc_status = status.INTERNAL
    reason = "internal"  # bounded metric label value
    flag: str | None = None  # the access log's response_flags entry (call.RESPONSE_FLAGS), if any
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra reply headers (HTTP/2, gRPC)

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.reason)
        self.message = message or self.reason


class NoRoute(ProxyError):
    http_status, grpc_status, reason = 404, status.UNIMPLEMENTED, "no_route"


class Denied(ProxyError):
    http_status, grpc_status, reason = 403, status.PERMISSION_DENIED, "denied"


class RateLimited(ProxyError):
    http_status, grpc_status, reason = 429, status.RESOURCE_EXHAUSTED, "rate_limited"


class UpstreamUnavailable(ProxyError):
    http_status, grpc_status, reason = 503, status.UNAVAILABLE, "upstream_unavailable"


class UpstreamOverflow(ProxyError):
    """Every connection to the cluster is full and the wait queue is too."""

    http_status, grpc_status, reason = 503, status.UNAVAILABLE, "upstream_overflow"
    flag = "overflow"


class BreakerOpen(ProxyError):
    """An error breaker is open: answered without touching the upstream (or with its fallback)."""

    http_status, grpc_status, reason = 503, status.UNAVAILABLE, "breaker_open"
    flag = "breaker_open"

    def __init__(self, message: str = "", fallback: Fallback | None = None) -> None:
        super().__init__(message if fallback is None else fallback.message)
        if fallback is not None:
            self.http_status, self.grpc_status = fallback.status, fallback.grpc_status
            self.headers = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in fallback.headers)


class UpstreamReset(ProxyError):
    http_status, grpc_status, reason = 503, status.UNAVAILABLE, "upstream_reset"

    def __init__(self, message: str = "", error_code: int = 0) -> None:
        super().__init__(message)
        self.error_code = error_code


class UpstreamProtocolError(ProxyError):
    http_status, grpc_status, reason = 502, status.INTERNAL, "upstream_protocol_error"


class UpstreamTimeout(ProxyError):
    http_status, grpc_status, reason = 504, status.DEADLINE_EXCEEDED, "timeout"


class PerTryTimeout(UpstreamTimeout):
    """One attempt's per_try_timeout passed before the upstream answered."""

    reason = "per_try_timeout"
