"""`fault`: inject delays and aborts into a share of calls, for chaos drills.

    - name: fault
      delay: {duration: 200ms, percentage: 10}
      abort: {http_status: 503, grpc_status: 14, percentage: 5}
      header_gate: x-chaos     # optional: only calls carrying this header

Aborts are answered locally (gRPC calls get a trailers-only reply); delays
sleep before the call continues, within the call's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import trio

from meshproxy import status
from meshproxy.call import Call, header_value
from meshproxy.filters.base import CONTINUE, Continue, Filter, Options, Respond
from meshproxy.values import parse_duration, parse_percent


def _http_status(raw: Any) -> int:
    if not isinstance(raw, int) or not 200 <= raw <= 599:
        raise ValueError(f"expected an HTTP status from 200 to 599, got {raw!r}")
    return raw


def _grpc_status(raw: Any) -> int:
    if not isinstance(raw, int) or not 1 <= raw <= 16:
        raise ValueError(f"expected a gRPC status code from 1 to 16, got {raw!r}")
    return raw


def _header(raw: Any) -> bytes:
    if not isinstance(raw, str) or not raw:
        raise ValueError("expected a header name")
    return raw.lower().encode()


@dataclass(frozen=True, slots=True)
class _Delay:
    duration: float
    percentage: float


@dataclass(frozen=True, slots=True)
class _Abort:
    http_status: int
    grpc_status: int
    percentage: float


class FaultFilter(Filter):
    name = "fault"

    def __init__(
        self,
        delay: _Delay | None,
        abort: _Abort | None,
        header_gate: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.delay = delay
        self.may_wait = delay is not None
        self.abort = abort
        self.header_gate = header_gate
        self._rng = rng or random.Random()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> FaultFilter:
        opts = Options(options)
        delay = abort = None
        if "delay" in options:
            d = opts.section("delay")
            delay = _Delay(d.get("duration", parse_duration, 0.0), d.get("percentage", parse_percent, 100.0))
            d.done()
        if "abort" in options:
            a = opts.section("abort")
            abort = _Abort(
                a.get("http_status", _http_status, 503),
                a.get("grpc_status", _grpc_status, status.UNAVAILABLE),
                a.get("percentage", parse_percent, 100.0),
            )
            a.done()
        gate = opts.get("header_gate", _header, None)
        opts.section("delay")
        opts.section("abort")
        opts.done()
        return cls(delay, abort, gate)

    def _hit(self, percentage: float) -> bool:
        return percentage >= 100.0 or self._rng.random() * 100.0 < percentage

    async def on_request(self, call: Call) -> Continue | Respond:
        if self.header_gate is not None and header_value(call.headers, self.header_gate) is None:
            return CONTINUE
        if self.delay is not None and self._hit(self.delay.percentage):
            call.flag("fault")
            await trio.sleep(self.delay.duration)
        if self.abort is not None and self._hit(self.abort.percentage):
            call.flag("fault")
            return Respond(
                status=self.abort.http_status,
                grpc_status=self.abort.grpc_status,
                message="fault injected",
                reason="fault",
            )
        return CONTINUE
