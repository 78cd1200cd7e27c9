"""`rate_limit`: a local per-key rate limit, policing (token bucket) or shaping (leaky bucket).

    - name: rate_limit
      algorithm: token_bucket      # token_bucket (refuse at once) | leaky_bucket (queue, then refuse)
      rate: 100                    # calls per period (> 0)
      period: 1s                   # default 1s: `rate: 100, period: 1m` is 100 a minute
      burst: 20                    # token_bucket: the bucket's size; leaky_bucket: calls queued per key
      key: {header: x-caller}      # or {metadata: NAME} | route | principal; absent: one bucket for all
      missing: limit               # a call without the key: limit (they share one bucket) | allow
      max_keys: 10000              # per-key table size; least recently used keys are forgotten past it
      limit: rate_limit            # the `limit` metric label: name each limit when a listener has several
      dry_run: false               # true: count and log what would be refused, refuse nothing

Knows: time as numbers (trio's clock, read once per call), the call's key.
Must not: do I/O. The bucket arithmetic is sans-IO (`TokenBuckets`,
`LeakyBuckets`: every method takes `now`), so it is tested without a clock;
the filter only reads the clock, sleeps a leaky bucket's wait, and answers.

Both algorithms keep one float per key (GCRA, the "virtual scheduling" form of
a bucket): the time at which the key's bucket is back at rest. One float
instead of (tokens, last refill) keeps 10,000 keys small, and a call is a
dict lookup, a comparison and a store.

Why the leaky bucket queues: a leaky bucket used as a meter (refuse what would
overflow, never delay) admits exactly the calls a token bucket of the same
rate and size admits (GCRA is both), so a second name for it would add
nothing. Here it shapes instead, as nginx `limit_req` without `nodelay`: calls
leave one interval (1/rate) apart, up to `burst` calls per key wait for their
turn, and a call whose turn is past the queue or past its own deadline is
refused at once rather than after a wait that could only end in a timeout.

A refused call gets 429 / gRPC RESOURCE_EXHAUSTED (8) / a Thrift
TApplicationException (INTERNAL_ERROR, "rate limited"); HTTP replies carry
`retry-after` (whole seconds, rounded up), gRPC ones `grpc-retry-pushback-ms`
(gRFC A6). It is counted in meshproxy_rate_limited_total{listener,limit}, the
access log's response_flags get "rate_limited" and its `rate_limit` field the
reason (over_limit, queue_full, past_deadline, table_full).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import trio

from meshproxy import status
from meshproxy.call import Call, Protocol, header_value
from meshproxy.filters.base import (
    CONTINUE,
    Continue,
    Filter,
    FilterContext,
    FilterOptionError,
    Options,
    Respond,
    client_gone,
    flag,
    header_name,
    one_of,
    positive_number,
    text,
    whole_number,
)
from meshproxy.values import parse_positive_duration

ALGORITHMS = ("token_bucket", "leaky_bucket")
KEY_KINDS = ("route", "principal")
MISSING = ("limit", "allow")
# 10,000 keys cost about 2 MB (a key of up to MAX_KEY_BYTES, a float, an OrderedDict link).
DEFAULT_MAX_KEYS = 10_000
# The bucket of calls whose key is missing (`missing: limit`), and of every call without `key`.
MISSING_KEY = ""
# Header values are client-chosen: longer ones are kept as a 16-byte digest so
# 10,000 keys cannot pin 10,000 large header values in memory.
MAX_KEY_BYTES = 64
# Repeated float additions of 1/rate drift by ulps: a call due exactly at the
# edge of the burst must not be refused because of that.
EPSILON = 1e-9

# Why a call was refused (the access log's `rate_limit` field).
OVER_LIMIT = "over_limit"  # token_bucket: no token left
QUEUE_FULL = "queue_full"  # leaky_bucket: `burst` calls of the key wait already
PAST_DEADLINE = "past_deadline"  # leaky_bucket: its turn would come at or after its deadline
# leaky_bucket: a new key, and the least recently used one still has calls waiting.
TABLE_FULL = "table_full"


# -- the bucket arithmetic (sans-IO) ---------------------------------------------------------


class _Schedule:
    """Per key, the time its bucket is back at rest; bounded, least recently used first out.

    A key not in the table is at rest (a full token bucket, an empty queue),
    so forgetting a key only ever gives it its full burst back.
    """

    __slots__ = ("_at", "burst", "interval", "max_keys")

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.interval = 1.0 / rate
        self.burst = burst
        self.max_keys = max_keys
        self._at: OrderedDict[Hashable, float] = OrderedDict()

    def _rest_at(self, key: Hashable, now: float) -> float:
        at = self._at.get(key)
        if at is None:
            return now
        self._at.move_to_end(key)
        return at if at > now else now

    def _store(self, key: Hashable, at: float) -> None:
        # After _rest_at the key is last already, or new and so inserted last.
        self._at[key] = at
        if len(self._at) > self.max_keys:
            self._at.popitem(last=False)

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._at


class TokenBuckets(_Schedule):
    """Policing: a bucket of `burst` tokens per key, refilled at `rate` per second.

    Held as `full_at`, the time the bucket is full again: tokens(now) =
    burst - (full_at - now) * rate. Taking a token pushes full_at one interval on.
    """

    __slots__ = ("_tolerance",)

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(rate, burst, max_keys)
        # At least one token is left while the bucket is at most burst - 1 intervals from full.
        self._tolerance = (burst - 1) * self.interval + EPSILON

    def take(self, key: Hashable, now: float) -> float:
        """Take a token of `key`'s bucket: 0.0 if it had one, else the seconds until it will (refused)."""
        full_at = self._rest_at(key, now)
        short = full_at - now - self._tolerance
        if short > 0:
            return short
        self._store(key, full_at + self.interval)
        return 0.0


