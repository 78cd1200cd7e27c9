"""Overload protection's arithmetic: an adaptive concurrency limit, a bounded
priority queue in front of it, and the CPU and QPS triggers (sans-IO).

Knows: numbers. Every method takes `now` (seconds on any monotonic clock)
and, for the CPU trigger, the process's CPU seconds; waiters carry a `wake`
callable the driver fills in. Must not: read a clock, sleep, import trio, or
know what a call is. The `overload` filter (meshproxy/filters/overload.py)
is the driver: it reads trio's clock, waits until a waiter is woken or its
time is up, and answers the calls this module sheds.

Priorities run from 0 (most important) to 9 (least important), like `nice`:
a lower number is served first and shed last.

The limit (`AdaptiveLimit`) follows the queueing delay *behind* the filter:
the latency of dispatched calls above the no-load latency, which is the time
they spent waiting in the upstream's queues (its thread pool, its accept
backlog, our connection pool) rather than being served. The filter's own
queue is deliberately not an input: it grows whenever demand exceeds the
limit, and a limit that shrank because its own queue grew would spiral down
and throw capacity away. The filter's queue is bounded by length and by wait
instead, and its state only says whether the limit is binding (calls waited,
so the limit may probe upwards).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PRIORITIES = 10  # 0..9: a bounded set, so `priority` is a safe metric label
MOST_IMPORTANT = 0
LEAST_IMPORTANT = PRIORITIES - 1

# Why a call was refused: the `reason` label of meshproxy_overload_shed.
LIMIT = "limit"  # over the concurrency limit and the queue takes no calls (max_length 0)
QUEUE_FULL = "queue_full"  # the queue was full of calls at least as important (or it was evicted)
QUEUE_TIMEOUT = "queue_timeout"  # waited max_wait without a slot
CPU = "cpu"
QPS = "qps"
DEADLINE = "deadline"  # its deadline passed before dispatch
CLIENT_GONE = "client_gone"  # its client went away before dispatch
REASONS = (LIMIT, QUEUE_FULL, QUEUE_TIMEOUT, CPU, QPS, DEADLINE, CLIENT_GONE)

# A multiplicative decrease never cuts the limit by more than half in one
# window: one window of bad samples (a GC pause) must not empty the pipeline.
MAX_DECREASE = 0.5
# A trigger lets its cutoff back one level only once the signal is this far
# under its maximum, so a signal hovering at the maximum does not flap.
HYSTERESIS = 0.9


# -- the adaptive concurrency limit ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitSettings:
    initial: int = 20
    min: int = 1
    max: int = 1000
    window: float = 0.1  # seconds of samples per adjustment
    min_samples: int = 10  # and at least this many: a mean of two samples is noise
    # Queueing delay up to tolerance x the no-load latency is fine: Envoy's
    # adaptive_concurrency min_rtt buffer defaults to 25% too. Higher keeps the
    # upstream busier through noise; lower keeps latency nearer the no-load one.
    tolerance: float = 0.25
    probe_interval: float = 30.0  # how often the no-load latency is measured again


# While the no-load latency is measured, this many calls at most are in flight
# (Envoy's adaptive_concurrency min_concurrency default): enough to keep a small
# upstream busy, few enough that they do not queue in it.
PROBE_CONCURRENCY = 3
IDLE, DRAINING, MEASURING = "idle", "draining", "measuring"


class AdaptiveLimit:
    """A concurrency limit that follows the queueing delay of dispatched calls.

    `base`, the no-load latency, is measured by a probe, as Envoy's
    adaptive_concurrency measures its minRTT: at start and every
    `probe_interval`, the limit drops to PROBE_CONCURRENCY, calls in flight
    drain to that, and the mean latency of `min_samples` calls dispatched
    after that is the new base. A latency learnt under load would take the
    load's queueing for "no load" and never see it; a probe cannot.

    Between probes, per window (`window` seconds and `min_samples` samples),
    the mean latency of the calls that completed is compared with `base`:

    * queueing delay (mean - base) above `tolerance` x base: the upstream
      is queueing, so shrink in proportion, like Netflix's Gradient:
      limit x max(0.5, (1 + tolerance) x base / mean);
    * otherwise, if the limit was binding (a call waited or was refused for
      it) and the queueing delay is at most half the tolerance, probe
      upwards by sqrt(limit) (at least 1), like Vegas;
    * otherwise hold: an idle limit says nothing about capacity, and one
      whose calls already queue a little behind it is at the upstream's
      knee (probing on from there kept a FIFO upstream's queue one or two
      calls deep, which the most important calls waited in too).

    A window mean under `base` lowers it (the upstream got faster). Window
    *means* rather than single samples, so a workload of fast and slow
    methods does not read its fast calls as the no-load latency.
    """

    __slots__ = (
        "_binding",
        "_measure_from",
        "_n",
        "_probe_at",
        "_probe_slots",
        "_sum",
        "_window_end",
        "base",
        "latency",
        "limit",
        "phase",
        "settings",
    )

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.limit = float(settings.initial)
        self.base = math.inf  # no-load latency, seconds; inf until the first probe ends
        self.latency = 0.0  # the last window's mean latency
        self._window_end: float | None = None
        self._sum = 0.0
        self._n = 0
        self._binding = False
        self._probe_slots = min(settings.max, max(settings.min, PROBE_CONCURRENCY))
        # The first probe starts with nothing in flight: it measures from the first call.
        self.phase = MEASURING
        self._measure_from = -math.inf
        self._probe_at = math.inf

    @property
    def slots(self) -> int:
        """Calls that may be in flight now."""
        if self.phase != IDLE:
            return self._probe_slots
        return max(self.settings.min, int(self.limit))

    def binding(self) -> None:
        """A call could not be dispatched at once: demand exceeds the limit."""
        self._binding = True

    def sample(self, now: float, dispatched_at: float, in_flight: int) -> bool:
        """A dispatched call ended (`in_flight` others remain); True if the limit or base may have moved."""
        latency = now - dispatched_at
        if self.phase == IDLE:
            if now >= self._probe_at:
                self.phase = DRAINING
            else:
                return self._window_sample(now, latency)
        if self.phase == DRAINING:
            if in_flight > self._probe_slots:
                return False
            self.phase = MEASURING
            self._measure_from = now
            self._sum, self._n = 0.0, 0
            return False
        if dispatched_at < self._measure_from:
            return False  # it queued behind the calls dispatched before the probe
        self._sum += latency
        self._n += 1
        if self._n < self.settings.min_samples:
            return False
        self.base = self.latency = self._sum / self._n
        self.phase = IDLE
        self._probe_at = now + self.settings.probe_interval
        self._sum, self._n = 0.0, 0
        self._binding = False
        self._window_end = now + self.settings.window
        return True

    def _window_sample(self, now: float, latency: float) -> bool:
        if self._window_end is None:
            self._window_end = now + self.settings.window
        self._sum += latency
        self._n += 1
        if now < self._window_end or self._n < self.settings.min_samples:
            return False
        s = self.settings
        mean = self._sum / self._n
        self.latency = mean
        if mean < self.base:
            self.base = mean
        queueing = mean - self.base
        if queueing > s.tolerance * self.base:
            gradient = max(MAX_DECREASE, (1.0 + s.tolerance) * self.base / mean)
            self.limit = max(float(s.min), self.limit * gradient)
        elif self._binding and queueing <= s.tolerance * self.base / 2:
            self.limit = min(float(s.max), self.limit + max(1.0, math.sqrt(self.limit)))
        self._sum = 0.0
        self._n = 0
        self._binding = False
        self._window_end = now + s.window
        return True

    def __repr__(self) -> str:
        return (
            f"<AdaptiveLimit {self.limit:.1f} ({self.phase}) base {self.base * 1000:.2f}ms"
            f" last {self.latency * 1000:.2f}ms>"
        )


# -- tickets, waiters and the bounded priority queue -----------------------------------------


class Ticket:
    """One dispatched call's slot; `Admission.release` gives it back.

    A ticket that is garbage-collected unreleased (a call path that ended
    without running completion hooks) is handed back on the admission's next
    move: `__del__` only appends to a deque, which is safe from whichever
    thread the collector runs on; the slot is freed by the trio thread.
    """

    __slots__ = ("_owner", "dispatched_at", "priority", "released", "waited")

    def __init__(
        self, owner: Admission, priority: int, dispatched_at: float, waited: float
    ) -> None:
        self._owner = owner
        self.priority = priority
        self.dispatched_at = dispatched_at
        self.waited = waited
        self.released = False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self._owner._leaked.append(1)


QUEUED, GRANTED, DROPPED, ABANDONED = "queued", "granted", "dropped", "abandoned"


class Waiter:
    """A call waiting in the queue. The admission moves it to GRANTED (with a
    ticket) or DROPPED (with a reason) and calls `wake`; the driver moves it to
    ABANDONED when it stops waiting (timeout, cancellation)."""

    __slots__ = ("deadline", "enqueued", "gone", "priority", "reason", "state", "ticket", "wake")

    def __init__(
        self, priority: int, enqueued: float, deadline: float, gone: Callable[[], bool]
    ) -> None:
        self.priority = priority
        self.enqueued = enqueued
        self.deadline = deadline
        self.gone = gone
        self.state = QUEUED
        self.reason = ""
        self.ticket: Ticket | None = None
        self.wake: Callable[[], None] = _nothing

    def __repr__(self) -> str:
        return f"<Waiter p{self.priority} {self.state}{' ' + self.reason if self.reason else ''}>"


def _nothing() -> None:
    return None


def _never_gone() -> bool:
    return False


class PriorityQueue:
    """At most `max_length` waiters; the most important first, FIFO within a priority.

    One deque per priority: push, pop and evict are O(levels); removing a
    waiter that stopped waiting is O(its level's length), bounded by max_length.
    """

    __slots__ = ("_len", "_levels", "max_length")

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._levels: list[deque[Waiter]] = [deque() for _ in range(PRIORITIES)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def full(self) -> bool:
        return self._len >= self.max_length

    def push(self, w: Waiter) -> None:
        assert self._len < self.max_length, "push past max_length: evict first"
        self._levels[w.priority].append(w)
        self._len += 1

    def pop(self) -> Waiter | None:
        """The most important waiter that has waited longest."""
        for level in self._levels:
            if level:
                self._len -= 1
                return level.popleft()
        return None

    def least_important(self) -> int | None:
        for p in range(LEAST_IMPORTANT, -1, -1):
            if self._levels[p]:
                return p
        return None

    def evict(self, priority: int) -> Waiter:
        """The oldest waiter of `priority`: the one nearest its queue timeout, so the least lost."""
        self._len -= 1
        return self._levels[priority].popleft()

    def remove(self, w: Waiter) -> bool:
        try:
            self._levels[w.priority].remove(w)
        except ValueError:
            return False
        self._len -= 1
        return True

    def counts(self) -> list[int]:
        return [len(level) for level in self._levels]


# -- admission: the limit, in-flight count and queue together ---------------------------------


class Admission:
    """Dispatch or queue or shed each call; give slots back as calls end.

    `acquire` returns a Ticket (dispatch now), a Waiter (queued: the driver
    waits for `wake`), or a shed reason. `release` gives a slot back, feeds the
    limit its latency sample, and grants queued calls, most important first;
    a queued call whose deadline passed or whose client left is dropped there,
    before it takes a slot.
    """

    __slots__ = ("_leaked", "in_flight", "limit", "max_wait", "queue")

    def __init__(self, limit: AdaptiveLimit, max_queue: int, max_wait: float) -> None:
        self.limit = limit
        self.queue = PriorityQueue(max_queue)
        self.max_wait = max_wait
        self.in_flight = 0
        self._leaked: deque[int] = deque()

    def acquire(
        self,
        priority: int,
        now: float,
        deadline: float = math.inf,
        gone: Callable[[], bool] = _never_gone,
    ) -> Ticket | Waiter | str:
        if self._leaked:
            self._reclaim(now)
        if not self.queue and self.in_flight < self.limit.slots:
            self.in_flight += 1
            return Ticket(self, priority, now, 0.0)
        self.limit.binding()
        if self.queue.max_length == 0:
            return LIMIT
        if self.queue.full:
            lowest = self.queue.least_important()
            if lowest is None or lowest <= priority:
                return QUEUE_FULL
            self._drop(self.queue.evict(lowest), QUEUE_FULL)
        w = Waiter(priority, now, deadline, gone)
        self.queue.push(w)
        if self.in_flight < self.limit.slots:
            # Slots are free but others wait (the limit just grew): serve the most important first.
            self._dispatch(now)
        return w

    def release(self, ticket: Ticket, now: float, sample: bool = False) -> None:
        """A dispatched call ended; with `sample` (the upstream answered it) its latency feeds the limit."""
        if ticket.released:
            return
        ticket.released = True
        self.in_flight -= 1
        if sample:
            self.limit.sample(now, ticket.dispatched_at, self.in_flight)
        if self._leaked:
            self._reclaim(now)
        self._dispatch(now)

    def abandon(self, w: Waiter, now: float) -> None:
        """The driver stopped waiting for `w` (timed out, cancelled): take it out, or give its slot back."""
        if w.state == QUEUED:
            self.queue.remove(w)
        elif w.state == GRANTED and w.ticket is not None:
            self.release(w.ticket, now)
        w.state = ABANDONED

    def _reclaim(self, now: float) -> None:
        while self._leaked:
            self._leaked.popleft()
            self.in_flight -= 1
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        slots = self.limit.slots
        while self.in_flight < slots:
            w = self.queue.pop()
            if w is None:
                return
            if w.deadline <= now:
                self._drop(w, DEADLINE)
            elif w.gone():
                self._drop(w, CLIENT_GONE)
            elif now - w.enqueued >= self.max_wait:
                self._drop(w, QUEUE_TIMEOUT)
            else:
                self.in_flight += 1
                w.ticket = Ticket(self, w.priority, now, now - w.enqueued)
                w.state = GRANTED
                w.wake()

    @staticmethod
    def _drop(w: Waiter, reason: str) -> None:
        w.state = DROPPED
        w.reason = reason
        w.wake()

    def __repr__(self) -> str:
        return f"<Admission {self.in_flight}/{self.limit.slots} in flight, {len(self.queue)} queued {self.queue.counts()}>"


# -- triggers ---------------------------------------------------------------------------------


class CpuTrigger:
    """Sheds whole priorities while the process's CPU share is over `max_share`.

    Sampled at most once per `interval` (one subtraction of CPU seconds),
    so its cost does not grow with the call rate. Each sample over the
    maximum sheds one more priority level, least important first; each
    sample under HYSTERESIS x max lets one back. Priority 0 is never shed
    by it: the most important calls are shed only by the queue.
    """

    __slots__ = ("_cpu", "_next", "_t", "cutoff", "interval", "max_share", "share")

    def __init__(self, max_share: float, interval: float) -> None:
        self.max_share = max_share
        self.interval = interval
        self.cutoff = PRIORITIES  # priorities >= cutoff are shed; PRIORITIES sheds none
        self.share = 0.0
        self._t: float | None = None
        self._cpu = 0.0
        self._next = -math.inf

    def due(self, now: float) -> bool:
        return now >= self._next

    def sample(self, now: float, cpu_seconds: float) -> None:
        if self._t is not None and now > self._t:
            self.share = (cpu_seconds - self._cpu) / (now - self._t)
            if self.share > self.max_share:
                self.cutoff = max(MOST_IMPORTANT + 1, self.cutoff - 1)
            elif self.share < HYSTERESIS * self.max_share:
                self.cutoff = min(PRIORITIES, self.cutoff + 1)
        self._t, self._cpu = now, cpu_seconds
        self._next = now + self.interval

    def sheds(self, priority: int) -> bool:
        return priority >= self.cutoff


class QpsTrigger:
    """Admits at most `max_qps` calls a second, the most important first.

    Arrivals and admissions are counted per priority over the last second in
    `slices` buckets (two rings of slices x PRIORITIES counters). A call of
    priority p sees the arrivals of the more important priorities: their
    demand comes first. What is left of the window's budget (max_qps x the
    seconds the window covers) is priority p's, and p's calls are admitted
    while p's admissions in the window are under it. So a priority over its
    share still gets its share, and a burst gets no more than the budget.
    """

    __slots__ = (
        "_admitted",
        "_arrived",
        "_first",
        "_slice",
        "_slice_end",
        "_totals_admitted",
        "_totals_arrived",
        "max_qps",
        "slice_seconds",
        "slices",
    )

    def __init__(self, max_qps: float, slices: int = 10, span: float = 1.0) -> None:
        self.max_qps = max_qps
        self.slices = slices
        self.slice_seconds = span / slices
        self._arrived = [[0] * PRIORITIES for _ in range(slices)]
        self._admitted = [[0] * PRIORITIES for _ in range(slices)]
        self._totals_arrived = [0] * PRIORITIES
        self._totals_admitted = [0] * PRIORITIES
        self._slice = 0
        self._slice_end: float | None = None
        self._first = 0.0

    def _advance(self, now: float) -> None:
        if self._slice_end is None:
            self._first = now
            self._slice_end = now + self.slice_seconds
            return
        if now < self._slice_end:
            return
        passed = int((now - self._slice_end) / self.slice_seconds) + 1
        for _ in range(min(passed, self.slices)):
            self._slice = (self._slice + 1) % self.slices
            for ring, totals in (
                (self._arrived, self._totals_arrived),
                (self._admitted, self._totals_admitted),
            ):
                old = ring[self._slice]
                for p in range(PRIORITIES):
                    totals[p] -= old[p]
                    old[p] = 0
        self._slice_end += passed * self.slice_seconds

    def admit(self, priority: int, now: float) -> bool:
        """Count an arrival of `priority` at `now`; True if it is admitted."""
        self._advance(now)
        assert self._slice_end is not None
        self._arrived[self._slice][priority] += 1
        self._totals_arrived[priority] += 1
        # The seconds the window covers: the full slices behind, the current one so
        # far; less while the trigger is younger than the window; never under a slice.
        covered = (self.slices - 1) * self.slice_seconds + (
            now - (self._slice_end - self.slice_seconds)
        )
        covered = max(self.slice_seconds, min(covered, now - self._first))
        budget = self.max_qps * covered - sum(self._totals_arrived[:priority])
        if self._totals_admitted[priority] + 1 > budget:
            return False
        self._admitted[self._slice][priority] += 1
        self._totals_admitted[priority] += 1
        return True

    def rates(self) -> list[int]:
        """Arrivals per priority in the window."""
        return list(self._totals_arrived)
