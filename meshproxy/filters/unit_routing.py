"""`unit_routing`: send each call to the unit (cell) that owns its data.

    - name: unit_routing
      key: {header: x-user-id}            # or {metadata: uid} (Thrift THeader/TTHeader keys; tt.NAME for
                                          # TTHeader integer keys), the same lookup as a header on HTTP/2
      mode: hash                          # hash | table | ranges | direct (the key names the unit)
      modulus: 1000                       # hash: crc32(key) % modulus picks the slot
      hash_ranges: [{unit: a, from: 0, to: 499}, {unit: b, from: 500, to: 999}]
      table: {"42": a, "43": b}           # mode table: key -> unit
      ranges: [{unit: a, from: 0, to: 99999}, {unit: b, from: 100000, to: 199999}]   # mode ranges: int(key)
      targets: {a: backend-a, b: backend-b}       # unit -> cluster
      subset: false                       # true: only the target cluster's endpoints tagged with the unit
                                          # (endpoints: [{address: "10.0.0.1:80", unit: a}, ...]); one cluster may
                                          # then serve every unit: targets: {a: backend, b: backend}
      gray: {a: {target: backend-a-v2, percent: 10}}   # move 10% of unit a's keys (sticky per key)
      fallback: {a: b, b: a}              # a unit whose cluster has no healthy endpoint -> this unit
      default: a                          # calls with no key (or a key no unit owns); absent: local reply
      observe: false                      # true: decide, log and count, but route as if absent

Every lookup is precomputed at load: a slot array for hash ranges (O(1)), a
dict for a table (O(1)), sorted bounds for numeric ranges (O(log n)). The
gray share is decided by a second hash of the key, so a key moved at 10% is
still moved at 20%, and the same key always goes the same way.

Metrics: ``meshproxy_unit_decisions_total{listener,unit,target,reason}``
with reason table | hash | range | direct | gray | failover | default |
observe; a call with no unit to go to is counted with unit ``-``. The access
log gets ``unit`` and ``unit_reason``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import zlib
from collections.abc import Mapping
from typing import Any

import trio

from meshproxy import status
from meshproxy.call import Call, header_value
from meshproxy.filters.base import (
    CONTINUE,
    Continue,
    Filter,
    FilterContext,
    FilterOptionError,
    Options,
    Respond,
    flag,
    header_name,
    one_of,
)

log = logging.getLogger(__name__)

MODES = ("hash", "table", "ranges", "direct")
MAX_MODULUS = 1_000_000
NO_KEY = Respond(status=400, message="no unit routing key", grpc_status=status.INVALID_ARGUMENT,
                 reason="unit_no_key")


class UnitRoutingFilter(Filter):
    name = "unit_routing"

    def __init__(self, key: bytes, mode: str, modulus: int, slots: list[str | None] | None,
                 table: dict[bytes, str] | None, bounds: tuple[list[int], list[tuple[int, str]]] | None,
                 targets: dict[str, str], gray: dict[str, tuple[str, int]], fallback: dict[str, str],
                 default: str | None, observe: bool, subset: bool = False) -> None:
        self.key = key
        self.mode = mode
        self.modulus = modulus
        self.slots = slots
        self.table = table
        self.starts, self.ranges = bounds or ([], [])
        self.targets = targets
        self.gray = gray
        self.fallback = fallback
        self.default = default
        self.observe = observe
        self.subset = subset
        self.listener = ""
        self.clusters: Mapping[str, Any] | None = None
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._metrics: Any = None

    # -- config

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> UnitRoutingFilter:
        o = Options(options)
        k = o.section("key")
        header = k.get("header", header_name, None)
        metadata = k.get("metadata", header_name, None)
        k.done()
        if (header is None) == (metadata is None):
            raise FilterOptionError("key", "give exactly one of header or metadata")
        key = (header or metadata or b"")
        mode = o.get("mode", one_of(MODES), "")
        modulus = o.get("modulus", _modulus, 1000)
        hash_ranges = o.get("hash_ranges", _ranges("hash_ranges"), None)
        table = o.get("table", _table, None)
        ranges = o.get("ranges", _ranges("ranges"), None)
        targets = o.get("targets", _str_map, None)
        gray = o.get("gray", _gray, {})
        fallback = o.get("fallback", _str_map, {})
        default = o.get("default", _unit, None)
        observe = o.get("observe", flag, False)
        subset = o.get("subset", flag, False)
        o.done()
        given = [n for n, v in (("hash_ranges", hash_ranges), ("table", table), ("ranges", ranges)) if v is not None]
        if not mode:
            mode = {"hash_ranges": "hash", "table": "table", "ranges": "ranges"}.get(given[0], "") if given else ""
            if not mode:
                raise FilterOptionError("mode", "give mode: direct, or one of hash_ranges, table, ranges")
        want = {"hash": "hash_ranges", "table": "table", "ranges": "ranges"}.get(mode)
        if want is not None and want not in given:
            raise FilterOptionError(want, f"required for mode {mode}")
        extra = [g for g in given if g != want]
        if extra:
            raise FilterOptionError(extra[0], f"not used by mode {mode}")
        if not targets:
            raise FilterOptionError("targets", "required: a mapping of unit -> cluster")
        units = set(targets)
        slots = None
        if mode == "hash":
            assert hash_ranges is not None
            slots = _slots(hash_ranges, modulus)
            named = {u for _, _, u in hash_ranges}
        elif mode == "table":
            assert table is not None
            named = set(table.values())
        elif mode == "ranges":
            assert ranges is not None
            named = {u for _, _, u in ranges}
        else:
            named = set()
        for where, names in (("hash_ranges" if mode == "hash" else mode, named), ("fallback", set(fallback)),
                             ("fallback", set(fallback.values())), ("gray", set(gray)),
                             ("default", {default} if default else set())):
            missing = sorted(names - units)
            if missing:
                raise FilterOptionError(where, f"unit {missing[0]!r} has no entry in targets")
        bounds = _bounds(ranges) if ranges is not None else None
        table_b = {k.encode(): v for k, v in table.items()} if table is not None else None
        return cls(key, mode, modulus, slots, table_b, bounds, targets, gray, fallback, default, observe, subset)

    def bind(self, context: FilterContext) -> None:
        self.listener = context.listener
        self.clusters = context.clusters
        self._metrics = context.metrics
        if self.clusters is not None:
            wanted = set(self.targets.values()) | {t for t, _ in self.gray.values()}
            for name in sorted(wanted - set(self.clusters)):
                log.error("listener %s: unit_routing names cluster %r, which the config does not define",
                          context.listener, name)

    def clusters_named(self) -> list[tuple[str, str, str | None]]:
        named: list[tuple[str, str, str | None]] = [(f"targets.{u}", c, None) for u, c in self.targets.items()]
        named += [(f"gray.{u}.target", t, None) for u, (t, _) in self.gray.items()]
        return named

    # -- per call

    async def on_request(self, call: Call) -> Continue | Respond:
        raw = header_value(call.headers, self.key)
        unit, reason = self.unit_for(raw) if raw is not None else (None, "")
        if unit is None:
            if self.default is None:
                self._count("-", "-", "no_key")
                if self.observe:
                    return CONTINUE
                call.log_field("unit_reason", "no_key")
                return NO_KEY
            unit, reason = self.default, "default"
        target = self.targets[unit]
        gray = self.gray.get(unit)
        if gray is not None and raw is not None and _gray_slot(raw) < gray[1]:
            if self._healthy(gray[0], unit):
                target, reason = gray[0], "gray"
            # A gray target that is down: the unit's own target first, before another unit.
        other = self.fallback.get(unit)
        if other is not None and not self._healthy(target, unit) and self._healthy(self.targets[other], other):
            unit, target, reason = other, self.targets[other], "failover"
        if self.observe:
            self._count(unit, target, "observe")
            call.log_field("unit", unit)
            call.log_field("unit_reason", f"observe:{reason}")
            return CONTINUE
        self._count(unit, target, reason)
        call.cluster = target
        if self.subset:
            call.endpoint_unit = unit
        call.log_field("unit", unit)
        call.log_field("unit_reason", reason)
        return CONTINUE

    def unit_for(self, raw: bytes) -> tuple[str | None, str]:
        """The unit a key belongs to and how that was decided (None: no unit owns it)."""
        mode = self.mode
        if mode == "hash":
            assert self.slots is not None
            return self.slots[zlib.crc32(raw) % self.modulus], "hash"
        if mode == "table":
            assert self.table is not None
            return self.table.get(raw), "table"
        if mode == "direct":
            unit = raw.decode("latin-1")
            return (unit if unit in self.targets else None), "direct"
        try:
            n = int(raw)
        except ValueError:
            return None, "range"
        i = bisect.bisect_right(self.starts, n) - 1
        if i >= 0:
            _, hi, unit = self.ranges[i]
            if n <= hi:
                return unit, "range"
        return None, "range"

    def _healthy(self, cluster_name: str, unit: str) -> bool:
        """Any endpoint of the cluster (of the unit's, with subset) not backing off after failures."""
        if self.clusters is None:
            return True
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            return False
        now = trio.current_time()
        return any(p.healthy(now) for p in cluster.pools if not self.subset or p.unit == unit)

    def _count(self, unit: str, target: str, reason: str) -> None:
        m = self._metrics
        if m is None:
            return
        key = (unit, target, reason)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = m.unit_decisions.labels(self.listener, unit, target, reason)
        c.inc()


def _gray_slot(raw: bytes) -> int:
    """A second hash of the key in [0, 100): the gray share is slot < percent.

    Not crc32 again: crc32 is affine, so crc32(prefix + key) is crc32(key) XOR a
    constant for keys of one length, and the gray share would follow the slot.
    """
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"mesh-gray").digest(), "big") % 100


