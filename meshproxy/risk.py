"""The risk-control callout's client side: one check over HTTP/2, the guard
that stops calling a dead risk service, and the bounded verdict cache.

Knows: how a CheckRequest reaches the risk service through an ordinary
cluster (pooled connections, the cluster's load balancer) as unary gRPC or
as a JSON POST, and what each failure is called. Must not: decide what a
verdict or a failure does to a call (filters/risk_control.py does).

The wire format is proto/meshproxy/risk/v1/risk.proto (meshproxy/codec/risk.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import trio
from h2.errors import ErrorCodes

from meshproxy import status
from meshproxy.codec import grpc
from meshproxy.codec.risk import (
    ALLOW,
    DENY,
    GRPC_PATH,
    JSON_PATH,
    REVIEW,
    VERDICTS,
    BadReply,
    CheckRequest,
    Verdict,
    decode_verdict,
    decode_verdict_json,
    encode_check,
    encode_check_json,
)
from meshproxy.drivers import unary_h2
from meshproxy.drivers.h2 import ClientLink, Stream, StreamReset
from meshproxy.errors import ProxyError
from meshproxy.upstream.cluster import Cluster
from meshproxy.upstream.pool import EndpointPool

__all__ = [
    "ALLOW",
    "DENY",
    "GRPC_PATH",
    "JSON_PATH",
    "REVIEW",
    "VERDICTS",
    "CheckRequest",
    "Guard",
    "RiskClient",
    "RiskFailure",
    "Verdict",
    "VerdictCache",
    "cache_key",
    "client_for",
]

log = logging.getLogger(__name__)

TIMEOUT, UNAVAILABLE, BAD_REPLY, GUARD_OPEN = "timeout", "unavailable", "bad_reply", "guard_open"
FAILURE_REASONS = (TIMEOUT, UNAVAILABLE, BAD_REPLY, GUARD_OPEN)
# A CheckResponse is a verdict and a short reason; a reply past this is not one,
# and reading it whole would let a broken risk service make us buffer anything.
MAX_REPLY_BYTES = 64 * 1024
# Exchanges (a check, or a report batch) in flight on lean connections, one
# connection each; past this, checks share the cluster's pooled connections
# instead of opening more.
LEAN_MAX_BUSY = 64
# Checks in one check_many on a lean connection at most: its streams in flight.
MAX_BATCH = unary_h2.MAX_IN_FLIGHT
_UNAVAILABLE_HTTP = (429, 502, 503, 504)
_UNAVAILABLE_GRPC = (status.UNAVAILABLE, status.RESOURCE_EXHAUSTED)


class RiskFailure(Exception):
    """No verdict: `reason` is timeout | unavailable | bad_reply (a bounded metric label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RiskClient:
    """Sends CheckRequests to the risk service's cluster, one HTTP/2 stream each.

    To a plaintext endpoint a check, or a batch of them (report mode), goes
    over a lean connection of its own (drivers/unary_h2.py: the checking task
    sends and reads; a batch's checks are streams of one write), picked by
    the cluster's load balancer and counted in its active requests. Through
    the proxy's shared h2 connections (a reader task, a writer task and h2's
    state machine per check) enforce mode added 507 µs beyond the risk
    service at c=1; bench/README.md has what the lean path adds now. TLS
    endpoints, and exchanges past LEAN_MAX_BUSY, use the shared connections.
    """

    def __init__(self, cluster: Cluster, protocol: str, path: str, authority: str) -> None:
        self.cluster = cluster
        self.grpc = protocol == "grpc"
        # Shared connections already told to outlier detection as lost (weak: they go when closed).
        self._lost_links: weakref.WeakSet[ClientLink] = weakref.WeakSet()
        self._head: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        if self.grpc:
            self._head += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        else:
            self._head += [(b"content-type", b"application/json"), (b"accept", b"application/json")]

    async def check(self, request: CheckRequest, deadline: float, slow_after: float = -math.inf) -> Verdict:
        """The risk service's verdict, by the absolute trio time `deadline`; RiskFailure if none.

        A check still unanswered at trio time `slow_after` says its endpoint is slow: if it
        then times out or is cancelled (the caller left), outlier detection hears of it; one
        that ends sooner says nothing about the endpoint.
        """
        (outcome,) = await self._exchange([self._encode(request, deadline)], deadline,  # RiskFailure: raised
                                          slow_after)
        if isinstance(outcome, RiskFailure):
            raise outcome
        return outcome

    async def check_many(self, requests: Sequence[CheckRequest], deadline: float) -> list[Verdict | RiskFailure]:
        """Each check's verdict or RiskFailure, all by `deadline`.

        Over a lean connection the checks go out as streams of one write and
        share its cost (report mode's batches); one that is late or reset
        fails alone. To a TLS endpoint, or past LEAN_MAX_BUSY, they go at once
        over the shared connections, each failing alone too.
        """
        exchanges = [self._encode(r, deadline) for r in requests]
        try:
            return await self._exchange(exchanges, deadline)
        except RiskFailure as e:
            return [e] * len(requests)

    def _encode(self, request: CheckRequest, deadline: float) -> tuple[list[tuple[bytes, bytes]], bytes]:
        if self.grpc:
            body = grpc.frame_message(encode_check(request))
            left = deadline - trio.current_time()
            headers = [*self._head, (b"grpc-timeout", grpc.format_timeout(left))]
        else:
            body = encode_check_json(request)
            headers = [*self._head, (b"content-length", str(len(body)).encode())]
        if request.request_id:
            headers.append((b"x-request-id", request.request_id.encode("latin-1", "replace")))
        return headers, body

    async def _exchange(self, exchanges: list[tuple[list[tuple[bytes, bytes]], bytes]], deadline: float,
                        slow_after: float = -math.inf) -> list[Verdict | RiskFailure]:
        cluster = self.cluster
        charge_timeout = deadline >= slow_after
        n = len(exchanges)
        tried: set[int] = set()
        errors: list[str] = []
        while (i := cluster.pick(tried)) is not None:
            tried.add(i)
            pool = cluster.pools[i]
            if pool.tls is not None or cluster.lean.busy >= LEAN_MAX_BUSY:
                return await self._shared_many(exchanges, deadline, slow_after)
            cluster.stream_started(pool, n)
            try:
                responses = await cluster.lean.exchange_many(pool.address, exchanges, MAX_REPLY_BYTES, deadline)
            except trio.Cancelled:  # the call ended first (its deadline, the caller left)
                if trio.current_time() >= slow_after:
                    self._tell(pool, failed=True)
                raise
            except unary_h2.TimedOut:  # no connection by the deadline
                failure = RiskFailure(TIMEOUT)
            except (OSError, trio.TooSlowError) as e:  # connect failed: the next endpoint
                cluster.guard.connect_failed(pool, trio.current_time())
                errors.append(f"{pool.name}: {e or type(e).__name__}")
                continue
            except unary_h2.Closed as e:  # as a reset stream on the shared path
                failure = RiskFailure(UNAVAILABLE, str(e))
            except unary_h2.ExchangeFailed as e:  # a protocol error
                failure = RiskFailure(BAD_REPLY, str(e))
            else:
                outcomes = [self._outcome(r) for r in responses]
                if cluster.guard.outlier is not None:  # else nothing to build on every check
                    self._tell_outlier(pool, _told(responses, outcomes), charge_timeout)
                return outcomes
            finally:
                cluster.stream_done(pool, n)
            # The connection failed under the whole exchange: one event for outlier detection,
            # no answer (a protocol error too: it is the endpoint's, as a lost connection is).
            if charge_timeout or failure.reason != TIMEOUT:
                self._tell(pool, failed=True)
            raise failure
        raise RiskFailure(UNAVAILABLE, "; ".join(errors) or f"cluster '{cluster.name}' has no endpoint to try")

    def _outcome(self, response: unary_h2.Response) -> Verdict | RiskFailure:
        error = response.error
        if error is not None:
            if isinstance(error, unary_h2.TimedOut):
                return RiskFailure(TIMEOUT)
            reason = BAD_REPLY if isinstance(error, unary_h2.ReplyTooLong | unary_h2.MalformedReply) else UNAVAILABLE
            return RiskFailure(reason, str(error))
        assert response.head is not None
        try:
            return self._verdict(response.head, response.trailers, bytes(response.data))
        except RiskFailure as e:
            return e

    def _tell_outlier(self, pool: EndpointPool, outcomes: Sequence[Verdict | RiskFailure],
                      charge_timeout: bool) -> None:
        """Tell the cluster's outlier detection how checks on `pool` went: an answer (a verdict, a
        bad reply) resets its count, no answer (a reset, an unavailable status, a timeout if
        `charge_timeout`: the check was still unanswered at its slow_after) adds to it."""
        if self.cluster.guard.outlier is None:
            return
        for outcome in outcomes:
            if not isinstance(outcome, RiskFailure):
                self._tell(pool, failed=False)
            elif outcome.reason != TIMEOUT:
                self._tell(pool, failed=outcome.reason == UNAVAILABLE)
            elif charge_timeout:
                self._tell(pool, failed=True)

    def _tell(self, pool: EndpointPool, failed: bool) -> None:
        guard = self.cluster.guard
        if guard.outlier is not None:
            guard.checked(pool, trio.current_time(), failed)

    async def _shared_many(self, exchanges: list[tuple[list[tuple[bytes, bytes]], bytes]], deadline: float,
                           slow_after: float) -> list[Verdict | RiskFailure]:
        results: list[Verdict | RiskFailure] = [RiskFailure(TIMEOUT)] * len(exchanges)  # unless it ends first

        async def one(i: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
            for again in (False, True):
                try:
                    results[i] = await self._shared_exchange(headers, body, deadline, slow_after)
                    return
                except ProxyError as e:  # no endpoint took the stream (down, overflow)
                    results[i] = RiskFailure(UNAVAILABLE, e.message)
                    return
                except StreamReset as e:  # refused (not processed), or from open_stream: a connection that
                    if e.code != ErrorCodes.REFUSED_STREAM or again:  # cannot take a stream any more
                        results[i] = RiskFailure(UNAVAILABLE, str(e))
                        return
                    # else sent once more, as the lean path does

        with trio.move_on_at(deadline):
            if len(exchanges) == 1:
                await one(0, *exchanges[0])
            else:
                async with trio.open_nursery() as nursery:
                    for i, (headers, body) in enumerate(exchanges):
                        nursery.start_soon(one, i, headers, body)
        return results

    async def _shared_exchange(self, headers: list[tuple[bytes, bytes]], body: bytes, deadline: float,
                               slow_after: float) -> Verdict | RiskFailure:
        """One check on the shared connections. A refused stream's StreamReset is raised (it was not
        processed: it tells outlier detection nothing); a connection lost under several checks is
        told once, by the first of them, as the lean path tells a connection lost under a batch."""
        cluster = self.cluster
        pool, link, stream = await cluster.open_stream(headers, False)
        outcome: Verdict | RiskFailure | None = None
        tell = True
        try:
            outcome = await self._shared_reply(link, stream, body)
            return outcome
        except StreamReset as e:
            if e.code == ErrorCodes.REFUSED_STREAM:
                tell = False
                raise
            outcome = RiskFailure(UNAVAILABLE, str(e))
            if e.code == ErrorCodes.CONNECT_ERROR:  # the connection went (drivers/h2.py)
                tell = link not in self._lost_links
                self._lost_links.add(link)
            return outcome
        finally:
            if tell and outcome is not None:
                self._tell_outlier(pool, [outcome], deadline >= slow_after)
            elif tell and trio.current_time() >= slow_after:  # cancelled (the deadline, the caller left) when slow
                self._tell(pool, failed=True)
            # As the proxy does with its upstream streams: a finished stream is
            # forgotten, an unfinished one (timeout, bad reply) reset.
            if stream.done:
                link.forget(stream)
            else:
                link.reset(stream, ErrorCodes.CANCEL)
            cluster.stream_done(pool)

    async def _shared_reply(self, link: ClientLink, stream: Stream, body: bytes) -> Verdict | RiskFailure:
        await link.send_data(stream, body, True)
        head = await stream.wait_head()
        data = bytearray()
        while chunk := await stream.read():
            data += chunk
            if len(data) > MAX_REPLY_BYTES:
                return RiskFailure(BAD_REPLY, f"reply longer than {MAX_REPLY_BYTES} bytes")
        stream.release()
        try:
            return self._verdict(head, stream.trailers, bytes(data))
        except RiskFailure as e:
            return e

    def _verdict(self, head: list[tuple[bytes, bytes]], trailers: list[tuple[bytes, bytes]] | None,
                 data: bytes) -> Verdict:
        # :status is the only response pseudo-header, and pseudo-headers come first (RFC 9113 8.3).
        status_text = head[0][1] if head and head[0][0] == b":status" else b"0"
        if status_text != b"200":
            http_status = int(status_text) if status_text.isdigit() else 0
            reason = UNAVAILABLE if http_status in _UNAVAILABLE_HTTP else BAD_REPLY
            raise RiskFailure(reason, f"HTTP status {http_status}")
        try:
            if not self.grpc:
                return decode_verdict_json(data)
            fields = dict(head)
            # Trailers-only replies (errors) carry grpc-status in the head.
            code_text = dict(trailers).get(b"grpc-status") if trailers else fields.get(b"grpc-status")
            code = int(code_text) if code_text is not None and code_text.isdigit() else -1
            if code != status.OK:
                message = grpc.decode_message(
                    (dict(trailers) if trailers else fields).get(b"grpc-message", b""))
                if code == status.DEADLINE_EXCEEDED:
                    raise RiskFailure(TIMEOUT, f"grpc-status {code} {message}")
                reason = UNAVAILABLE if code in _UNAVAILABLE_GRPC else BAD_REPLY
                raise RiskFailure(reason, f"grpc-status {code} {message}".rstrip())
            if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
                raise BadReply("expected one uncompressed gRPC message")
            return decode_verdict(data[5:])
        except BadReply as e:
            raise RiskFailure(BAD_REPLY, str(e)) from None


def _told(responses: list[unary_h2.Response], outcomes: list[Verdict | RiskFailure]) -> list[Verdict | RiskFailure]:
    """What outlier detection hears of a lean exchange: a connection lost under a batch is one
    event, not one per check it failed, and so is a failed connect to send refused checks again;
    refused checks were not processed, so they say nothing."""
    told = [o for r, o in zip(responses, outcomes, strict=True)
            if not isinstance(r.error, unary_h2.Closed | unary_h2.StreamRefused)]
    for lost in (unary_h2.Closed, unary_h2.NotReconnected):
        if any(isinstance(r.error, lost) for r in responses):
            told.append(RiskFailure(UNAVAILABLE))
    return told


def client_for(clusters: Any, name: str, protocol: str, path: str, authority: str) -> RiskClient | None:
    """The client for cluster `name` of a listener's clusters, or None (logged) if it cannot be one."""
    cluster = clusters.get(name) if clusters is not None else None
    if not isinstance(cluster, Cluster):
        what = "is not defined" if cluster is None else "is not an http2 cluster"
        log.error("risk_control: cluster %r %s: every check fails as unavailable", name, what)
        return None
    return RiskClient(cluster, protocol, path, authority)


# -- the guard -------------------------------------------------------------------

REFUSED, ADMITTED, PROBE = 0, 1, 2


class Guard:
    """A circuit breaker in front of the risk service.

    Closed: every check goes out. After `failures` consecutive failures it is
    open for `open_for` seconds: no check goes out (the caller applies its
    failure mode at once). Then exactly one check goes out as a probe while
    the others are still refused; its success closes the guard, its failure
    opens it for another `open_for`. So a dead risk service costs at most one
    timeout per interval, not one per call. The clock is passed in.
    """

    __slots__ = ("_failures", "_open_until", "_probing", "failures", "open_for")

    def __init__(self, failures: int, open_for: float) -> None:
        self.failures = failures
        self.open_for = open_for
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self.failures

    def admit(self, now: float) -> int:
        """REFUSED, ADMITTED, or PROBE (the one check of a half-open guard)."""
        if self._failures < self.failures:
            return ADMITTED
        if now < self._open_until or self._probing:
            return REFUSED
        self._probing = True
        return PROBE

    def record(self, admission: int, ok: bool, now: float) -> None:
        if admission == PROBE:
            self._probing = False
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self.failures:
            self._open_until = now + self.open_for

    def abandon(self, admission: int) -> None:
        """An admitted check ended with no outcome (cancelled): a probe may go again."""
        if admission == PROBE:
            self._probing = False


# -- the verdict cache -------------------------------------------------------------


class VerdictCache:
    """Verdicts by key, each for `ttl` seconds, at most `max_entries` of them.

    One TTL for all and a refreshed entry moved to the end keep the dict in
    expiry order: the first entry is the oldest, so eviction and the purge of
    expired entries are O(1) each. Keys are 16-byte digests (cache_key), so
    an entry's size does not depend on the headers or body it stands for.
    """

    __slots__ = ("_entries", "max_entries", "ttl")

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Verdict]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: bytes, verdict: Verdict, now: float) -> None:
        entries = self._entries
        entries.pop(key, None)
        while entries:
            first = next(iter(entries))
            if len(entries) < self.max_entries and entries[first][0] > now:
                break
            del entries[first]  # the oldest: expired, or evicted to make room
        entries[key] = (now + self.ttl, verdict)


# The request fields a cache key may be made of; "header:NAME" picks one header.
KEY_FIELDS = ("principal", "source_service", "source_unit", "destination_service", "method", "path", "protocol",
              "headers", "body")


def cache_key(request: CheckRequest, fields: Sequence[str]) -> bytes:
    """A digest of the chosen fields of `request`, each length-prefixed so no two
    different requests share the bytes that are hashed."""
    h = hashlib.blake2b(digest_size=16)

    def add(data: bytes) -> None:
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)

    for name in fields:
        if name == "headers" or name.startswith("header:"):
            wanted = name[7:].encode() if name != "headers" else None
            pairs = [(k, v) for k, v in request.headers if wanted is None or k == wanted]
            add(len(pairs).to_bytes(4, "big"))
            for k, v in pairs:
                add(k)
                add(v)
        elif name == "body":
            add(request.body)
        else:
            add(str(getattr(request, name)).encode())
    return h.digest()