class LeakyBuckets(_Schedule):
    """Shaping: per key, calls leave one interval apart; up to `burst` wait for their turn.

    Held as `free_at`, the time the key's next call may leave. A call that finds
    free_at in the past leaves now; one that finds it k intervals ahead is the
    k-th in the queue and waits, if k <= burst (nginx limit_req without nodelay).

    A key with calls waiting is never forgotten (a new key is refused instead),
    so no key ever has two queues and at most max_keys x burst calls wait.
    """

    __slots__ = ("_capacity",)

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(rate, burst, max_keys)
        self._capacity = burst * self.interval + EPSILON

    def reserve(
        self, key: Hashable, now: float, deadline: float = math.inf
    ) -> tuple[str | None, float]:
        """Queue a call of `key` arriving at `now`.

        (None, at): it holds the turn at `at` (>= now) and leaves then.
        (reason, at): refused; `at` is when retrying makes sense: when a place
        frees up (QUEUE_FULL, TABLE_FULL) or the queue is empty (PAST_DEADLINE).
        """
        table = self._at
        if key not in table and len(table) >= self.max_keys:
            oldest = next(iter(table.values()))
            # Its last waiting call leaves at oldest - interval; until then it must stay.
            if oldest - self.interval > now + EPSILON:
                return TABLE_FULL, oldest - self.interval
        free_at = self._rest_at(key, now)
        wait = free_at - now
        if wait > self._capacity:
            return QUEUE_FULL, now + (wait - self._capacity)
        if wait > 0 and free_at >= deadline:
            # Waiting would only end in a timeout: refuse now, and keep the turn for a call that can use it.
            return PAST_DEADLINE, free_at
        self._store(key, free_at + self.interval)
        return None, free_at

    def cancel(self, key: Hashable, at: float) -> None:
        """Give back the turn at `at` of a call that stopped waiting, if no call queued behind it.

        With calls behind it the gap stays: moving them up would wake them early.
        """
        free_at = self._at.get(key)
        if free_at is not None and free_at == at + self.interval:
            self._at[key] = at


