"""YAML -> frozen, typed configuration; every error names its key path.

Knows: the configuration contract (../DESIGN.md, docs/configuration.md).
Must not: start anything. `load()` reads the file once; nothing reads the
YAML again. A second pass checks cross-references (route -> cluster, filter
name -> filter type).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import yaml

from meshproxy.values import (
    Address,
    parse_address,
    parse_duration,
    parse_positive_duration,
    parse_size,
)

T = TypeVar("T")

DIRECTIONS = ("egress", "ingress")
PROTOCOLS = ("http2", "thrift")
LB_POLICIES = ("round_robin", "least_request")


class ConfigError(Exception):
    """One or more problems; `lines` has one 'file: key.path: reason' per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class Node:
    service: str = "meshproxy"
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Admin:
    address: Address = Address("tcp", "127.0.0.1", 15000)


@dataclass(frozen=True, slots=True)
class Shm:
    """Where `shm:NAME` listeners put their unix sockets, and each connection's ring size."""

    directory: str = ""  # "" = $XDG_RUNTIME_DIR/meshproxy, else /tmp/meshproxy-UID
    ring_size: int = 1024 * 1024  # per direction


@dataclass(frozen=True, slots=True)
class MirrorSink:
    type: str = "file"  # file | redis | nats
    directory: str = ""  # file: "" = /tmp/meshproxy-UID/mirror
    segment_bytes: int = 64 * 1024 * 1024
    segment_age: float = 300.0
    retention_bytes: int = 1024 * 1024 * 1024
    fsync: str = "interval"  # always | interval | never
    fsync_interval: float = 1.0
    url: str = ""  # redis://host:port/db, nats://host:port
    stream: str = "meshproxy-mirror"  # redis: the stream key; nats: the JetStream stream ("" = from the subject)
    max_length: int = 1_000_000  # redis: XADD MAXLEN ~
    subject: str = "meshproxy.mirror"  # nats


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """Where mirrored calls go (the mirror filter decides which calls)."""

    sink: MirrorSink = MirrorSink()
    queue_size: int = 10_000
    max_record_bytes: int = 4 * 1024 * 1024
    # 10 ms rather than 50: the writer thread shares the proxy's CPU, and one batch per 50 ms
    # (60 calls at c=1) was a burst that the call in flight waited for (bench/README.md).
    flush_interval: float = 0.01
    shutdown_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: bool = False
    path: str = "stdout"  # "stdout" or a file path


@dataclass(frozen=True, slots=True)
class Http2Listener:
    """Per-connection limits for downstream HTTP/2 (each has a reason in docs)."""

    max_concurrent_streams: int = 256
    max_header_list_size: int = 64 * 1024
    # Per-stream receive window = the most a stream buffers before its sender
    # waits for us to forward it (RFC 9113 6.9): the per-stream buffer bound.
    stream_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    idle_timeout: float = 300.0
    write_timeout: float = 30.0
    keepalive_interval: float = 60.0
    keepalive_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    exact: str | None = None
    prefix: str | None = None
    present: bool | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: str | None = None
    path: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    # Thrift calls: their service and method (the path is "/service/method").
    service: str | None = None
    method: str | None = None


