"""`authz`: who may call what, as ordered allow / deny rules (first match wins).

    - name: authz
      dry_run: false                  # true: decide, log and count, but let every call through
      default: deny                   # when no rule matches
      unit_header: x-mesh-unit        # where source_units come from when no ticket names a unit
      rules:
        - name: allow-frontend
          action: allow               # allow | deny
          principals: ["spiffe://mesh/ns/default/sa/frontend", "spiffe://mesh/ns/ops/*"]
          source_units: [u1]
          services: [api.comment]
          paths: ["/echo.Echo/", {exact: /healthz}, {prefix: /admin/}]
          methods: [Unary, echo, GET]
          headers: {x-tenant: a, tt.from_service: "web*"}

Each field is optional; a rule matches when every field it has matches
(AND), and a field matches when any of its entries does (OR):

- principals: ``call.principal`` (a verified ticket), else the mTLS peer
  identity; a call with neither matches no ``principals`` rule.
- source_units: the unit of a verified ticket, else the ``unit_header`` value.
- services: the destination service: the authority, with or without its port
  (HTTP/2), the Thrift service.
- paths: an entry ending in ``/`` is a prefix, others are exact; or say it
  with ``{prefix: ...}`` / ``{exact: ...}``. gRPC ``/pkg.Svc/Method``, Thrift
  ``/Service/method``.
- methods: the RPC method (gRPC and Thrift: the path's last segment), or the
  HTTP method for plain HTTP/2.
- headers: name -> value (or a list of values): HTTP/2 headers, THeader /
  TTHeader metadata (integer keys as ``tt.NAME``); names are matched
  lower-case.

Strings in principals, source_units, services and header values are exact or
globs where ``*`` (the only wildcard) matches any run of characters. All of it
is compiled at load (exact sets, one regex per field), so 50 rules stay cheap.
A denied call gets 403 / gRPC PERMISSION_DENIED / a Thrift exception; the
rule's name goes to the access log (``authz``) and to
``meshproxy_authz_decisions_total{listener,rule,action,dry_run}``, never into
the reply.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from meshproxy import status
from meshproxy.call import Call, Protocol
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
)
from meshproxy.filters.ratelog import DEFAULT_INTERVAL, RateLimitedLog
from meshproxy.filters.ticket import destination_service
from meshproxy.metrics import Metrics
from meshproxy.values import parse_duration

log = logging.getLogger(__name__)

ACTIONS = ("allow", "deny")
RULE_KEYS = ("name", "action", "principals", "source_units", "services", "paths", "methods", "headers")
DEFAULT_RULE = "default"  # the rule label of the default action; no rule may take the name
DEFAULT_UNIT_HEADER = "x-mesh-unit"
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


# -- patterns --------------------------------------------------------------------


class Patterns:
    """Exact strings (a set) and ``*`` globs (one alternation regex) of one field."""

    __slots__ = ("any", "exact", "regex")

    def __init__(self, exact: frozenset[Any], regex: Any, any_value: bool) -> None:
        self.exact = exact
        self.regex = regex  # a compiled pattern's fullmatch, or None
        self.any = any_value  # a bare "*": every value matches

    @classmethod
    def compile(cls, entries: list[str], key: str, as_bytes: bool = False) -> Patterns:
        exact: set[Any] = set()
        globs: list[str] = []
        for i, entry in enumerate(entries):
            _check_glob(entry, f"{key}[{i}]")
            if "*" in entry:
                globs.append(entry)
            else:
                exact.add(entry.encode() if as_bytes else entry)
        any_value = "*" in globs
        regex = None
        if globs and not any_value:
            source = "|".join(".*".join(re.escape(part) for part in g.split("*")) for g in globs)
            pattern = f"(?s:{source})"
            regex = (re.compile(pattern.encode()) if as_bytes else re.compile(pattern)).fullmatch
        return cls(frozenset(exact), regex, any_value)

    def match(self, value: Any) -> bool:
        return self.any or value in self.exact or (self.regex is not None and self.regex(value) is not None)


def _check_glob(entry: object, key: str) -> None:
    if not isinstance(entry, str) or not entry:
        raise FilterOptionError(key, f"expected a non-empty string, got {entry!r}")
    for c in "?[]{}":
        if c in entry:
            raise FilterOptionError(key, f"bad pattern {entry!r}: '*' is the only wildcard ('{c}' is not allowed)")
    if "**" in entry:
        raise FilterOptionError(key, f"bad pattern {entry!r}: '**' (one '*' already matches any run, '/' included)")


class Paths:
    __slots__ = ("exact", "prefixes")

    def __init__(self, exact: frozenset[str], prefixes: tuple[str, ...]) -> None:
        self.exact = exact
        self.prefixes = prefixes

    def match(self, path: str) -> bool:
        return path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))


# -- rules -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What the filter decided for a call (call.filter_state["authz"])."""

    rule: str  # the rule's name, or "default"
    action: str  # allow | deny
    dry_run: bool

    @property
    def denied(self) -> bool:
        return self.action == "deny"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str
    principals: Patterns | None = None
    source_units: Patterns | None = None
    services: Patterns | None = None
    paths: Paths | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[bytes, Patterns], ...] = ()