def _slots(ranges: list[tuple[int, int, str]], modulus: int) -> list[str | None]:
    slots: list[str | None] = [None] * modulus
    for lo, hi, unit in ranges:
        if hi >= modulus:
            raise FilterOptionError("hash_ranges", f"slot {hi} is outside 0..{modulus - 1} (modulus {modulus})")
        for i in range(lo, hi + 1):
            if slots[i] is not None:
                raise FilterOptionError("hash_ranges", f"slot {i} is in two ranges ({slots[i]} and {unit})")
            slots[i] = unit
    return slots


def _bounds(ranges: list[tuple[int, int, str]]) -> tuple[list[int], list[tuple[int, int, str]]]:
    ordered = sorted(ranges)
    for (lo1, hi1, u1), (lo2, _, u2) in itertools.pairwise(ordered):
        if lo2 <= hi1:
            raise FilterOptionError("ranges", f"{u1} ({lo1}..{hi1}) and {u2} (from {lo2}) overlap")
    return [lo for lo, _, _ in ordered], ordered


def _unit(raw: Any) -> str:
    if not isinstance(raw, str | int) or isinstance(raw, bool) or raw == "":
        raise ValueError(f"expected a unit name, got {raw!r}")
    return str(raw)


def _modulus(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_MODULUS:
        raise ValueError(f"expected a whole number from 1 to {MAX_MODULUS}, got {raw!r}")
    return raw


def _ranges(where: str) -> Any:
    def parse(raw: Any) -> list[tuple[int, int, str]]:
        if not isinstance(raw, list) or not raw:
            raise ValueError("expected a non-empty list of {unit, from, to}")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) != {"unit", "from", "to"}:
                raise ValueError(f"[{i}]: expected {{unit, from, to}}, got {item!r}")
            lo, hi = item["from"], item["to"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or lo > hi or lo < 0:
                raise ValueError(f"[{i}]: expected whole numbers with 0 <= from <= to, got {lo!r}..{hi!r}")
            out.append((lo, hi, _unit(item["unit"])))
        return out

    return parse


def _table(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("expected a non-empty mapping of key -> unit")
    return {str(k): _unit(v) for k, v in raw.items()}


def _str_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise ValueError("expected a mapping of unit -> name")
    return {str(k): v for k, v in raw.items()}


def _gray(raw: Any) -> dict[str, tuple[str, int]]:
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping of unit -> {target, percent}")
    out = {}
    for unit, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"target", "percent"}:
            raise ValueError(f"{unit}: expected {{target: CLUSTER, percent: 0..100}}")
        pct = spec["percent"]
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise ValueError(f"{unit}: percent must be a whole number from 0 to 100, got {pct!r}")
        if not isinstance(spec["target"], str) or not spec["target"]:
            raise ValueError(f"{unit}: target must be a cluster name")
        out[str(unit)] = (spec["target"], pct)
    return out