# What a retry may follow (route `retry.retry_on`). HTTP/2 statuses and gRPC
# codes apply to HTTP/2 and gRPC calls; Thrift calls retry connect failures,
# and the others only for methods listed in `idempotent_methods`.
RETRY_ON = (
    "connect-failure", "refused-stream", "reset", "per-try-timeout", "gateway-error", "5xx",
    "unavailable", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Linkerd-style: over `window`, retries <= ratio x first attempts + min_per_second x window."""

    ratio: float = 0.2
    min_per_second: float = 3.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1  # in all, the first one included
    per_try_timeout: float = 0.0  # 0: each try may use what is left of the call's deadline
    retry_on: tuple[str, ...] = ("connect-failure", "refused-stream")
    retry_statuses: tuple[int, ...] = ()  # more HTTP statuses that are retried (e.g. 409)
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget: RetryBudget = RetryBudget()
    # Thrift methods that are safe to send twice ("*": every method).
    idempotent_methods: tuple[str, ...] = ()
    # A request body is kept for a retry up to this size; a longer one is not retried.
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    cluster: str  # "" when the route splits its calls over weighted clusters
    timeout: float = 15.0  # 0 disables; Envoy's default route timeout is 15 s too
    # Run after the listener's filters, for this route's calls only.
    filters: tuple[FilterSpec, ...] = ()
    # Gray release: (cluster, weight) pairs; with sticky_header, a call's share is
    # picked by a hash of that header's value (the same value, the same cluster).
    weighted: tuple[tuple[str, int], ...] = ()
    sticky_header: str = ""
    retry: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class FilterSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


THRIFT_TRANSPORTS = ("framed", "buffered", "header", "ttheader", "auto")
THRIFT_PROTOCOLS = ("binary", "compact", "auto")


@dataclass(frozen=True, slots=True)
class ThriftListener:
    """How downstream Thrift connections are read (each limit has a reason in docs)."""

    transport: str = "auto"  # auto: detected from each connection's first bytes
    protocol: str = "auto"
    # The service of calls that name none (no TTHeader ToService, no "Service:" prefix).
    service: str = ""
    max_frame_size: int = 16 * 1024 * 1024
    max_header_size: int = 64 * 1024
    # Calls in flight per connection; past it the connection is not read.
    max_pending_per_connection: int = 256
    idle_timeout: float = 300.0
    write_timeout: float = 30.0


TLS_LISTENER_MODES = ("disable", "permissive", "strict")
TLS_CLUSTER_MODES = ("disable", "simple", "mutual")
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """strict: TLS only; permissive: TLS or plaintext on one port (told apart by the first bytes)."""

    mode: str = "disable"
    cert: str = ""  # PEM chain, then the key; relative paths are from the config file's directory
    key: str = ""
    ca: str = ""  # set: clients must present a certificate this bundle verifies (mutual TLS)
    min_version: str = "1.2"
    handshake_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ClusterTls:
    mode: str = "disable"  # simple: verify the server; mutual: and present our certificate
    cert: str = ""
    key: str = ""
    ca: str = ""  # "" = the system's trust store
    server_name: str = ""  # SNI and the name verified; "" = the endpoint's host
    peer_identities: tuple[str, ...] = ()  # instead of the name: the server's SPIFFE id / DNS SAN / CN
    min_version: str = "1.2"
    handshake_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    direction: str
    address: Address
    protocol: str = "http2"
    filters: tuple[FilterSpec, ...] = ()
    routes: tuple[Route, ...] = ()
    http2: Http2Listener = Http2Listener()
    thrift: ThriftListener = ThriftListener()
    tls: ListenerTls = ListenerTls()


@dataclass(frozen=True, slots=True)
class Http2Cluster:
    max_connections_per_endpoint: int = 4
    # Calls that may wait for a stream slot when every connection is full.
    max_pending: int = 1024
    stream_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    max_header_list_size: int = 64 * 1024
    write_timeout: float = 30.0
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 10.0
    idle_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class ThriftCluster:
    transport: str = "framed"  # auto: the same framing the caller used
    protocol: str = "auto"  # binary and compact are never translated into each other
    # The upstream answers out of order (matched by seqid), so one connection
    # carries many calls without head-of-line blocking.
    mux: bool = False
    max_connections_per_endpoint: int = 8
    max_requests_per_connection: int = 64
    max_pending: int = 1024
    max_frame_size: int = 16 * 1024 * 1024
    max_header_size: int = 64 * 1024
    write_timeout: float = 30.0
    idle_timeout: float = 300.0


BREAKER_KEYS = ("cluster", "service", "method")


@dataclass(frozen=True, slots=True)
class Fallback:
    """What an open breaker answers instead of 503 / UNAVAILABLE."""

    status: int = 503
    grpc_status: int = 14
    message: str = "circuit breaker open"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Breaker:
    """Concurrency caps for the whole cluster, and error breakers per key.

    A key's breaker opens on `error_ratio` (over `window`, once `min_requests`
    calls were seen), on `consecutive_errors`, or when a `slow_ratio` share of
    calls took longer than `slow_threshold`; 0 turns a trigger off.
    """

    key: str = "cluster"  # cluster | service | method
    error_ratio: float = 0.0
    consecutive_errors: int = 0
    slow_threshold: float = 0.0
    slow_ratio: float = 0.0
    window: float = 10.0
    min_requests: int = 20
    open_for: float = 5.0
    half_open_requests: int = 1  # probes let through once open_for has passed
    max_keys: int = 1000  # breakers kept per cluster (least recently used go first)
    fallback: Fallback | None = None
    # Caps for the whole cluster, 0 for none (Envoy's circuit_breakers thresholds).
    max_connections: int = 0
    max_pending: int = 0
    max_requests: int = 0
    max_retries: int = 0

    @property
    def has_error_triggers(self) -> bool:
        return bool(self.error_ratio or self.consecutive_errors or self.slow_ratio)


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive health: eject an endpoint after consecutive gateway errors or connect failures."""

    consecutive_errors: int = 5
    base_ejection: float = 30.0  # times the number of times it was ejected, up to max_ejection
    max_ejection: float = 300.0
    max_ejected_percent: int = 10


HEALTH_CHECK_TYPES = ("grpc", "http", "thrift")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str  # grpc: grpc.health.v1.Health/Check; http: GET path; thrift: call `method`
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    path: str = "/healthz"  # http
    service: str = ""  # grpc: the service asked about ("" = the server); thrift: "Service:" prefix
    method: str = "ping"  # thrift: a method with no arguments


@dataclass(frozen=True, slots=True)
class DynamicWeights:
    """Endpoint weights follow an EWMA of latency and success; a slow endpoint gets less."""

    decay: float = 10.0  # the EWMA's time constant


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    protocol: str
    endpoints: tuple[Address, ...]
    lb: str = "round_robin"
    connect_timeout: float = 1.0
    http2: Http2Cluster = Http2Cluster()
    thrift: ThriftCluster = ThriftCluster()
    tls: ClusterTls = ClusterTls()
    # The unit each endpoint belongs to ("" for none), in endpoint order: an
    # endpoint given as {address, unit}. unit_routing with `subset: true` uses it.
    endpoint_units: tuple[str, ...] = ()
    breaker: Breaker | None = None
    outlier: Outlier | None = None
    health_check: HealthCheck | None = None
    dynamic_weights: DynamicWeights | None = None


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    node: Node
    admin: Admin
    access_log: AccessLog
    listeners: tuple[Listener, ...]
    clusters: tuple[Cluster, ...]
    drain_timeout: float = 10.0
    shm: Shm = Shm()
    mirror: MirrorConfig = MirrorConfig()
    _clusters_by_name: dict[str, Cluster] = field(default_factory=dict, compare=False, repr=False)

    def cluster(self, name: str) -> Cluster:
        return self._clusters_by_name[name]

    def to_json(self) -> dict[str, Any]:
        """The effective config, defaults filled in (for --check and /config_dump)."""
        raw = asdict(self)
        raw.pop("_clusters_by_name")
        return _jsonable(raw)  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if {"kind", "host", "port", "path"} == set(value):
            return str(Address(**value))
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if (
            value
            and all(isinstance(v, tuple) and len(v) == 2 for v in value)
            and all(isinstance(v[0], str) for v in value)
        ):
            return {k: _jsonable(v) for k, v in value}
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


# ---------------------------------------------------------------------------
# The reader: walks the YAML with a key path and collects problems.