def _list(raw: Any, key: str) -> list[Any]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise FilterOptionError(key, f"expected a list, got {raw!r}")
    if not raw:
        raise FilterOptionError(key, "an empty list matches nothing: leave the field out to match everything")
    return raw


def _paths(raw: Any, key: str) -> Paths:
    exact: set[str] = set()
    prefixes: list[str] = []
    for i, entry in enumerate(_list(raw, key)):
        where = f"{key}[{i}]"
        if isinstance(entry, dict):
            if len(entry) != 1 or next(iter(entry)) not in ("prefix", "exact"):
                raise FilterOptionError(where, f"expected {{prefix: PATH}} or {{exact: PATH}}, got {entry!r}")
            kind, value = next(iter(entry.items()))
        else:
            kind, value = None, entry
        if not isinstance(value, str) or not value.startswith("/"):
            raise FilterOptionError(where, f"expected a path starting with '/', got {value!r}")
        if kind == "prefix" or (kind is None and value.endswith("/")):
            prefixes.append(value)
        else:
            exact.add(value)
    return Paths(frozenset(exact), tuple(prefixes))


def _methods(raw: Any, key: str) -> frozenset[str]:
    entries = _list(raw, key)
    for i, m in enumerate(entries):
        if not isinstance(m, str) or not m or "/" in m:
            raise FilterOptionError(f"{key}[{i}]", f"expected a method name, got {m!r}")
    return frozenset(entries)


def _headers(raw: Any, key: str) -> tuple[tuple[bytes, Patterns], ...]:
    if not isinstance(raw, dict) or not raw:
        raise FilterOptionError(key, f"expected a mapping of header / metadata names to values, got {raw!r}")
    out = []
    for name, values in raw.items():
        if not isinstance(name, str) or not name or not name.isascii():
            raise FilterOptionError(key, f"expected a header name, got {name!r}")
        where = f"{key}.{name}"
        entries = [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in _list(values, where)]
        out.append((name.lower().encode("ascii"), Patterns.compile(entries, where, as_bytes=True)))
    return tuple(out)


def parse_rule(raw: Any, index: int) -> Rule:
    at = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise FilterOptionError(at, f"expected a mapping, got {raw!r}")
    for k in raw:
        if k not in RULE_KEYS:
            raise FilterOptionError(f"{at}.{k}", f"unknown key (expected: {', '.join(sorted(RULE_KEYS))})")
    name = raw.get("name", f"rule-{index}")
    if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
        raise FilterOptionError(f"{at}.name", f"expected a name of letters, digits and ._:/- , got {name!r}")
    if name == DEFAULT_RULE:
        raise FilterOptionError(f"{at}.name", f"'{DEFAULT_RULE}' names the default action; choose another name")
    if "action" not in raw:
        raise FilterOptionError(f"{at}.action", "required key is missing (allow or deny)")
    action = raw["action"]
    if action not in ACTIONS:
        raise FilterOptionError(f"{at}.action", f"expected allow or deny, got {action!r}")

    def field(key: str, parse: Any) -> Any:
        return parse(raw[key], f"{at}.{key}") if key in raw else None

    return Rule(
        name=name,
        action=action,
        principals=field("principals", lambda v, k: Patterns.compile(_list(v, k), k)),
        source_units=field("source_units", lambda v, k: Patterns.compile(_list(v, k), k)),
        services=field("services", lambda v, k: Patterns.compile(_list(v, k), k)),
        paths=field("paths", _paths),
        methods=field("methods", _methods),
        headers=field("headers", _headers) or (),
    )


