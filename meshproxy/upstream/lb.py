"""Load balancers: pure and seedable; they pick among endpoint states.

Knows: how many requests each endpoint has in flight and whether it failed
recently. Must not: do I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Pickable(Protocol):
    active_requests: int
    unit: str

    def healthy(self, now: float) -> bool: ...

    def weight(self) -> float: ...


class RoundRobin:
    def __init__(self, rng: random.Random | None = None) -> None:
        # Start at a random place so many sidecars do not all hit endpoint 0 first.
        self._next = (rng or random.Random()).randrange(1 << 16)

    def pick(self, items: Sequence[Pickable], now: float, exclude: set[int]) -> int | None:
        """The next healthy endpoint in turn; if none is healthy, the next one in turn."""
        n = len(items)
        start = self._next
        fallback = None
        for k in range(n):
            i = (start + k) % n
            if i in exclude:
                continue
            if items[i].healthy(now):
                self._next = start + k + 1
                return i
            if fallback is None:
                fallback = k
        if fallback is None:
            return None
        self._next = start + fallback + 1
        return (start + fallback) % n


class WeightedRoundRobin:
    """Smooth weighted round robin (nginx's): each endpoint's share of picks
    follows its dynamic weight, interleaved rather than in runs."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._current: dict[int, float] = {}

    def pick(self, items: Sequence[Pickable], now: float, exclude: set[int]) -> int | None:
        candidates = [i for i in range(len(items)) if i not in exclude]
        if not candidates:
            return None
        healthy = [i for i in candidates if items[i].healthy(now)] or candidates
        if len(healthy) == 1:
            return healthy[0]
        current = self._current
        total = 0.0
        best = -1
        best_value = 0.0
        for i in healthy:
            w = items[i].weight()
            total += w
            value = current[i] = current.get(i, 0.0) + w
            if best < 0 or value > best_value:
                best, best_value = i, value
        current[best] -= total
        return best


class LeastRequest:
    """Power of two choices: pick two at random, take the one with fewer in flight
    (with dynamic weights: fewer in flight per unit of weight)."""

    def __init__(self, rng: random.Random | None = None, weighted: bool = False) -> None:
        self._rng = rng or random.Random()
        self._weighted = weighted

    def pick(self, items: Sequence[Pickable], now: float, exclude: set[int]) -> int | None:
        candidates = [i for i in range(len(items)) if i not in exclude]
        if not candidates:
            return None
        healthy = [i for i in candidates if items[i].healthy(now)] or candidates
        if len(healthy) == 1:
            return healthy[0]
        a, b = self._rng.sample(healthy, 2)
        if self._weighted:
            ia, ib = items[a], items[b]
            return a if (ia.active_requests + 1) * ib.weight() <= (ib.active_requests + 1) * ia.weight() else b
        return a if items[a].active_requests <= items[b].active_requests else b


def make(policy: str, rng: random.Random | None = None, dynamic: bool = False) -> RoundRobin | WeightedRoundRobin | LeastRequest:
    if policy == "least_request":
        return LeastRequest(rng, dynamic)
    return WeightedRoundRobin(rng) if dynamic else RoundRobin(rng)


def outside_unit(pools: Sequence[Pickable], unit: str | None) -> set[int]:
    """The endpoints a call for `unit` must not use (marked as tried before the first pick)."""
    if unit is None:
        return set()
    return {i for i, p in enumerate(pools) if p.unit != unit}