class _Invalid(Exception):
    """Raised to abandon one value; the problem is already recorded."""


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self._path: list[str] = []

    @property
    def path(self) -> str:
        out = ""
        for part in self._path:
            out += part if part.startswith("[") else ("." + part if out else part)
        return out or "(top level)"

    @contextmanager
    def at(self, part: str) -> Iterator[None]:
        self._path.append(part)
        try:
            yield
        finally:
            self._path.pop()

    def problem(self, message: str, part: str | None = None) -> None:
        if part is None:
            self.problems.append(f"{self.source}: {self.path}: {message}")
        else:
            with self.at(part):
                self.problems.append(f"{self.source}: {self.path}: {message}")

    def mapping(
        self, raw: object, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.problem(f"expected a mapping, got {_kind(raw)}")
            raise _Invalid
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                self.problem(f"unknown key (expected one of: {', '.join(allowed)})", str(key))
        for key in required:
            if key not in raw:
                self.problem("required key is missing", key)
        return raw

    def value(self, raw: dict[str, Any], key: str, parse: Callable[[Any], T], default: T) -> T:
        if key not in raw:
            return default
        with self.at(key):
            try:
                return parse(raw[key])
            except ValueError as e:
                self.problem(str(e))
                return default

    def each(self, raw: object, parse: Callable[[int, Any], T]) -> list[tuple[int, T]]:
        """Parse every item of a list; an item that fails is reported and left out."""
        if not isinstance(raw, list):
            self.problem(f"expected a list, got {_kind(raw)}")
            return []
        out: list[tuple[int, T]] = []
        for i, item in enumerate(raw):
            with self.at(f"[{i}]"):
                try:
                    out.append((i, parse(i, item)))
                except _Invalid:
                    pass
        return out


def _kind(raw: object) -> str:
    if raw is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(raw), type(raw).__name__
    )


