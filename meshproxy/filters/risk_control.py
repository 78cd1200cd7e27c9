"""`risk_control`: ask an external risk service about each call (allow | deny | review).

    - name: risk_control
      cluster: risk                   # an ordinary http2 cluster (pooled, load balanced) of the risk service
      mode: enforce                   # enforce: wait for the verdict | report: send it aside, never wait
      timeout: 50ms                   # per check; enforce mode also stops at the call's own deadline
      failure_mode: allow             # allow | deny: a call whose check failed (timeout, error, guard open)
      protocol: grpc                  # grpc: /meshproxy.risk.v1.RiskService/Check | json: POST of JSON
      path: /v1/risk/check            # json only; the gRPC method is fixed by the .proto
      authority: risk                 # :authority of the checks (default: the cluster name)
      headers: [x-user-id, x-device]  # headers / Thrift metadata sent along (those present)
      body_bytes: 0                   # send the first N bytes of the request body, of what is buffered
      sample: 1.0                     # share of calls checked, 0..1
      unit_header: x-mesh-unit        # the caller's unit when no ticket names one
      cache: {ttl: 10s, max_entries: 10000, key: [principal, path, "header:x-user-id"]}
      report_queue: 1000              # report mode: checks waiting to be sent; full -> dropped, counted
      report_concurrency: 8           # report mode: batches in flight at once
      report_batch: 16                # report mode: checks sent together, as streams of one write (1: one by one)
      report_linger: 10ms             # report mode: how long a sender waits for a batch to fill (0: never)
      guard: {failures: 5, open_for: 10s}

The check (proto/meshproxy/risk/v1/risk.proto) carries the caller (a
verified ticket's subject, else the mTLS identity), the source service and
unit (egress: this node's; ingress: the ticket's, else the unit header and
Kitex ``tt.from_service``), the destination service, method and path, the
protocol, the chosen headers, the body prefix and the request id.

Enforce mode: ``deny`` answers 403 / gRPC PERMISSION_DENIED / a Thrift
TApplicationException; ``allow`` and ``review`` let the call through. The
access log gets ``risk`` (the verdict, or fail_open / fail_closed) and
``risk_reason`` (the service's reason code, or the failure); the reply says
only "denied by risk control". A failed check (timeout, unavailable,
bad_reply, guard_open) applies ``failure_mode``: allow lets the call
through, deny answers 403 like a deny (reason label ``risk_failed``).

Report mode never makes a call wait: the check goes into a bounded queue
(full: dropped and counted) and the call goes on at once; background
senders send the checks and count and log the verdicts. A sender waits up
to ``report_linger`` for ``report_batch`` checks to gather and sends them
together, as streams of one write on one connection, so the checks share
its cost: a check costs the proxy as much CPU as a proxied call's leg, and
in report mode that CPU, not waiting, is what a call would feel. The
senders are trio system tasks started on demand, at most
``report_concurrency`` of them, each ending after ``IDLE_EXIT`` seconds
without work. A filter replaced by a
reload gets no new checks, so its senders finish what is queued (each check
bounded by ``timeout``, the guard dropping the rest if the service is dead)
and end by themselves; at shutdown trio cancels them with the run. A filter
has no nursery of its own to put them in, and a connection's nursery would
tie a check to a caller that has gone.

The guard: after ``failures`` consecutive failures no check is sent for
``open_for``; then one probe goes out (the others still fail at once) and
its result closes or reopens the guard. The verdict cache keeps each verdict
for ``ttl`` under a digest of the chosen key fields (principal,
source_service, source_unit, destination_service, method, path, protocol,
headers, body, header:NAME; by default all of them), at most
``max_entries``. Guard and cache start empty on a reload.

Metrics: ``meshproxy_risk_verdicts_total{listener,mode,verdict}``,
``meshproxy_risk_check_seconds``, ``meshproxy_risk_failures_total{listener,reason}``,
``meshproxy_risk_fail_open_total``, ``meshproxy_risk_fail_closed_total``,
``meshproxy_risk_report_dropped_total``, ``meshproxy_risk_cache_lookups_total{listener,result}``.
docs/risk_control.md has the whole story.
"""