# -- the filter ----------------------------------------------------------------------------------


KeyOf = Callable[[Call], Hashable | None]


def _header_key(name: bytes) -> KeyOf:
    def key_of(call: Call) -> Hashable | None:
        if call.protocol is Protocol.THRIFT:
            # HTTP/2 names arrive lower-case; Thrift metadata keys as the client wrote them.
            value = next((v for k, v in call.headers if k.lower() == name), None)
        else:
            value = header_value(call.headers, name)
        if not value:
            return None
        if len(value) > MAX_KEY_BYTES:
            return hashlib.blake2b(value, digest_size=16).digest()
        return value

    return key_of


def _route_key(call: Call) -> Hashable | None:
    return call.route.name if call.route is not None else None


def _principal_key(call: Call) -> Hashable | None:
    # A verified ticket's subject, else the mTLS identity: the same principal authz uses.
    return call.principal or call.peer.identity


def _global_key(call: Call) -> Hashable | None:
    return MISSING_KEY


class RateLimitFilter(Filter):
    name = "rate_limit"

    def __init__(
        self,
        algorithm: str,
        rate: float,
        burst: int,
        key_of: KeyOf = _global_key,
        key_name: str = "",
        allow_missing: bool = False,
        max_keys: int = DEFAULT_MAX_KEYS,
        limit_name: str = "rate_limit",
        dry_run: bool = False,
    ) -> None:
        self.algorithm = algorithm
        self.rate = rate  # per second
        self.burst = burst
        self.key_name = key_name  # how the key is read, for reprs: "header:x-caller", "route", ""
        self.allow_missing = allow_missing
        self.max_keys = max_keys
        self.limit_name = limit_name
        self.dry_run = dry_run
        self.may_wait = algorithm == "leaky_bucket" and not dry_run
        self._key_of = key_of
        self._tokens = TokenBuckets(rate, burst, max_keys) if algorithm == "token_bucket" else None
        self._queues = LeakyBuckets(rate, burst, max_keys) if algorithm == "leaky_bucket" else None
        self._counter: Any = None

    # -- config

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RateLimitFilter:
        o = Options(options)
        algorithm = o.get("algorithm", one_of(ALGORITHMS), "token_bucket")
        if "rate" not in options:
            raise FilterOptionError(
                "rate", "required: calls per period (per second unless period is given)"
            )
        rate = o.get("rate", positive_number("a number of calls"), 1.0)
        period = o.get("period", parse_positive_duration, 1.0)
        per_second = rate / period
        # One second's worth by default (at least 1): `rate: 100` alone allows 100 at once.
        burst = o.get("burst", whole_number(1), max(1, math.floor(per_second + 0.5)))
        key_of, key_name = _key_option(o, options.get("key"))
        missing = o.get("missing", one_of(MISSING), "limit")
        if "missing" in options and "key" not in options:
            raise FilterOptionError(
                "missing", "only with key: without one every call shares one bucket"
            )
        max_keys = o.get("max_keys", whole_number(1), DEFAULT_MAX_KEYS)
        # Not `name`: in a filter entry that is the filter type.
        limit_name = o.get("limit", text, "rate_limit")
        dry_run = o.get("dry_run", flag, False)
        o.done()
        return cls(
            algorithm,
            per_second,
            burst,
            key_of,
            key_name,
            missing == "allow",
            max_keys,
            limit_name,
            dry_run,
        )

    def adopt(self, previous: Filter) -> bool:
        # A reload must not refill the buckets (a SIGHUP would let a burst through).
        # With other limits the old counts mean nothing: the new buckets start full.
        if not isinstance(previous, RateLimitFilter) or self._limits() != previous._limits():
            return False
        self._tokens, self._queues = previous._tokens, previous._queues
        return True

    def _limits(self) -> tuple[object, ...]:
        return (self.limit_name, self.algorithm, self.rate, self.burst, self.key_name, self.allow_missing,
                self.max_keys)

    def bind(self, context: FilterContext) -> None:
        m = context.metrics
        if m is not None:
            self._counter = m.child(m.rate_limited, context.listener, self.limit_name)

    # -- per call

    async def on_request(self, call: Call) -> Continue | Respond:
        key = self._key_of(call)
        if key is None:
            if self.allow_missing:
                return CONTINUE
            key = MISSING_KEY
        now = trio.current_time()
        if self._tokens is not None:
            retry = self._tokens.take(key, now)
            return CONTINUE if retry == 0.0 else self._refuse(call, OVER_LIMIT, retry)
        assert self._queues is not None
        # In a dry run the call never waits, so its deadline cannot cut the wait short either.
        refused, at = self._queues.reserve(key, now, math.inf if self.dry_run else call.deadline)
        if refused is not None:
            return self._refuse(call, refused, at - now)
        if at <= now or self.dry_run:
            return CONTINUE
        call.log_field("rate_limit_delay", round(at - now, 6))
        try:
            await trio.sleep_until(at)
        except trio.Cancelled:
            self._queues.cancel(key, at)
            raise
        if call.client_gone():
            # Not a refusal: the limit let it through, its client left while it waited.
            return client_gone(call, "client gone")
        return CONTINUE

    def _refuse(self, call: Call, reason: str, retry_after: float) -> Continue | Respond:
        if self._counter is not None:
            self._counter.inc()
        if self.dry_run:
            call.log_field("rate_limit", f"dry_run:{reason}")
            return CONTINUE
        call.flag("rate_limited")
        call.log_field("rate_limit", reason)
        if call.protocol is Protocol.GRPC:
            # gRFC A6: a client retry policy waits this long before its next attempt.
            pushback = max(1, math.ceil((retry_after - EPSILON) * 1000))
            headers = [(b"grpc-retry-pushback-ms", str(pushback).encode("ascii"))]
        else:
            # RFC 9110 10.2.3: delay-seconds, a whole number; rounded up so a retry is not early.
            seconds = max(1, math.ceil(retry_after - EPSILON))
            headers = [(b"retry-after", str(seconds).encode("ascii"))]
        return Respond(
            status=429,
            message="rate limited",
            grpc_status=status.RESOURCE_EXHAUSTED,
            headers=headers,
            reason="rate_limited",
        )

    def __repr__(self) -> str:
        return (
            f"<RateLimitFilter {self.limit_name} {self.algorithm} {self.rate:g}/s burst {self.burst}"
            f" key {self.key_name or '-'}{' dry_run' if self.dry_run else ''}>"
        )


def _key_kind(raw: Any) -> str:
    if raw not in KEY_KINDS:
        raise ValueError(
            f"expected {{header: NAME}}, {{metadata: NAME}}, route or principal, got {raw!r}"
        )
    return str(raw)


def _key_option(o: Options, raw: Any) -> tuple[KeyOf, str]:
    """`key`: {header: NAME} | {metadata: NAME} | route | principal | absent (one bucket)."""
    if isinstance(raw, dict):
        k = o.section("key")
        header = k.get("header", header_name, None)
        metadata = k.get("metadata", header_name, None)
        k.done()
        if (header is None) == (metadata is None):
            raise FilterOptionError("key", "give exactly one of header or metadata")
        # The same lookup either way (Thrift metadata is the call's headers); the
        # two names only let a config say what it means.
        name = header or metadata or b""
        return _header_key(name), f"{'header' if header else 'metadata'}:{name.decode('ascii')}"
    kind = o.get("key", _key_kind, "")
    if kind == "route":
        return _route_key, kind
    if kind == "principal":
        return _principal_key, kind
    return _global_key, ""