def _string(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected a non-empty string, got {_kind(raw)}")
    return raw


def _bool(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse


def _positive_int(raw: object) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ValueError(f"expected a whole number of at least 1, got {raw!r}")
    return raw


def _window(raw: object) -> int:
    size = parse_size(raw)
    # RFC 9113 6.9.1: a flow-control window is at most 2^31-1 octets.
    if not 65535 <= size <= 2**31 - 1:
        raise ValueError(f"expected a window from 65535 bytes to 2GiB-1, got {size}")
    return size


def _frame_size(raw: object) -> int:
    size = parse_size(raw)
    # THeader/TTHeader reserve the top bits of the length (0x3FFFFFFF is their maximum).
    if not 1024 <= size <= 0x3FFFFFFF:
        raise ValueError(f"expected a size from 1KiB to 1GiB-1, got {size}")
    return size


def _mirror(r: _Reader, raw: object) -> MirrorConfig:
    m = r.mapping(raw, ("sink", "queue_size", "max_record_bytes", "flush_interval", "shutdown_timeout"))
    sink = MirrorSink(directory=f"/tmp/meshproxy-{os.getuid()}/mirror")
    if "sink" in m:
        with r.at("sink"):
            s = r.mapping(m["sink"], (
                "type", "directory", "segment_bytes", "segment_age", "retention_bytes", "fsync", "fsync_interval",
                "url", "stream", "max_length", "subject",
            ))
            kind = r.value(s, "type", _one_of(("file", "redis", "nats")), "file")
            default_url = {"redis": "redis://127.0.0.1:6379", "nats": "nats://127.0.0.1:4222"}.get(kind, "")
            url = r.value(s, "url", _string, default_url)
            if kind != "file" and not url.startswith(f"{kind}://"):
                r.problem(f"expected a {kind}:// URL, got {url!r}", "url")
            if kind != "file" and importlib.util.find_spec(kind) is None:  # the client package is named as the type
                r.problem(f"needs the Python package {kind!r}: pip install 'meshproxy[{kind}]'", "type")
            for key, used_by in (("url", ("redis", "nats")), ("max_length", ("redis",)), ("subject", ("nats",)),
                                 ("directory", ("file",)), ("stream", ("redis", "nats"))):
                if key in s and kind not in used_by:
                    r.problem(f"only for type: {' or '.join(used_by)}", key)
            sink = MirrorSink(
                type=kind,
                directory=r.value(s, "directory", _absolute_path, sink.directory),
                segment_bytes=r.value(s, "segment_bytes", _at_least_kib, sink.segment_bytes),
                segment_age=r.value(s, "segment_age", parse_positive_duration, sink.segment_age),
                retention_bytes=r.value(s, "retention_bytes", _at_least_kib, sink.retention_bytes),
                fsync=r.value(s, "fsync", _one_of(("always", "interval", "never")), sink.fsync),
                fsync_interval=r.value(s, "fsync_interval", parse_positive_duration, sink.fsync_interval),
                url=url,
                stream=r.value(s, "stream", _string, "" if kind == "nats" else sink.stream),
                max_length=r.value(s, "max_length", _positive_int, sink.max_length),
                subject=r.value(s, "subject", _string, sink.subject),
            )
    d = MirrorConfig()
    return MirrorConfig(
        sink=sink,
        queue_size=r.value(m, "queue_size", _positive_int, d.queue_size),
        max_record_bytes=r.value(m, "max_record_bytes", _at_least_kib, d.max_record_bytes),
        flush_interval=r.value(m, "flush_interval", parse_positive_duration, d.flush_interval),
        shutdown_timeout=r.value(m, "shutdown_timeout", parse_positive_duration, d.shutdown_timeout),
    )


def _at_least_kib(raw: object) -> int:
    size = parse_size(raw)
    if size < 1024:
        raise ValueError(f"expected a size of at least 1KiB, got {size}")
    return size


def _absolute_path(raw: object) -> str:
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise ValueError(f"expected an absolute directory path, got {raw!r}")
    return raw


def _ring_size(raw: object) -> int:
    size = parse_size(raw)
    if size < 64 * 1024 or size > 256 * 1024 * 1024 or size & (size - 1):
        raise ValueError(f"expected a power of two from 64KiB to 256MiB, got {size}")
    return size


# ---------------------------------------------------------------------------
# The sections.

_DATACLASS_PARSERS: dict[str, Callable[[object], Any]] = {
    "max_concurrent_streams": _positive_int,
    "max_connections_per_endpoint": _positive_int,
    "max_pending": _positive_int,
    "max_header_list_size": parse_size,
    "stream_window": _window,
    "connection_window": _window,
    "idle_timeout": parse_positive_duration,
    "write_timeout": parse_positive_duration,
    "keepalive_interval": parse_positive_duration,
    "keepalive_timeout": parse_positive_duration,
    "transport": _one_of(THRIFT_TRANSPORTS),
    "protocol": _one_of(THRIFT_PROTOCOLS),
    "service": _string,
    "max_frame_size": _frame_size,
    "max_header_size": parse_size,
    "max_pending_per_connection": _positive_int,
    "max_requests_per_connection": _positive_int,
    "mux": _bool,
}


def _limits(r: _Reader, raw: object, cls: type[T]) -> T:
    names = tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    m = r.mapping(raw, names)
    default = cls()
    values = {n: r.value(m, n, _DATACLASS_PARSERS[n], getattr(default, n)) for n in names}
    return cls(**values)


def _route(r: _Reader, raw: object, listener: str, index: int, protocol: str) -> Route:
    m = r.mapping(raw, ("name", "match", "cluster", "clusters", "sticky", "timeout", "filters", "retry"),
                  required=("match",))
    name = r.value(m, "name", _string, f"{listener}.{index}")
    cluster = r.value(m, "cluster", _string, "")
    weighted = r.value(m, "clusters", _weighted_clusters, ())
    if "cluster" not in m and "clusters" not in m:
        r.problem("required key is missing (or clusters, with weights)", "cluster")
    elif "cluster" in m and "clusters" in m:
        r.problem("give cluster or clusters (with weights), not both", "cluster")
    sticky = ""
    if "sticky" in m:
        with r.at("sticky"):
            try:
                sm = r.mapping(m["sticky"], ("header",), required=("header",))
                sticky = r.value(sm, "header", lambda v: _string(v).lower(), "")
            except _Invalid:
                pass
        if "clusters" not in m:
            r.problem("only with clusters (weights)", "sticky")
    retry = _section(r, m, "retry", lambda raw: _retry(r, raw, protocol), None)
    extra = {"weighted": weighted, "sticky_header": sticky, "retry": retry}
    timeout = r.value(m, "timeout", parse_duration, 15.0)
    filters: tuple[FilterSpec, ...] = ()
    if "filters" in m:
        with r.at("filters"):
            filters = tuple(f for _, f in r.each(m["filters"], lambda _, f: _filter(r, f)))
    match = RouteMatch()
    if "match" in m:
        with r.at("match"):
            if protocol == "thrift":
                return Route(name, _thrift_match(r, m["match"]), cluster, timeout, filters, **extra)
            mm = r.mapping(m["match"], ("prefix", "path", "headers"))
            prefix = r.value(mm, "prefix", _path_string, None)
            path = r.value(mm, "path", _path_string, None)
            if prefix is not None and path is not None:
                r.problem("give prefix or path, not both")
            headers: list[tuple[int, HeaderMatch]] = []
            if "headers" in mm:
                with r.at("headers"):
                    headers = r.each(mm["headers"], lambda _, h: _header_match(r, h))
            match = RouteMatch(prefix=prefix, path=path, headers=tuple(h for _, h in headers))
    return Route(name=name, match=match, cluster=cluster, timeout=timeout, filters=filters, **extra)


def _retry(r: _Reader, raw: object, protocol: str) -> RetryPolicy:
    m = r.mapping(raw, ("attempts", "per_try_timeout", "retry_on", "retry_statuses", "backoff", "budget",
                        "idempotent_methods", "max_body_bytes"))
    d = RetryPolicy()
    retry_on = r.value(m, "retry_on", _retry_on, d.retry_on)
    if "idempotent_methods" in m and protocol != "thrift":
        r.problem("only for thrift listeners (HTTP/2 and gRPC retry by retry_on)", "idempotent_methods")
    base, cap = d.backoff_base, d.backoff_max
    if "backoff" in m:
        with r.at("backoff"):
            try:
                b = r.mapping(m["backoff"], ("base", "max"))
                base = r.value(b, "base", parse_positive_duration, base)
                cap = r.value(b, "max", parse_positive_duration, max(cap, base))
                if cap < base:
                    r.problem(f"must not be less than base ({base}s)", "max")
            except _Invalid:
                pass
    budget = d.budget
    if "budget" in m:
        with r.at("budget"):
            try:
                b = r.mapping(m["budget"], ("ratio", "min_per_second", "window"))
                budget = RetryBudget(
                    r.value(b, "ratio", _ratio, budget.ratio),
                    r.value(b, "min_per_second", _non_negative_number, budget.min_per_second),
                    r.value(b, "window", parse_positive_duration, budget.window),
                )
            except _Invalid:
                pass
    return RetryPolicy(
        attempts=r.value(m, "attempts", _bounded_int(1, 10), d.attempts),
        per_try_timeout=r.value(m, "per_try_timeout", parse_duration, d.per_try_timeout),
        retry_on=retry_on,
        retry_statuses=r.value(m, "retry_statuses", _http_statuses, ()),
        backoff_base=base,
        backoff_max=cap,
        budget=budget,
        idempotent_methods=r.value(m, "idempotent_methods", _string_tuple, ()),
        max_body_bytes=r.value(m, "max_body_bytes", parse_size, d.max_body_bytes),
    )


def _retry_on(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of conditions ({', '.join(RETRY_ON)})")
    for item in raw:
        if item not in RETRY_ON:
            raise ValueError(f"unknown condition {item!r} (expected: {', '.join(RETRY_ON)})")
    return tuple(raw)


def _http_statuses(raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 400 <= x <= 599
                                            for x in raw):
        raise ValueError("expected a list of HTTP statuses from 400 to 599")
    return tuple(raw)


def _ratio(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {raw!r}")
    return float(raw)


def _non_negative_number(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError(f"expected a number of at least 0, got {raw!r}")
    return float(raw)


def _bounded_int(low: int, high: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {raw!r}")
        return raw

    return parse


def _breaker(r: _Reader, raw: object) -> Breaker:
    names = tuple(n for n in Breaker.__dataclass_fields__ if n not in ("slow_threshold", "slow_ratio"))
    m = r.mapping(raw, (*names, "slow_call"))
    d = Breaker()
    slow_threshold, slow_ratio = d.slow_threshold, d.slow_ratio
    if "slow_call" in m:
        with r.at("slow_call"):
            try:
                sm = r.mapping(m["slow_call"], ("threshold", "ratio"), required=("threshold", "ratio"))
                slow_threshold = r.value(sm, "threshold", parse_positive_duration, 1.0)
                slow_ratio = r.value(sm, "ratio", _ratio, 0.5)
            except _Invalid:
                pass
    fallback = _section(r, m, "fallback", lambda raw: _fallback(r, raw), None)
    cap = _bounded_int(0, 1_000_000)
    return Breaker(
        key=r.value(m, "key", _one_of(BREAKER_KEYS), d.key),
        error_ratio=r.value(m, "error_ratio", _ratio, d.error_ratio),
        consecutive_errors=r.value(m, "consecutive_errors", cap, d.consecutive_errors),
        slow_threshold=slow_threshold,
        slow_ratio=slow_ratio,
        window=r.value(m, "window", parse_positive_duration, d.window),
        min_requests=r.value(m, "min_requests", _positive_int, d.min_requests),
        open_for=r.value(m, "open_for", parse_positive_duration, d.open_for),
        half_open_requests=r.value(m, "half_open_requests", _bounded_int(1, 1000), d.half_open_requests),
        max_keys=r.value(m, "max_keys", _bounded_int(1, 100_000), d.max_keys),
        fallback=fallback,
        max_connections=r.value(m, "max_connections", cap, 0),
        max_pending=r.value(m, "max_pending", cap, 0),
        max_requests=r.value(m, "max_requests", cap, 0),
        max_retries=r.value(m, "max_retries", cap, 0),
    )


def _fallback(r: _Reader, raw: object) -> Fallback:
    m = r.mapping(raw, ("status", "grpc_status", "message", "headers"))
    headers = r.value(m, "headers", _header_pairs, ())
    return Fallback(
        status=r.value(m, "status", _bounded_int(200, 599), 503),
        grpc_status=r.value(m, "grpc_status", _bounded_int(0, 16), 14),
        message=r.value(m, "message", lambda v: v if isinstance(v, str) else _string(v), "circuit breaker open"),
        headers=headers,
    )


def _header_pairs(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in raw.items()):
        raise ValueError("expected a mapping of header names to string values")
    return tuple((k.lower(), v) for k, v in raw.items())


def _outlier(r: _Reader, raw: object) -> Outlier:
    m = r.mapping(raw, tuple(Outlier.__dataclass_fields__))
    d = Outlier()
    base = r.value(m, "base_ejection", parse_positive_duration, d.base_ejection)
    return Outlier(
        consecutive_errors=r.value(m, "consecutive_errors", _positive_int, d.consecutive_errors),
        base_ejection=base,
        max_ejection=r.value(m, "max_ejection", parse_positive_duration, max(d.max_ejection, base)),
        max_ejected_percent=r.value(m, "max_ejected_percent", _bounded_int(0, 100), d.max_ejected_percent),
    )


def _health_check(r: _Reader, raw: object, protocol: str) -> HealthCheck:
    m = r.mapping(raw, tuple(HealthCheck.__dataclass_fields__), required=("type",))
    kind = r.value(m, "type", _one_of(HEALTH_CHECK_TYPES), "thrift" if protocol == "thrift" else "grpc")
    if (kind == "thrift") != (protocol == "thrift"):
        r.problem(f"a {protocol} cluster cannot be checked with type {kind}", "type")
    for key, used_by in (("path", "http"), ("method", "thrift")):
        if key in m and kind != used_by:
            r.problem(f"only for type: {used_by}", key)
    d = HealthCheck(kind)
    check = HealthCheck(
        type=kind,
        interval=r.value(m, "interval", parse_positive_duration, d.interval),
        timeout=r.value(m, "timeout", parse_positive_duration, d.timeout),
        healthy_threshold=r.value(m, "healthy_threshold", _bounded_int(1, 100), d.healthy_threshold),
        unhealthy_threshold=r.value(m, "unhealthy_threshold", _bounded_int(1, 100), d.unhealthy_threshold),
        path=r.value(m, "path", _path_string, d.path),
        service=r.value(m, "service", _string, d.service),
        method=r.value(m, "method", _name_part, d.method),
    )
    if check.timeout > check.interval:
        r.problem(f"must not be longer than interval ({check.interval}s)", "timeout")
    return check


def _dynamic_weights(r: _Reader, raw: object) -> DynamicWeights:
    if raw is True:
        return DynamicWeights()
    m = r.mapping(raw, ("decay",))
    return DynamicWeights(r.value(m, "decay", parse_positive_duration, DynamicWeights().decay))


def _weighted_clusters(raw: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("expected a list of {name, weight}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"name", "weight"}:
            raise ValueError(f"[{i}]: expected {{name: CLUSTER, weight: N}}, got {item!r}")
        weight = item["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise ValueError(f"[{i}]: weight must be a whole number from 0 to 1000000, got {weight!r}")
        out.append((_string(item["name"]), weight))
    if not sum(w for _, w in out):
        raise ValueError("the weights add up to 0")
    if len({n for n, _ in out}) != len(out):
        raise ValueError("a cluster is named twice")
    return tuple(out)


def _thrift_match(r: _Reader, raw: object) -> RouteMatch:
    if raw is None:
        return RouteMatch()  # `match:` with nothing after it matches every call
    mm = r.mapping(raw, ("service", "method", "headers"))
    headers: list[tuple[int, HeaderMatch]] = []
    if "headers" in mm:
        with r.at("headers"):
            headers = r.each(mm["headers"], lambda _, h: _header_match(r, h))
    return RouteMatch(
        headers=tuple(h for _, h in headers),
        service=r.value(mm, "service", _name_part, None),
        method=r.value(mm, "method", _name_part, None),
    )


def _name_part(raw: object) -> str:
    value = _string(raw)
    if "/" in value:
        raise ValueError(f"expected a name without '/', got {raw!r}")
    return value


def _path_string(raw: object) -> str:
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {raw!r}")
    return raw


def _header_match(r: _Reader, raw: object) -> HeaderMatch:
    m = r.mapping(raw, ("name", "exact", "prefix", "present"), required=("name",))
    name = r.value(m, "name", _string, "x").lower()
    exact = r.value(m, "exact", _string, None)
    prefix = r.value(m, "prefix", _string, None)
    present = r.value(m, "present", _bool, None)
    if sum(x is not None for x in (exact, prefix, present)) != 1:
        r.problem("give exactly one of exact, prefix, present")
    return HeaderMatch(name=name, exact=exact, prefix=prefix, present=present)


def _filter(r: _Reader, raw: object) -> FilterSpec:
    if not isinstance(raw, dict):
        r.problem(f"expected a mapping with a name, got {_kind(raw)}")
        raise _Invalid
    if "name" not in raw:
        r.problem("required key is missing", "name")
        raise _Invalid
    name = r.value(raw, "name", _string, "")
    options = tuple((str(k), v) for k, v in raw.items() if k != "name")
    return FilterSpec(name=name, options=options)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A listener with the raw indexes of its routes and filters, for cross-checks."""

    listener: Listener
    route_index: tuple[int, ...]
    filter_index: tuple[int, ...]


def _listener(r: _Reader, raw: object, index: int) -> _Parsed:
    m = r.mapping(
        raw,
        ("name", "direction", "address", "protocol", "filters", "routes", "http2", "thrift", "tls"),
        required=("name", "direction", "address"),
    )
    name = r.value(m, "name", _string, f"listener{index}")
    direction = r.value(m, "direction", _one_of(DIRECTIONS), "egress")
    address = r.value(
        m, "address", lambda v: parse_address(v, allow_port_zero=True), Address("tcp")
    )
    protocol = r.value(m, "protocol", _one_of(PROTOCOLS), "http2")
    filters: list[tuple[int, FilterSpec]] = []
    if "filters" in m:
        with r.at("filters"):
            filters = r.each(m["filters"], lambda _, f: _filter(r, f))
    routes: list[tuple[int, Route]] = []
    if "routes" in m:
        with r.at("routes"):
            routes = r.each(m["routes"], lambda i, route: _route(r, route, name, i, protocol))
    http2 = Http2Listener()
    if "http2" in m:
        with r.at("http2"):
            http2 = _limits(r, m["http2"], Http2Listener)
    thrift = _protocol_section(r, m, protocol, ThriftListener)
    tls = _section(r, m, "tls", lambda raw: _listener_tls(r, raw, protocol), ListenerTls())
    if tls.mode != "disable" and address.kind != "tcp":
        r.problem(f"TLS is for TCP listeners, not {address.kind} ones", "tls")
    listener = Listener(
        name,
        direction,
        address,
        protocol,
        tuple(f for _, f in filters),
        tuple(x for _, x in routes),
        http2,
        thrift,
        tls,
    )
    return _Parsed(listener, tuple(i for i, _ in routes), tuple(i for i, _ in filters))


def _cluster(r: _Reader, raw: object, index: int) -> Cluster:
    m = r.mapping(
        raw,
        ("name", "protocol", "endpoints", "lb", "connect_timeout", "http2", "thrift", "tls", "breaker", "outlier",
         "health_check", "dynamic_weights"),
        required=("name", "endpoints"),
    )
    name = r.value(m, "name", _string, f"cluster{index}")
    protocol = r.value(m, "protocol", _one_of(PROTOCOLS), "http2")
    endpoints: list[Address] = []
    units: list[str] = []
    if "endpoints" in m:
        with r.at("endpoints"):
            raw_eps = m["endpoints"]
            if isinstance(raw_eps, list) and not raw_eps:
                r.problem("a cluster needs at least one endpoint")
            for _, (ep, unit) in r.each(raw_eps, lambda _, v: _tagged_endpoint(r, v)):
                endpoints.append(ep)
                units.append(unit)
    lb = r.value(m, "lb", _one_of(LB_POLICIES), "round_robin")
    connect_timeout = r.value(m, "connect_timeout", parse_positive_duration, 1.0)
    http2 = Http2Cluster()
    if "http2" in m:
        with r.at("http2"):
            http2 = _limits(r, m["http2"], Http2Cluster)
    thrift = _protocol_section(r, m, protocol, ThriftCluster)
    tls = _section(r, m, "tls", lambda raw: _cluster_tls(r, raw, protocol), ClusterTls())
    if (tls.mode != "disable" and not tls.server_name and not tls.peer_identities
            and any(e.kind == "unix" for e in endpoints)):
        r.problem("a unix endpoint has no host name to verify: set server_name or peer_identities", "tls")
    return Cluster(
        name, protocol, tuple(endpoints), lb, connect_timeout, http2, thrift, tls, tuple(units) if any(units) else (),
        breaker=_section(r, m, "breaker", lambda raw: _breaker(r, raw), None),
        outlier=_section(r, m, "outlier", lambda raw: _outlier(r, raw), None),
        health_check=_section(r, m, "health_check", lambda raw: _health_check(r, raw, protocol), None),
        dynamic_weights=_section(r, m, "dynamic_weights", lambda raw: _dynamic_weights(r, raw), None),
    )


def _tls_file(r: _Reader) -> Callable[[object], str]:
    """A certificate/key path: relative ones are from the config file's directory."""

    def parse(raw: object) -> str:
        path = os.path.join(os.path.dirname(r.source), _string(raw))
        if not os.path.isfile(path):
            raise ValueError(f"cannot read {path}: no such file")
        return path

    return parse


def _listener_tls(r: _Reader, raw: object, protocol: str) -> ListenerTls:
    m = r.mapping(raw, ("mode", "cert", "key", "ca", "min_version", "handshake_timeout"), required=("mode",))
    mode = r.value(m, "mode", _one_of(TLS_LISTENER_MODES), "disable")
    if mode == "disable":
        return ListenerTls()
    for key in ("cert", "key"):
        if key not in m:
            r.problem(f"required for mode {mode}", key)
    tls = ListenerTls(
        mode,
        r.value(m, "cert", _tls_file(r), ""),
        r.value(m, "key", _tls_file(r), ""),
        r.value(m, "ca", _tls_file(r), ""),
        r.value(m, "min_version", _tls_version, "1.2"),
        r.value(m, "handshake_timeout", parse_positive_duration, 5.0),
    )
    if tls.cert and tls.key:
        from meshproxy import tls as tls_runtime

        try:
            tls_runtime.server_context(tls.cert, tls.key, tls.ca, tls.min_version, alpn_for(protocol))
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            r.problem(str(e))
    return tls


def _cluster_tls(r: _Reader, raw: object, protocol: str) -> ClusterTls:
    m = r.mapping(raw, ("mode", "cert", "key", "ca", "server_name", "peer_identities", "min_version",
                        "handshake_timeout"), required=("mode",))
    mode = r.value(m, "mode", _one_of(TLS_CLUSTER_MODES), "disable")
    if mode == "disable":
        return ClusterTls()
    if mode == "mutual":
        for key in ("cert", "key"):
            if key not in m:
                r.problem("required for mode mutual", key)
    elif "cert" in m or "key" in m:
        r.problem("a client certificate is only sent in mode mutual", "cert" if "cert" in m else "key")
    tls = ClusterTls(
        mode,
        r.value(m, "cert", _tls_file(r), ""),
        r.value(m, "key", _tls_file(r), ""),
        r.value(m, "ca", _tls_file(r), ""),
        r.value(m, "server_name", _string, ""),
        r.value(m, "peer_identities", _string_tuple, ()),
        r.value(m, "min_version", _tls_version, "1.2"),
        r.value(m, "handshake_timeout", parse_positive_duration, 5.0),
    )
    if mode == "simple" or (tls.cert and tls.key):
        from meshproxy import tls as tls_runtime

        try:
            tls_runtime.client_context(tls.mode, tls.cert, tls.key, tls.ca, tls.min_version, alpn_for(protocol))
        except (OSError, ValueError) as e:
            r.problem(str(e))
    return tls


def alpn_for(protocol: str) -> tuple[str, ...]:
    """ALPN names offered and accepted: h2 for HTTP/2 (RFC 9113 3.2); Thrift has none."""
    return ("h2",) if protocol == "http2" else ()


def _tls_version(raw: object) -> str:
    value = str(raw) if isinstance(raw, int | float | str) and not isinstance(raw, bool) else raw
    if value not in TLS_VERSIONS:
        raise ValueError(f"expected one of {', '.join(TLS_VERSIONS)}, got {raw!r}")
    return str(value)


def _string_tuple(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x for x in raw):
        raise ValueError("expected a non-empty list of strings")
    return tuple(raw)


def _section(r: _Reader, m: dict[str, Any], key: str, parse: Callable[[object], T], default: T) -> T:
    """m[key] parsed under its key path; `default` when absent or invalid (the problem is recorded)."""
    if key not in m:
        return default
    with r.at(key):
        try:
            return parse(m[key])
        except _Invalid:
            return default


def _protocol_section(r: _Reader, m: dict[str, Any], protocol: str, cls: type[T]) -> T:
    if "thrift" not in m:
        return cls()
    if protocol != "thrift":
        r.problem("only for protocol: thrift", "thrift")
        return cls()
    with r.at("thrift"):
        try:
            return _limits(r, m["thrift"], cls)
        except _Invalid:
            return cls()


def _tagged_endpoint(r: _Reader, raw: object) -> tuple[Address, str]:
    """"HOST:PORT", or {address: "HOST:PORT", unit: NAME} for an endpoint of one unit."""
    if not isinstance(raw, dict):
        return _endpoint(r, raw), ""
    m = r.mapping(raw, ("address", "unit"), required=("address",))
    if "address" not in m:
        raise _Invalid
    with r.at("address"):
        address = _endpoint(r, m["address"])
    return address, r.value(m, "unit", _string, "")


def _endpoint(r: _Reader, raw: object) -> Address:
    try:
        address = parse_address(raw)
    except ValueError as e:
        r.problem(str(e))
        raise _Invalid from None
    if address.kind == "shm":
        r.problem("shm: addresses are for listeners (an app connects to them); use tcp or unix here")
        raise _Invalid
    return address


# Builds a filter from its spec (FilterOptionError for bad options); the filter
# says which clusters it names (`clusters_named()`), checked like a route's.
FilterValidator = Callable[[FilterSpec], Any]


def parse(raw: object, source: str, validate_filter: FilterValidator | None = None) -> Config:
    """Build a Config from parsed YAML, or raise ConfigError with every problem."""
    r = _Reader(source)
    try:
        top = r.mapping(
            raw,
            ("node", "admin", "access_log", "listeners", "clusters", "drain_timeout", "shm", "mirror"),
            required=("listeners",),
        )
    except _Invalid:
        raise ConfigError(r.problems) from None
    node, admin, access_log = Node(), Admin(), AccessLog()
    if "node" in top:
        with r.at("node"):
            try:
                m = r.mapping(top["node"], ("service", "unit"))
                node = Node(
                    r.value(m, "service", _string, "meshproxy"), r.value(m, "unit", _string, "")
                )
            except _Invalid:
                pass
    if "admin" in top:
        with r.at("admin"):
            try:
                m = r.mapping(top["admin"], ("address",))
                admin = Admin(
                    r.value(
                        m,
                        "address",
                        lambda v: parse_address(v, allow_port_zero=True),
                        admin.address,
                    )
                )
            except _Invalid:
                pass
    if "access_log" in top:
        with r.at("access_log"):
            try:
                m = r.mapping(top["access_log"], ("enabled", "path"))
                access_log = AccessLog(
                    r.value(m, "enabled", _bool, False), r.value(m, "path", _string, "stdout")
                )
            except _Invalid:
                pass
    drain_timeout = r.value(top, "drain_timeout", parse_duration, 10.0)
    shm = Shm()
    if "shm" in top:
        with r.at("shm"):
            try:
                m = r.mapping(top["shm"], ("directory", "ring_size"))
                shm = Shm(r.value(m, "directory", _absolute_path, ""), r.value(m, "ring_size", _ring_size, shm.ring_size))
            except _Invalid:
                pass

    mirror = MirrorConfig(MirrorSink(directory=f"/tmp/meshproxy-{os.getuid()}/mirror"))
    if "mirror" in top:
        with r.at("mirror"):
            try:
                mirror = _mirror(r, top["mirror"])
            except _Invalid:
                pass
    clusters: list[tuple[int, Cluster]] = []
    if "clusters" in top:
        with r.at("clusters"):
            clusters = r.each(top["clusters"], lambda i, c: _cluster(r, c, i))
    parsed: list[tuple[int, _Parsed]] = []
    if "listeners" in top:
        with r.at("listeners"):
            parsed = r.each(top["listeners"], lambda i, lst: _listener(r, lst, i))

    _cross_check(r, parsed, clusters, validate_filter)
    if r.problems:
        raise ConfigError(r.problems)
    listeners = [p.listener for _, p in parsed]
    clusters_only = [c for _, c in clusters]
    by_name = {c.name: c for c in clusters_only}
    return Config(
        source,
        node,
        admin,
        access_log,
        tuple(listeners),
        tuple(clusters_only),
        drain_timeout,
        shm=shm,
        mirror=mirror,
        _clusters_by_name=by_name,
    )


def _cross_check(
    r: _Reader,
    listeners: list[tuple[int, _Parsed]],
    clusters: list[tuple[int, Cluster]],
    validate_filter: FilterValidator | None,
) -> None:
    known = [c.name for _, c in clusters]
    by_name = {c.name: c for _, c in clusters}
    _duplicates(r, "clusters", [(i, c.name) for i, c in clusters])
    _duplicates(r, "listeners", [(i, p.listener.name) for i, p in listeners])
    seen_addresses: dict[Address, str] = {}
    for li, p in listeners:
        lst = p.listener
        if lst.address.port != 0 or lst.address.kind == "unix":
            other = seen_addresses.setdefault(lst.address, lst.name)
            if other != lst.name:
                r.problem(
                    f"address {lst.address} is also used by listener '{other}'",
                    f"listeners[{li}].address",
                )
        for ri, route in zip(p.route_index, lst.routes, strict=True):
            names = [(f"listeners[{li}].routes[{ri}].cluster", route.cluster)] if route.cluster else [
                (f"listeners[{li}].routes[{ri}].clusters[{i}]", n) for i, (n, _) in enumerate(route.weighted)]
            for key, cluster_name in names:
                _check_route_cluster(r, lst, key, cluster_name, known, by_name)
        if validate_filter is None:
            continue
        specs = [(f"listeners[{li}].filters[{fi}]", spec) for fi, spec in zip(p.filter_index, lst.filters, strict=True)]
        specs += [(f"listeners[{li}].routes[{ri}].filters[{fi}]", spec)
                  for ri, route in zip(p.route_index, lst.routes, strict=True) for fi, spec in enumerate(route.filters)]
        for where, spec in specs:
            try:
                built = validate_filter(spec)
            except FilterOptionError as e:
                r.problem(e.message, where + (f".{e.key}" if e.key else ""))
                continue
            named = getattr(built, "clusters_named", None)
            for key, cluster_name, protocol in named() if named is not None else ():
                _check_route_cluster(r, lst, f"{where}.{key}", cluster_name, known, by_name, protocol)


def _check_route_cluster(r: _Reader, lst: Listener, key: str, cluster_name: str, known: list[str],
                         by_name: dict[str, Cluster], protocol: str | None = None) -> None:
    if cluster_name not in known:
        r.problem(f"unknown cluster '{cluster_name}' (known: {', '.join(known) or 'none'})", key)
        return
    target = by_name[cluster_name]
    if protocol is not None:
        if target.protocol != protocol:
            r.problem(f"cluster '{target.name}' speaks {target.protocol}; this needs {protocol}", key)
    elif target.protocol != lst.protocol:
        r.problem(f"cluster '{target.name}' speaks {target.protocol}, this listener {lst.protocol}", key)
    elif lst.protocol == "thrift" and "auto" not in (lst.thrift.protocol, target.thrift.protocol) \
            and lst.thrift.protocol != target.thrift.protocol:
        r.problem(
            f"cluster '{target.name}' speaks thrift {target.thrift.protocol}, this listener "
            f"{lst.thrift.protocol} (binary and compact are not translated)",
            key,
        )


def _duplicates(r: _Reader, section: str, names: list[tuple[int, str]]) -> None:
    seen: set[str] = set()
    for i, n in names:
        if n in seen:
            r.problem(f"duplicate name '{n}'", f"{section}[{i}].name")
        seen.add(n)


class FilterOptionError(Exception):
    """A filter's options are wrong: `key` is the option (may be empty)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def load(path: str, validate_filter: FilterValidator | None = None) -> Config:
    """Read and parse a config file; ConfigError (one line per problem) on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from None
    if raw is None:
        raise ConfigError([f"{path}: the file is empty"])
    if validate_filter is None:
        from meshproxy.filters import validate_spec

        validate_filter = validate_spec
    return parse(raw, path, validate_filter)