from __future__ import annotations

import collections
import logging
import math
import random
from typing import Any

import trio

from meshproxy import risk, status
from meshproxy.call import BytesBody, Call, Protocol
from meshproxy.filters.base import (
    CONTINUE,
    Continue,
    Filter,
    FilterContext,
    FilterOptionError,
    Options,
    Respond,
    header_name,
    one_of,
    share,
    text,
)
from meshproxy.filters.ratelog import RateLimitedLog
from meshproxy.filters.ticket import destination_service
from meshproxy.values import parse_duration, parse_size

log = logging.getLogger(__name__)

MODES = ("enforce", "report")
FAILURE_MODES = ("allow", "deny")
PROTOCOLS = ("grpc", "json")
DEFAULT_UNIT_HEADER = b"x-mesh-unit"
FROM_SERVICE = b"tt.from_service"  # what Kitex callers name themselves with (TTHeader)
# Bounds of the options: each keeps a per-call cost or a memory use small.
MAX_TIMEOUT = 60.0
MAX_HEADERS = 32
MAX_BODY_BYTES = 1024 * 1024
MAX_CACHE_ENTRIES = 1_000_000
MAX_REPORT_QUEUE = 1_000_000
MAX_REPORT_CONCURRENCY = 256
MAX_REPORT_BATCH = risk.MAX_BATCH
MAX_REPORT_LINGER = 1.0
MAX_GUARD_FAILURES = 1000
# A report sender with nothing to send for this long ends; the next check starts one again.
IDLE_EXIT = 2.0
# Report mode: body prefixes queued or being sent, in bytes at most (the count is report_queue).
MAX_REPORT_QUEUE_BYTES = 16 * 1024 * 1024
# A check the call cut short (its deadline, or the caller leaving) is a timeout, counted against
# the guard and the endpoint's outlier detection if it waited at least this share of `timeout`:
# a service that cannot answer within it, check after check, is as good as down to those calls
# (waiting costs each its whole deadline); a shorter wait says nothing about the service.
CHARGED_SHARE = 0.1

DENIED = Respond(status=403, message="denied by risk control", grpc_status=status.PERMISSION_DENIED,
                 reason="risk_denied")
FAILED = Respond(status=403, message="risk check failed", grpc_status=status.PERMISSION_DENIED,
                 reason="risk_failed")


class _Nop:
    """Stands in for a metric child when the filter is not bound (config checks, unit tests)."""

    def inc(self, n: float = 1) -> None:
        pass

    def observe(self, v: float) -> None:
        pass


_NOP = _Nop()


