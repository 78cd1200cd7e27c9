"""One call's upstream attempts under its route's retry policy (HTTP/2, gRPC, Thrift).

Knows: the policy's caps (attempts, the budget, the cluster's max_retries,
the call's deadline, the buffered body's bound), backoff sleeps, and the
retry metrics and flags. Must not: send or read anything; the proxies make
the attempts and ask here whether to make another (retry.py decides which
failures qualify).
"""

from __future__ import annotations

import math
import random

import trio

from meshproxy import retry
from meshproxy.call import Call
from meshproxy.config import RetryPolicy, Route
from meshproxy.errors import BreakerOpen, UpstreamOverflow
from meshproxy.metrics import Metrics
from meshproxy.upstream.guard import Admission, Guard


class Tape:
    """A streamed request body as it was sent, so a retry can send it again;
    past `limit` bytes it is dropped and the call is no longer retried."""

    __slots__ = ("chunks", "limit", "overflow", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.size = 0
        self.overflow = False

    def drop(self) -> None:
        """No retry is possible any more (the response began): stop keeping the body."""
        self.overflow = True
        self.chunks.clear()

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.chunks.clear()
        else:
            self.chunks.append(chunk)


class Budgets:
    """Each route's retry budget, shared by its calls and kept across reloads
    that keep the route's name and budget."""

    def __init__(self, max_routes: int = 4096) -> None:
        self._budgets: dict[tuple[str, object], retry.Budget] = {}
        self._max = max_routes

    def for_route(self, route: Route) -> retry.Budget:
        assert route.retry is not None
        key = (route.name, route.retry.budget)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self._max:
                self._budgets.clear()  # routes renamed by many reloads: start the windows again
            budget = self._budgets[key] = retry.Budget(route.retry.budget)
        return budget


class Retrying:
    __slots__ = ("attempt", "budget", "call", "cluster", "guard", "metrics", "policy", "reserved", "rng", "scope",
                 "tape", "thrift_method", "try_deadline")

    def __init__(self, call: Call, cluster: str, guard: Guard, policy: RetryPolicy, budget: retry.Budget,
                 metrics: Metrics, rng: random.Random, tape: Tape | None = None,
                 thrift_method: str | None = None) -> None:
        self.call = call
        self.cluster = cluster
        self.guard = guard
        self.policy = policy
        self.budget = budget
        self.metrics = metrics
        self.rng = rng
        self.tape = tape
        self.thrift_method = thrift_method  # a Thrift call: only idempotent methods retry more than connects
        self.attempt = 1
        self.try_deadline = math.inf
        self.scope: trio.CancelScope | None = None  # what waits for the attempt's answer
        self.reserved = False  # a retry slot of the cluster's max_retries, held until the retry is admitted
        budget.request(trio.current_time())

    def start(self, now: float) -> None:
        """The attempt's per-try timeout starts at `now` (math.inf: not yet)."""
        t = self.policy.per_try_timeout
        self.try_deadline = now + t if t > 0 else math.inf
        if self.scope is not None:
            self.scope.deadline = self.try_deadline

    def admit(self, guard: Guard, path: str, now: float) -> Admission | None:
        """The guard's admission of this attempt. A retry it refuses (breaker open,
        overflow) was never sent: its retry slot and its budget go back."""
        retry_slot, self.reserved = self.reserved, False  # the admission owns the slot from here
        try:
            return guard.admit(path, now, retry_slot)
        except (BreakerOpen, UpstreamOverflow):
            if retry_slot:
                self.budget.refund(now)
            raise

    def finish(self) -> None:
        """The call is over: a retry slot that was never used goes back."""
        if self.reserved:
            self.reserved = False
            self.guard.release_retry()

    def failure_delay(self, kind: str) -> float | None:
        """The backoff before sending again after a local failure of `kind`
        (retry.CONNECT_FAILURE, ...), or None if the call is not sent again."""
        condition = retry.failure_condition(self.policy, kind)
        if condition is None:
            return None
        if self.thrift_method is not None and not retry.thrift_may_retry(self.policy, kind, self.thrift_method):
            self._refused("not_idempotent")
            return None
        return self.decide(condition)

    async def again(self, kind: str) -> bool:
        """After a local failure of `kind`: wait the backoff and return True if
        the call is to be sent again."""
        delay = self.failure_delay(kind)
        if delay is None:
            return False
        await trio.sleep(delay)
        return True

    def decide(self, condition: str) -> float | None:
        """The backoff before the next attempt after a failure meeting
        `condition`, or None if no attempt is made (each refusal counted)."""
        call = self.call
        if self.attempt >= self.policy.attempts or call.client_gone():
            return None
        now = trio.current_time()
        delay = retry.backoff(self.policy, self.attempt, self.rng)
        if self.tape is not None and self.tape.overflow:
            return self._refused("body_too_large")
        if now + delay >= call.deadline:
            return self._refused("deadline")
        # Reserved now, not when the retry is admitted after its backoff, so
        # calls failing together cannot all pass the cap.
        if not self.guard.reserve_retry():
            return self._refused("max_retries")
        if not self.budget.try_retry(now):
            self.guard.release_retry()
            return self._refused("budget")
        self.reserved = True
        self.attempt += 1
        m = self.metrics
        m.child(m.retries, self.cluster, condition).inc()
        call.flag("retried")
        call.log_field("attempts", self.attempt)
        return delay

    def _refused(self, reason: str) -> None:
        m = self.metrics
        m.child(m.retries_refused, self.cluster, reason).inc()
        if reason in ("budget", "max_retries"):
            self.call.flag("retry_budget_exhausted")
        return None