def _rules(raw: Any) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of rules, got {raw!r}")
    rules = tuple(parse_rule(r, i) for i, r in enumerate(raw))
    seen: set[str] = set()
    for i, r in enumerate(rules):
        if r.name in seen:
            raise FilterOptionError(f"rules[{i}].name", f"duplicate rule name '{r.name}' (names are metric labels)")
        seen.add(r.name)
    return rules


def _action(raw: Any) -> str:
    if raw not in ACTIONS:
        raise ValueError(f"expected allow or deny, got {raw!r}")
    return str(raw)


# -- the filter ------------------------------------------------------------------

DENIED = Respond(status=403, message="permission denied", grpc_status=status.PERMISSION_DENIED, reason="authz_denied")
# Decisions remembered, by what the rules look at (most traffic repeats a few
# callers x methods). Cleared when full: callers that vary what is looked at on
# every call (random paths) cost the full evaluation, and no memory.
DECISION_CACHE_SIZE = 8192
SERVICE_CACHE_SIZE = 1024


class AuthzFilter(Filter):
    name = "authz"

    def __init__(
        self,
        rules: tuple[Rule, ...],
        default: str = "deny",
        dry_run: bool = False,
        unit_header: bytes = DEFAULT_UNIT_HEADER.encode(),
        log_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.rules = rules
        self.default = default
        self.dry_run = dry_run
        self.unit_header = unit_header
        self.metrics: Metrics | None = None
        self._log = RateLimitedLog(log, log_interval)
        # What the rules look at, so a call computes only that.
        self._need_principal = any(r.principals is not None for r in rules)
        self._need_unit = any(r.source_units is not None for r in rules)
        self._need_service = any(r.services is not None for r in rules)
        self._need_method = any(r.methods is not None for r in rules)
        self._header_names = frozenset(name for r in rules for name, _ in r.headers)
        # Per rule (and the default, last): the decision and its access-log value, built once.
        names = [(r.name, r.action) for r in rules] + [(DEFAULT_RULE, default)]
        self._decisions = tuple(Decision(n, a, dry_run) for n, a in names)
        self._log_values = tuple({"rule": n, "action": a, "dry_run": dry_run} for n, a in names)
        self._counters: dict[str, tuple[Any, ...]] = {}  # listener -> a counter child per decision
        self._cache: dict[tuple[Any, ...], int] = {}
        self._services: dict[str, str] = {}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AuthzFilter:
        o = Options(options)
        dry_run = o.get("dry_run", flag, False)
        default = o.get("default", _action, "deny")
        unit_header = o.get("unit_header", header_name, DEFAULT_UNIT_HEADER.encode())
        log_interval = o.get("log_interval", parse_duration, DEFAULT_INTERVAL)
        rules = o.get("rules", _rules, ())
        o.done()
        return cls(rules, default, dry_run, unit_header, log_interval)

    def bind(self, context: FilterContext) -> None:
        self.metrics = context.metrics

    def match(self, call: Call) -> int:
        """The index of the first rule that matches `call`; len(rules) for none (the default)."""
        return self._decide(call, call.principal or call.peer.identity)

    def _decide(self, call: Call, principal: str | None) -> int:
        # The key holds exactly what the rules look at (the method and the
        # service derive from path, protocol, method and authority).
        unit = headers = None
        if self._need_unit or self._header_names:
            unit, headers = self._scan(call)
        key = (
            call.path,
            call.protocol,
            principal if self._need_principal else None,
            call.authority if self._need_service else None,
            call.method if self._need_method else None,
            unit,
            headers,
        )
        i = self._cache.get(key)
        if i is None:
            i = self._evaluate(call, principal, unit, headers)
            if len(self._cache) >= DECISION_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = i
        return i

    def _evaluate(
        self, call: Call, principal: str | None, unit: str | None, headers: tuple[tuple[bytes, bytes], ...] | None
    ) -> int:
        path = call.path
        authority = service = ""
        if self._need_service:
            authority = call.authority
            service = self._service(authority)
        method = ""
        if self._need_method:
            method = call.method if call.protocol is Protocol.HTTP2 else path.rpartition("/")[2]
        values: dict[bytes, list[bytes]] = {}
        for k, v in headers or ():
            values.setdefault(k, []).append(v)
        i = 0
        for rule in self.rules:
            if (
                (rule.paths is None or rule.paths.match(path))
                and (rule.methods is None or method in rule.methods)
                and (rule.principals is None or (principal is not None and rule.principals.match(principal)))
                and (rule.services is None or rule.services.match(service)
                     or (authority != service and rule.services.match(authority)))
                and (rule.source_units is None or (unit is not None and rule.source_units.match(unit)))
                and (not rule.headers or _headers_match(rule.headers, values))
            ):
                return i
            i += 1
        return i

    async def on_request(self, call: Call) -> Continue | Respond:
        principal = call.principal or call.peer.identity
        i = self._decide(call, principal)
        decision = self._decisions[i]
        call.filter_state["authz"] = decision
        call.log_field("authz", self._log_values[i])
        if principal is not None:
            call.log_field("principal", principal)
        if self.metrics is not None:
            counters = self._counters.get(call.listener) or self._counters_for(call.listener)
            counters[i].inc()
        if decision.action == "allow":
            return CONTINUE
        if self.dry_run:
            self._log.log(
                logging.WARNING, decision.rule, "listener %s: dry run: rule %s would deny %s (principal %s)",
                call.listener, decision.rule, call.path, principal or "none",
            )
            return CONTINUE
        self._log.log(
            logging.INFO, decision.rule, "listener %s: rule %s denied %s (principal %s)",
            call.listener, decision.rule, call.path, principal or "none",
        )
        return DENIED

    def _counters_for(self, listener: str) -> tuple[Any, ...]:
        m = self.metrics
        assert m is not None
        dry_run = "true" if self.dry_run else "false"
        counters = tuple(m.child(m.authz_decisions, listener, d.rule, d.action, dry_run) for d in self._decisions)
        self._counters[listener] = counters
        return counters

    def _service(self, authority: str) -> str:
        service = self._services.get(authority)
        if service is None:
            if len(self._services) >= SERVICE_CACHE_SIZE:
                self._services.clear()
            service = self._services[authority] = destination_service(authority)
        return service

    def _scan(self, call: Call) -> tuple[str | None, tuple[tuple[bytes, bytes], ...] | None]:
        """One pass over the headers: the source unit, and the (name, value) pairs of the
        headers the rules name, in order (None when there are none)."""
        verdict = call.filter_state.get("ticket")
        unit = getattr(verdict, "unit", None) if verdict is not None else None  # signed: wins over a header
        unit_name = self.unit_header if self._need_unit and not unit else None
        names = self._header_names
        # HTTP/2 names arrive lower-case; Thrift metadata keys as the client wrote them.
        lower = call.protocol is Protocol.THRIFT
        pairs: list[tuple[bytes, bytes]] | None = None
        for k, v in call.headers:
            if lower:
                k = k.lower()
            if k == unit_name:
                unit = v.decode("utf-8", "replace")
                unit_name = None  # the first one counts
            if k in names:
                if pairs is None:
                    pairs = [(k, v)]
                else:
                    pairs.append((k, v))
        return unit, tuple(pairs) if pairs is not None else None


def _headers_match(wanted: tuple[tuple[bytes, Patterns], ...], values: dict[bytes, list[bytes]]) -> bool:
    for name, patterns in wanted:
        got = values.get(name)
        if got is None or not any(patterns.match(v) for v in got):
            return False
    return True


__all__ = ["AuthzFilter", "Decision", "Patterns", "Rule", "parse_rule"]