class RiskControlFilter(Filter):
    name = "risk_control"

    def __init__(
        self,
        cluster: str,
        mode: str = "enforce",
        timeout: float = 0.05,
        failure_mode: str = "allow",
        protocol: str = "grpc",
        path: str = "",
        authority: str = "",
        headers: tuple[bytes, ...] = (),
        body_bytes: int = 0,
        sample: float = 1.0,
        unit_header: bytes = DEFAULT_UNIT_HEADER,
        cache: tuple[float, int, tuple[str, ...]] | None = None,
        report_queue: int = 1000,
        report_concurrency: int = 8,
        guard: tuple[int, float] = (5, 10.0),
        report_batch: int = 16,
        report_linger: float = 0.01,
    ) -> None:
        self.cluster = cluster
        self.mode = mode
        self.report = mode == "report"
        self.may_wait = not self.report
        self.timeout = timeout
        self.failure_mode = failure_mode
        self.protocol = protocol
        self.path = path or (risk.GRPC_PATH if protocol == "grpc" else risk.JSON_PATH)
        self.authority = authority or cluster
        self.headers = frozenset(headers)
        self.body_bytes = body_bytes
        self.sample = sample
        self.unit_header = unit_header
        self.cache = risk.VerdictCache(cache[0], cache[1]) if cache is not None else None
        self.cache_fields = cache[2] if cache is not None else ()
        self.guard = risk.Guard(*guard)
        self.client: risk.RiskClient | None = None
        self.listener = ""
        self.direction = ""
        self.node_service = "meshproxy"
        self.node_unit = ""
        self._random = random.random
        self._log = RateLimitedLog(log)
        self._reporter = (_Reporter(self, report_queue, report_concurrency, report_batch, report_linger)
                          if self.report else None)
        self._verdicts: dict[str, Any] = dict.fromkeys(risk.VERDICTS, _NOP)
        self._failures: dict[str, Any] = dict.fromkeys(risk.FAILURE_REASONS, _NOP)
        self._seconds: Any = _NOP
        self._fail_open: Any = _NOP
        self._fail_closed: Any = _NOP
        self._dropped: Any = _NOP
        self._cache_hit: Any = _NOP
        self._cache_miss: Any = _NOP

    # -- config

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RiskControlFilter:
        o = Options(options)
        cluster = o.get("cluster", text, "")
        mode = o.get("mode", one_of(MODES), "enforce")
        timeout = o.get("timeout", _timeout, 0.05)
        failure_mode = o.get("failure_mode", one_of(FAILURE_MODES), "allow")
        protocol = o.get("protocol", one_of(PROTOCOLS), "grpc")
        path = o.get("path", _path, "")
        authority = o.get("authority", text, "")
        headers: tuple[bytes, ...] = o.get("headers", _header_names, ())
        body_bytes = o.get("body_bytes", _body_bytes, 0)
        sample = o.get("sample", share, 1.0)
        unit_header = o.get("unit_header", header_name, DEFAULT_UNIT_HEADER)
        cache = None
        if "cache" in options:
            c = o.section("cache")
            ttl = c.get("ttl", _positive_duration, 10.0)
            max_entries = c.get("max_entries", _bounded_int(MAX_CACHE_ENTRIES), 10_000)
            key: tuple[str, ...] = c.get("key", _key_fields, risk.KEY_FIELDS)
            c.done()
            for i, field in enumerate(key):
                if field.startswith("header:") and field[7:].encode() not in headers:
                    raise FilterOptionError(f"cache.key[{i}]", f"{field[7:]!r} is not in headers: "
                                                               "only headers sent to the risk service can key it")
            if body_bytes == 0 and "body" in key and "key" in options["cache"]:
                raise FilterOptionError("cache.key", "body is a key field but body_bytes is 0")
            cache = (ttl, max_entries, key)
        report_queue = o.get("report_queue", _bounded_int(MAX_REPORT_QUEUE), 1000)
        report_concurrency = o.get("report_concurrency", _bounded_int(MAX_REPORT_CONCURRENCY), 8)
        report_batch = o.get("report_batch", _bounded_int(MAX_REPORT_BATCH), 16)
        report_linger = o.get("report_linger", _linger, 0.01)
        g = o.section("guard")
        guard = (g.get("failures", _bounded_int(MAX_GUARD_FAILURES), 5), g.get("open_for", _positive_duration, 10.0))
        g.done()
        o.done()
        if not cluster:
            raise FilterOptionError("cluster", "required: the http2 cluster of the risk service")
        if path and protocol == "grpc":
            raise FilterOptionError("path", "only with protocol: json (the gRPC method is fixed by risk.proto)")
        return cls(cluster, mode, timeout, failure_mode, protocol, path, authority, headers, body_bytes, sample,
                   unit_header, cache, report_queue, report_concurrency, guard, report_batch, report_linger)

    def clusters_named(self) -> list[tuple[str, str, str | None]]:
        return [("cluster", self.cluster, "http2")]  # checks are HTTP/2 (gRPC or JSON), whatever the listener

    def bind(self, context: FilterContext) -> None:
        self.listener = context.listener
        self.direction = context.direction
        self.node_service = context.node_service
        self.node_unit = context.node_unit
        if context.clusters is not None:
            self.client = risk.client_for(context.clusters, self.cluster, self.protocol, self.path, self.authority)
        m = context.metrics
        if m is None:
            return
        name = context.listener
        self._verdicts = {v: m.child(m.risk_verdicts, name, self.mode, v) for v in risk.VERDICTS}
        self._failures = {r: m.child(m.risk_failures, name, r) for r in risk.FAILURE_REASONS}
        self._seconds = m.child(m.risk_check_seconds, name)
        self._fail_open = m.child(m.risk_fail_open, name)
        self._fail_closed = m.child(m.risk_fail_closed, name)
        self._dropped = m.child(m.risk_report_dropped, name)
        self._cache_hit = m.child(m.risk_cache_lookups, name, "hit")
        self._cache_miss = m.child(m.risk_cache_lookups, name, "miss")

    # -- per call

    async def on_request(self, call: Call) -> Continue | Respond:
        if self.sample < 1.0 and self._random() >= self.sample:
            return CONTINUE
        request = await self.check_request(call)
        key = None
        if self.cache is not None:
            key = risk.cache_key(request, self.cache_fields)
            cached = self.cache.get(key, trio.current_time())
            if cached is not None:
                self._cache_hit.inc()
                call.log_field("risk_cached", True)
                return self._apply(call, cached)
            self._cache_miss.inc()
        if self._reporter is not None:
            # Report mode: queue the check and go on; nothing above awaited a checkpoint.
            queued = self._reporter.submit(request, key)
            call.log_field("risk", "queued" if queued else "dropped")
            call.log_field("risk_mode", "report")
            return CONTINUE
        now = trio.current_time()
        deadline = min(now + self.timeout, call.deadline)
        try:
            outcome = await self.consult(request, deadline, now + self.timeout * CHARGED_SHARE)
        except trio.Cancelled:
            call.log_field("risk_reason", risk.TIMEOUT)  # as consult counted it
            raise
        if isinstance(outcome, str):
            return self._failed(call, outcome)
        if key is not None and self.cache is not None:
            self.cache.put(key, outcome, trio.current_time())
        return self._apply(call, outcome)

    def _apply(self, call: Call, v: risk.Verdict) -> Continue | Respond:
        self._verdicts[v.verdict].inc()
        call.log_field("risk", v.verdict)
        if v.reason:
            call.log_field("risk_reason", v.reason)
        if self.report:
            call.log_field("risk_mode", "report")
            return CONTINUE
        if v.verdict == risk.DENY:
            # Keyed by the verdict only: reason codes come from the service, unbounded.
            self._log.log(logging.INFO, "deny", "listener %s: risk service denied %s (reason %s)",
                          call.listener, call.path, v.reason or "none")
            return DENIED
        return CONTINUE

    def _failed(self, call: Call, reason: str) -> Continue | Respond:
        call.log_field("risk_reason", reason)
        if self.failure_mode == "deny":
            self._fail_closed.inc()
            call.log_field("risk", "fail_closed")
            return FAILED
        self._fail_open.inc()
        call.log_field("risk", "fail_open")
        return CONTINUE

    async def consult(self, request: risk.CheckRequest, deadline: float, slow_after: float = -math.inf
                      ) -> risk.Verdict | str:
        """Ask the risk service (through the guard): its verdict, or the failure reason.

        A check cancelled (the call's deadline, the caller left) is counted as a
        timeout. A timeout counts towards the guard only if the check was still
        unanswered at `slow_after`: one cut sooner by the call says nothing
        about the risk service.
        """
        client = self.client
        if client is None:
            self._failures[risk.UNAVAILABLE].inc()
            return risk.UNAVAILABLE
        start = trio.current_time()
        admission = self.guard.admit(start)
        if admission == risk.REFUSED:
            self._failures[risk.GUARD_OPEN].inc()
            return risk.GUARD_OPEN
        outcome: risk.Verdict | risk.RiskFailure | None = None
        try:
            try:
                outcome = await client.check(request, deadline, slow_after)
            except risk.RiskFailure as e:
                outcome = e
            except Exception as e:  # a reply no decoder foresaw: a bad reply, never a failed call
                outcome = _unforeseen(e)
        finally:
            if outcome is None:  # cancelled
                end = trio.current_time()
                self._settle(risk.RiskFailure(risk.TIMEOUT), admission, start, end, end >= slow_after)
        return self._settle(outcome, admission, start, trio.current_time(), deadline >= slow_after)

    async def consult_many(self, requests: list[risk.CheckRequest]) -> list[risk.Verdict | str]:
        """consult() for a batch, each bounded by `timeout`: sent together while the guard is closed.

        The guard counts a batch as one attempt, a success if any check got a
        verdict: a failure that hits the whole batch (a timeout, a dead
        service) is one failure, not as many as there were checks. While the
        guard is open the first check goes alone (refused, or the half-open
        probe); the rest go together if that closed the guard, else one by one.
        """
        client = self.client
        if client is None or len(requests) == 1:
            return [await self.consult(r, trio.current_time() + self.timeout) for r in requests]
        first: list[risk.Verdict | str] = []
        if self.guard.is_open:
            first = [await self.consult(requests[0], trio.current_time() + self.timeout)]
            requests = requests[1:]
            if self.guard.is_open or len(requests) == 1:
                return first + [await self.consult(r, trio.current_time() + self.timeout) for r in requests]
        start = trio.current_time()
        try:
            outcomes: list[risk.Verdict | risk.RiskFailure] = await client.check_many(requests, start + self.timeout)
        except Exception as e:
            outcomes = [_unforeseen(e)] * len(requests)
        end = trio.current_time()
        self.guard.record(risk.ADMITTED, any(not isinstance(o, risk.RiskFailure) for o in outcomes), end)
        return first + [self._settle(outcome, None, start, end, True) for outcome in outcomes]

    def _settle(self, outcome: risk.Verdict | risk.RiskFailure, admission: int | None, start: float, end: float,
                charge_timeout: bool) -> risk.Verdict | str:
        """Count a check's outcome (latency, failures; the guard unless `admission` is None, a batch's
        check): its verdict, or the failure reason."""
        self._seconds.observe(end - start)
        if not isinstance(outcome, risk.RiskFailure):
            if admission is not None:
                self.guard.record(admission, True, end)
            return outcome
        reason = outcome.reason
        if admission is not None:
            if charge_timeout or reason != risk.TIMEOUT:
                self.guard.record(admission, False, end)
            else:
                self.guard.abandon(admission)
        self._failures[reason].inc()
        detail = outcome.detail
        self._log.log(logging.WARNING, ("failure", reason), "listener %s: risk check failed: %s%s%s",
                      self.listener, reason, ": " if detail else "", detail)
        return reason

    async def check_request(self, call: Call) -> risk.CheckRequest:
        """What the risk service is told about `call`."""
        wanted = self.headers
        sent: list[tuple[bytes, bytes]] = []
        unit = from_service = None
        unit_header = self.unit_header
        for k, v in call.headers:
            if k in wanted and len(sent) < MAX_HEADERS * 4:  # a name may repeat: the pairs are bounded too
                sent.append((k, v))
            if k == unit_header and unit is None:
                unit = v
            elif k == FROM_SERVICE and from_service is None:
                from_service = v
        if self.direction == "egress":
            # This sidecar's app is the caller.
            source_service = self.node_service
            source_unit = self.node_unit or _text(unit)
        else:
            ticket = call.filter_state.get("ticket")
            source_service = getattr(ticket, "principal", None) or _text(from_service)
            source_unit = getattr(ticket, "unit", None) or _text(unit)  # a signed unit wins over a header
        rpc = call.protocol is not Protocol.HTTP2
        body, truncated = (await self._body_prefix(call)) if self.body_bytes else (b"", False)
        return risk.CheckRequest(
            request_id=call.request_id,
            principal=call.principal or call.peer.identity or "",
            source_service=source_service,
            source_unit=source_unit,
            destination_service=destination_service(call.authority) or self.node_service,
            method=call.path.rpartition("/")[2] if rpc else call.method,
            path=call.path,
            protocol=call.protocol.value,
            headers=tuple(sent),
            body=body,
            body_truncated=truncated,
            listener=self.listener,
            direction=self.direction,
            mode=self.mode,
        )

    async def _body_prefix(self, call: Call) -> tuple[bytes, bool]:
        """The first body_bytes of the request body, of what is here already; never waits for more.

        A Thrift call's body is its whole message (a BytesBody): it is read and put
        back. An HTTP/2 stream's body is peeked at in its receive buffer (the
        stream's ``chunks``), which the proxy forwards untouched afterwards; a
        body not yet received is sent as far as it has come, flagged truncated.
        """
        n = self.body_bytes
        body = call.body
        if isinstance(body, BytesBody):
            data = await body.read()  # no checkpoint: the bytes are in memory
            call.body = BytesBody(data, body.trailers)
            return data[:n], len(data) > n
        chunks = getattr(body, "chunks", None)
        if chunks is None:
            return b"", not body.ended
        parts: list[bytes] = []
        room = n
        more = False
        for chunk, _ in chunks:
            if len(chunk) > room:
                if room:
                    parts.append(chunk[:room])
                more = True
                break
            parts.append(chunk)
            room -= len(chunk)
        return b"".join(parts), more or not body.ended

    async def reports_sent(self) -> None:
        """Wait until every queued report was sent (for tests; shutdown does not need it)."""
        if self._reporter is not None:
            await self._reporter.drained()


