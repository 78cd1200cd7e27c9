"""`overload`: an adaptive concurrency limit with a priority queue; sheds the least important calls first.

    - name: overload
      priority:
        header: x-priority        # or metadata: NAME (Thrift THeader/TTHeader key; the same lookup)
        default: 5                # 0 (most important) .. 9 (least important)
        routes: {checkout: 1}     # per-route default, by route name
      limit: {initial: 20, min: 1, max: 1000, window: 100ms, min_samples: 10, tolerance: 0.25,
              probe_interval: 30s}
      queue: {max_length: 100, max_wait: 500ms}
      cpu: {max: 0.9, interval: 1s}   # optional: shed by process CPU (share of one core)
      max_qps: 2000                   # optional: shed past this many calls a second
      retry_after: 1s

Knows: trio's clock, the call's priority, deadline and client. Must not: do
I/O, or hold per-call state on `self`. The arithmetic (the limit, the queue,
the triggers) is sans-IO in `meshproxy.overload`; this module reads the
clock and the process's CPU time, waits, and answers.

A call is dropped before dispatch if its client has gone or its deadline has
passed (on arrival, and again when a slot frees up for it). Otherwise it is
shed by a trigger (CPU, QPS), dispatched if the limit allows, or queued:
most important first; when the queue is full a more important call evicts
the least important queued one. A queued call waits at most `max_wait` and
never past its deadline. A dispatched call holds its slot until the
upstream's response head (or its end, if none comes), so a long stream holds
one only until it starts answering.

Replies: shed -> 503 + `retry-after` / gRPC UNAVAILABLE / Thrift
TApplicationException; deadline passed -> 504 / DEADLINE_EXCEEDED; the
access log's response_flags get `shed`, `deadline_passed` or `client_gone`,
and its fields `priority` (and `overload_wait`, seconds, for calls that
queued). Metrics: meshproxy_overload_shed_total{listener,priority,reason},
meshproxy_overload_limit, meshproxy_overload_in_flight,
meshproxy_overload_queue_seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from meshproxy import overload, status
from meshproxy.call import Call, Completion, Response, header_value
from meshproxy.filters.base import (
    CONTINUE,
    Continue,
    Filter,
    FilterContext,
    FilterOptionError,
    Options,
    Respond,
    client_gone,
    header_name,
    positive_number,
    whole_number,
)
from meshproxy.overload import (
    AdaptiveLimit,
    Admission,
    CpuTrigger,
    LimitSettings,
    QpsTrigger,
    Ticket,
    Waiter,
)
from meshproxy.values import parse_duration, parse_positive_duration

STATE_KEY = "overload"  # call.filter_state key of a dispatched call's ticket
DEFAULT_HEADER = b"x-priority"
DEFAULT_PRIORITY = 5


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    header: bytes = DEFAULT_HEADER
    default: int = DEFAULT_PRIORITY
    routes: dict[str, int] = field(default_factory=dict)
    limit: LimitSettings = LimitSettings()
    max_queue: int = 100
    max_wait: float = 0.5
    cpu_max: float | None = None
    cpu_interval: float = 1.0
    max_qps: float | None = None
    retry_after: int = 1


class OverloadFilter(Filter):
    name = "overload"

    may_wait = True  # calls queue for a slot

    def __init__(
        self,
        settings: OverloadSettings | None = None,
        cpu_seconds: Callable[[], float] = time.process_time,
    ) -> None:
        s = self.settings = settings or OverloadSettings()
        self.admission = Admission(AdaptiveLimit(s.limit), s.max_queue, s.max_wait)
        self.cpu = CpuTrigger(s.cpu_max, s.cpu_interval) if s.cpu_max is not None else None
        self.qps = QpsTrigger(s.max_qps) if s.max_qps is not None else None
        self._cpu_seconds = cpu_seconds
        self._retry_after = [(b"retry-after", str(s.retry_after).encode("ascii"))]
        self.listener = ""
        self._metrics: Any = None
        self._shed: dict[tuple[int, str], Any] = {}
        self._limit_gauge: Any = None
        self._in_flight_gauge: Any = None
        self._queue_seconds: Any = None

    # -- config

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> OverloadFilter:
        o = Options(options)
        p = o.section("priority")
        header = p.get("header", header_name, None)
        metadata = p.get("metadata", header_name, None)
        default = p.get("default", _priority, DEFAULT_PRIORITY)
        routes = p.get("routes", _route_priorities, {})
        p.done()
        if header is not None and metadata is not None:
            raise FilterOptionError(
                "priority.metadata", "give one of header or metadata (they name the same lookup)"
            )
        lim = o.section("limit")
        initial = lim.get("initial", whole_number(1), 20)
        least = lim.get("min", whole_number(1), 1)
        most = lim.get("max", whole_number(1), 1000)
        window = lim.get("window", parse_positive_duration, 0.1)
        min_samples = lim.get("min_samples", whole_number(1), 10)
        tolerance = lim.get("tolerance", _tolerance, 0.25)
        probe_interval = lim.get("probe_interval", parse_positive_duration, 30.0)
        lim.done()
        if least > most:
            raise FilterOptionError("limit.min", f"{least} is above limit.max {most}")
        if not least <= initial <= most:
            raise FilterOptionError(
                "limit.initial", f"{initial} is outside limit.min..limit.max ({least}..{most})"
            )
        q = o.section("queue")
        max_queue = q.get("max_length", whole_number(0), 100)
        max_wait = q.get("max_wait", parse_positive_duration, 0.5)
        q.done()
        c = o.section("cpu")
        cpu_max = c.get("max", _cpu_share, None)
        cpu_interval = c.get("interval", parse_positive_duration, 1.0)
        c.done()
        if "cpu" in options and cpu_max is None:
            raise FilterOptionError(
                "cpu.max",
                "required: the process CPU share that means overload (0.9: 90% of one core)",
            )
        max_qps = o.get("max_qps", positive_number("calls per second"), None)
        retry_after = o.get("retry_after", _retry_after, 1)
        o.done()
        return cls(
            OverloadSettings(
                header=header or metadata or DEFAULT_HEADER,
                default=default,
                routes=routes,
                limit=LimitSettings(
                    initial, least, most, window, min_samples, tolerance, probe_interval
                ),
                max_queue=max_queue,
                max_wait=max_wait,
                cpu_max=cpu_max,
                cpu_interval=cpu_interval,
                max_qps=max_qps,
                retry_after=retry_after,
            )
        )

    def bind(self, context: FilterContext) -> None:
        self.listener = context.listener
        m = self._metrics = context.metrics
        if m is None:
            return
        self._limit_gauge = m.child(m.overload_limit, context.listener)
        self._in_flight_gauge = m.child(m.overload_in_flight, context.listener)
        self._queue_seconds = m.child(m.overload_queue_seconds, context.listener)
        self._limit_gauge.set(self.admission.limit.slots)

    # -- per call

    def priority_of(self, call: Call) -> int:
        raw = header_value(call.headers, self.settings.header)
        if raw is not None and raw.isdigit() and 0 < len(raw) <= 3:
            # Past the range is the least important, not an error: a caller cannot gain by it.
            return min(int(raw), overload.LEAST_IMPORTANT)
        if self.settings.routes and call.route is not None:
            p = self.settings.routes.get(call.route.name)
            if p is not None:
                return p
        return self.settings.default

    async def on_request(self, call: Call) -> Continue | Respond:
        now = trio.current_time()
        priority = self.priority_of(call)
        call.log_field("priority", priority)
        if call.client_gone():
            return self._refuse(call, priority, overload.CLIENT_GONE)
        if call.deadline <= now:
            return self._refuse(call, priority, overload.DEADLINE)
        cpu = self.cpu
        if cpu is not None:
            if cpu.due(now):
                cpu.sample(now, self._cpu_seconds())
            if cpu.sheds(priority):
                return self._refuse(call, priority, overload.CPU)
        if self.qps is not None and not self.qps.admit(priority, now):
            return self._refuse(call, priority, overload.QPS)
        got = self.admission.acquire(priority, now, call.deadline, call.client_gone)
        if isinstance(got, Ticket):
            return self._dispatched(call, got)
        if isinstance(got, str):
            return self._refuse(call, priority, got)
        return await self._wait(call, got, now)

    async def _wait(self, call: Call, w: Waiter, now: float) -> Continue | Respond:
        if w.state == overload.QUEUED:
            woken = trio.Event()
            w.wake = woken.set
            done = False
            try:
                with trio.move_on_at(min(now + self.settings.max_wait, call.deadline)):
                    await woken.wait()
                done = True
            finally:
                if not done:  # cancelled (client reset, drain): out of the queue, or the slot back
                    self.admission.abandon(w, trio.current_time())
        if w.state == overload.GRANTED and w.ticket is not None:
            return self._dispatched(call, w.ticket)
        if w.state == overload.QUEUED:  # time is up
            later = trio.current_time()
            self.admission.abandon(w, later)
            reason = overload.DEADLINE if call.deadline <= later else overload.QUEUE_TIMEOUT
            return self._refuse(call, w.priority, reason)
        return self._refuse(call, w.priority, w.reason)

    def _dispatched(self, call: Call, ticket: Ticket) -> Continue:
        call.filter_state[STATE_KEY] = ticket
        call.completion_hooks.append(self._completed)
        if ticket.waited:
            call.log_field("overload_wait", round(ticket.waited, 6))
        if self._queue_seconds is not None:
            self._queue_seconds.observe(ticket.waited)
            self._in_flight_gauge.set(self.admission.in_flight)
        return CONTINUE

    async def on_response(self, call: Call, response: Response) -> None:
        # The upstream has answered: its slot is free now, not when the body ends.
        # A long stream (a gRPC watch, a big download) would otherwise hold a slot
        # for its whole life and feed its length to the limit as queueing delay.
        self._release(call, bool(call.upstream_address))

    def _completed(self, call: Call, done: Completion) -> None:
        self._release(call, bool(done.upstream))

    def _release(self, call: Call, upstream: bool) -> None:
        ticket = call.filter_state.pop(STATE_KEY, None)
        if not isinstance(ticket, Ticket):
            return
        now = trio.current_time()
        # Only calls the upstream answered (or failed to) measure its latency; a
        # later filter's local reply says nothing about the upstream.
        self.admission.release(ticket, now, sample=upstream)
        if self._limit_gauge is not None:
            self._limit_gauge.set(self.admission.limit.slots)
            self._in_flight_gauge.set(self.admission.in_flight)

    def _refuse(self, call: Call, priority: int, reason: str) -> Respond:
        if self._metrics is not None:
            counter = self._shed.get((priority, reason))
            if counter is None:
                m = self._metrics
                counter = self._shed[(priority, reason)] = m.child(
                    m.overload_shed, self.listener, str(priority), reason
                )
            counter.inc()
        if reason == overload.DEADLINE:
            call.flag("deadline_passed")
            return Respond(
                504,
                "deadline passed before dispatch",
                status.DEADLINE_EXCEEDED,
                reason="deadline_passed",
            )
        if reason == overload.CLIENT_GONE:
            return client_gone(call, "client gone before dispatch")
        call.flag("shed")
        return Respond(
            503,
            f"overloaded: shed ({reason})",
            status.UNAVAILABLE,
            list(self._retry_after),
            reason="overload_shed",
        )

    def __repr__(self) -> str:
        return f"<OverloadFilter {self.admission!r} {self.admission.limit!r}>"


# -- option parsers (each raises ValueError; Options adds the key) ----------------------------


def _priority(raw: Any) -> int:
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int)
        or not overload.MOST_IMPORTANT <= raw <= overload.LEAST_IMPORTANT
    ):
        raise ValueError(
            f"expected a priority from {overload.MOST_IMPORTANT} (most important) "
            f"to {overload.LEAST_IMPORTANT} (least), got {raw!r}"
        )
    return raw


def _route_priorities(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping of route name -> priority")
    out: dict[str, int] = {}
    for name, p in raw.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"expected route names, got {name!r}")
        try:
            out[name] = _priority(p)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def _tolerance(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= 10:
        raise ValueError(
            f"expected the tolerated queueing delay as a multiple of the no-load latency, "
            f"above 0 and at most 10, got {raw!r}"
        )
    return float(raw)


def _cpu_share(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= 256:
        raise ValueError(
            f"expected a CPU share above 0 (0.9: 90% of one core; 2: two cores), got {raw!r}"
        )
    return float(raw)


def _retry_after(raw: Any) -> int:
    seconds = parse_duration(raw)
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than 0, got {raw!r}")
    return max(1, math.ceil(seconds))  # retry-after is whole seconds (RFC 9110 10.2.3)