class _Reporter:
    """Report mode: a bounded queue of checks and the senders that send them.

    ``submit`` never blocks: a full queue drops the check (counted). Senders are
    trio system tasks, started when a check is queued and neither an idle
    sender nor a gathering one (lingering for its batch to fill) will take it,
    at most ``concurrency``; each ends after ``IDLE_EXIT`` seconds without work
    (see the module docstring for why system tasks). A system task's exception
    would end the whole run, so a sender catches every Exception itself.
    """

    def __init__(self, f: RiskControlFilter, size: int, concurrency: int, batch: int, linger: float) -> None:
        self.filter = f
        self.size = size
        self.concurrency = concurrency
        self.batch = batch
        self.linger = linger
        self.queue: collections.deque[tuple[risk.CheckRequest, bytes | None]] = collections.deque()
        self.senders = 0
        self.gathering = 0  # senders lingering for their batch to fill
        self.held_bytes = 0  # body prefixes queued or in a batch being sent: MAX_REPORT_QUEUE_BYTES bounds them
        self.in_flight = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._full = trio.lowlevel.ParkingLot()  # gathering senders, woken when a batch is full
        self._empty = trio.lowlevel.ParkingLot()

    def submit(self, request: risk.CheckRequest, key: bytes | None) -> bool:
        size = len(request.body)
        if len(self.queue) >= self.size or self.held_bytes + size > MAX_REPORT_QUEUE_BYTES:
            self.filter._dropped.inc()
            return False
        self.queue.append((request, key))
        self.held_bytes += size
        if len(self.queue) <= self.gathering * self.batch:
            if len(self.queue) % self.batch == 0:
                self._full.unpark()  # a batch is full: its sender need not linger on
            return True  # a gathering sender takes it with its batch
        # Wake a parked sender if there is one; else start one (up to the cap).
        if not self._lot.unpark() and self.senders < self.concurrency:
            try:
                trio.lowlevel.spawn_system_task(self._sender,
                                                name=f"risk_control report sender ({self.filter.listener})")
            except RuntimeError:  # the run is ending: the check stays queued and is dropped with it
                return True
            self.senders += 1
        return True

    async def _sender(self) -> None:
        try:
            while True:
                while not self.queue:
                    if not self.in_flight:
                        self._empty.unpark_all()
                    with trio.move_on_after(IDLE_EXIT) as waited:
                        await self._lot.park()
                    if waited.cancelled_caught and not self.queue:
                        return
                if self.linger and len(self.queue) < self.batch:
                    self.gathering += 1
                    try:
                        with trio.move_on_after(self.linger):
                            await self._full.park()
                    finally:
                        self.gathering -= 1
                batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
                if not batch:
                    continue  # another sender took them
                self.in_flight += len(batch)
                try:
                    await self._send(batch)
                except Exception:
                    log.exception("risk_control: a report sender failed")
                finally:
                    self.in_flight -= len(batch)
                    self.held_bytes -= sum(len(request.body) for request, _ in batch)
        finally:
            self.senders -= 1
            if not self.queue and not self.in_flight:
                self._empty.unpark_all()

    async def _send(self, batch: list[tuple[risk.CheckRequest, bytes | None]]) -> None:
        f = self.filter
        outcomes = await f.consult_many([request for request, _ in batch])
        now = trio.current_time()
        for (request, key), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, str):
                continue
            if key is not None and f.cache is not None:
                f.cache.put(key, outcome, now)
            f._verdicts[outcome.verdict].inc()
            if outcome.verdict != risk.ALLOW:
                f._log.log(logging.INFO, ("report", outcome.verdict),
                           "listener %s: report mode: risk service says %s for %s %s (reason %s)",
                           f.listener, outcome.verdict, request.request_id, request.path, outcome.reason or "none")

    async def drained(self) -> None:
        while self.queue or self.in_flight:
            await self._empty.park()


# -- option parsers (each raises ValueError; Options adds the key)


def _timeout(raw: Any) -> float:
    seconds = parse_duration(raw)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"expected a duration above 0s and at most {MAX_TIMEOUT:g}s, got {raw!r}")
    return seconds


def _linger(raw: Any) -> float:
    seconds = parse_duration(raw)
    if not 0 <= seconds <= MAX_REPORT_LINGER:
        raise ValueError(f"expected a duration from 0s to {MAX_REPORT_LINGER:g}s, got {raw!r}")
    return seconds


def _unforeseen(e: Exception) -> risk.RiskFailure:
    """A reply no decoder foresaw: a bad reply, never a failed call."""
    log.debug("risk_control: unexpected error from the risk client", exc_info=True)
    return risk.RiskFailure(risk.BAD_REPLY, type(e).__name__)


def _positive_duration(raw: Any) -> float:
    seconds = parse_duration(raw)
    if seconds <= 0 or math.isinf(seconds):
        raise ValueError(f"expected a duration above 0s, got {raw!r}")
    return seconds


def _bounded_int(maximum: int) -> Any:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= maximum:
            raise ValueError(f"expected a whole number from 1 to {maximum}, got {raw!r}")
        return raw

    return parse


def _body_bytes(raw: Any) -> int:
    n = parse_size(raw)
    if n > MAX_BODY_BYTES:
        raise ValueError(f"at most {MAX_BODY_BYTES} (1MiB), got {raw!r}")
    return n


def _path(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.startswith("/") or any(c in raw for c in " \t\r\n"):
        raise ValueError(f"expected a path starting with '/', got {raw!r}")
    return raw


def _header_names(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("expected a non-empty list of header / metadata names")
    if len(raw) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} names, got {len(raw)}")
    out = []
    for i, name in enumerate(raw):
        try:
            out.append(header_name(name))
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    return tuple(out)


def _key_fields(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("expected a non-empty list of request fields")
    out = []
    for i, field in enumerate(raw):
        if isinstance(field, str) and field.startswith("header:") and len(field) > 7:
            out.append("header:" + field[7:].lower())
        elif field in risk.KEY_FIELDS:
            out.append(field)
        else:
            raise ValueError(f"[{i}]: unknown field {field!r} (known: {', '.join(risk.KEY_FIELDS)}, header:NAME)")
    return tuple(out)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw is not None else ""


__all__ = ["RiskControlFilter"]
