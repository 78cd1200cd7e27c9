"""`ticket`: service tickets for hops without an mTLS identity (meshproxy/tickets.py).

    # egress: sign a ticket naming node.service and attach it to every call
    - name: ticket
      mode: issue
      algorithm: EdDSA                 # EdDSA | ES256 (key: a PEM private key) | HS256 (secret: a file)
      key: /etc/mesh/ticket-key.pem
      ttl: 5m                          # re-signed when 20% of it is left
      # audience: api.comment          # default: the destination service (authority less port; Thrift service)
      # service: frontend              # default: node.service (iss and sub)
      # header: x-mesh-ticket          # an HTTP/2 header; a THeader / TTHeader string key for Thrift

    # ingress: verify it; the caller's service becomes call.principal
    - name: ticket
      mode: verify
      algorithm: EdDSA
      key: /etc/mesh/ticket-pub.pem    # the public key (a private key file works too); a list while rotating
      # audience: [api.comment]        # default: node.service
      leeway: 5s                       # clock skew allowed on iat and exp
      on_expired: deny                 # deny | allow | dry_run, per failure class
      on_invalid: deny
      on_missing: deny

A denied call gets 401 / gRPC UNAUTHENTICATED / a Thrift exception. `allow`
lets the failing call through silently (counted); `dry_run` lets it through,
counts it and logs a rate-limited warning. An expired ticket that is let
through still names its caller (its signature was good); an invalid one
never does. The ticket header is removed before the call goes on, whatever
the result. Counted in `meshproxy_ticket_verifications_total{listener,result,action}`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from meshproxy import status, tickets
from meshproxy.call import Call, Protocol, remove_header, set_header
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
    text,
)
from meshproxy.filters.ratelog import DEFAULT_INTERVAL, RateLimitedLog
from meshproxy.metrics import Metrics
from meshproxy.values import parse_duration

log = logging.getLogger(__name__)

MODES = ("issue", "verify")
ACTIONS = ("deny", "allow", "dry_run")
DEFAULT_HEADER = "x-mesh-ticket"
DEFAULT_TTL = 300.0
# A ticket lives at least this long: below it, a hop plus some skew eats it.
MIN_TTL = 10.0


def _audiences(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str) and raw:
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(a, str) and a for a in raw):
        return tuple(raw)
    raise ValueError(f"expected an audience or a non-empty list of them, got {raw!r}")


def _ttl(raw: Any) -> float:
    ttl = parse_duration(raw)
    if ttl < MIN_TTL:
        raise ValueError(f"a ticket must live at least {MIN_TTL:.0f}s, got {raw!r}")
    return ttl


def _key_options(o: Options, options: dict[str, Any], algorithm: str, verify: bool) -> Any:
    """The key (EdDSA, ES256) or secret (HS256) named by the options; read now, so a
    missing or unusable file is a config error with its key path."""
    if algorithm == "HS256":
        if "key" in options:
            raise FilterOptionError("key", "HS256 uses a shared secret: give 'secret: FILE', not 'key'")
        name, load = "secret", tickets.load_secret
    else:
        if "secret" in options:
            raise FilterOptionError("secret", f"{algorithm} uses a PEM key file: give 'key: FILE', not 'secret'")
        name = "key"

        def load(path: str) -> Any:
            return (tickets.load_verifying_key if verify else tickets.load_signing_key)(algorithm, path)

    if name not in options:
        raise FilterOptionError(name, f"required for {algorithm} (a file path)")
    if verify:
        # A list while a key is rotated: a ticket is good if any of them verifies it.
        return o.get(name, lambda raw: [load(text(p)) for p in _paths(raw)], None)
    return o.get(name, lambda raw: load(text(raw)), None)


def _paths(raw: Any) -> list[Any]:
    if isinstance(raw, list):
        if not raw:
            raise ValueError("expected a file path or a non-empty list of them")
        return raw
    return [raw]


class TicketFilter(Filter):
    """`from_options` returns the mode's subclass, so each hook has one job."""

    name = "ticket"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TicketFilter:
        o = Options(options)
        if "mode" not in options:
            raise FilterOptionError("mode", "required option is missing (issue or verify)")
        if "algorithm" not in options:
            raise FilterOptionError("algorithm", f"required option is missing ({', '.join(tickets.ALGORITHMS)})")
        mode = o.get("mode", one_of(MODES), "")
        algorithm = o.get("algorithm", one_of(tickets.ALGORITHMS), "")
        key = _key_options(o, options, algorithm, verify=mode == "verify")
        header = o.get("header", header_name, DEFAULT_HEADER.encode())
        if mode == "issue":
            ttl = o.get("ttl", _ttl, DEFAULT_TTL)
            audience = o.get("audience", text, None)
            service = o.get("service", text, None)
            o.done()
            return IssueTicket(algorithm, key, header, ttl, audience, service)
        audiences = o.get("audience", _audiences, None)
        leeway = o.get("leeway", parse_duration, tickets.DEFAULT_LEEWAY)
        actions = {f: o.get(f"on_{f}", one_of(ACTIONS), "deny") for f in tickets.FAILURES}
        log_interval = o.get("log_interval", parse_duration, DEFAULT_INTERVAL)
        o.done()
        return VerifyTicket(algorithm, key, header, audiences, leeway, actions, log_interval)


class IssueTicket(TicketFilter):
    def __init__(
        self, algorithm: str, key: Any, header: bytes, ttl: float, audience: str | None, service: str | None
    ) -> None:
        self.header = header
        self.audience = audience
        self._service = service
        self._args = (algorithm, key, ttl)
        self.issuer = tickets.TicketIssuer(algorithm, key, service or "meshproxy", ttl)

    def bind(self, context: FilterContext) -> None:
        service = self._service or context.node_service
        algorithm, key, ttl = self._args
        self.issuer = tickets.TicketIssuer(algorithm, key, service, ttl, unit=context.node_unit or None)

    async def on_request(self, call: Call) -> Continue | Respond:
        audience = self.audience or destination_service(call.authority)
        token = self.issuer.token(audience, time.time())
        # For Thrift, call.headers is the call's THeader / TTHeader metadata: a
        # string key that the proxy writes to the upstream header.
        set_header(call.headers, self.header, token.encode("ascii"))
        return CONTINUE


class VerifyTicket(TicketFilter):
    def __init__(
        self,
        algorithm: str,
        key: Any,
        header: bytes,
        audiences: tuple[str, ...] | None,
        leeway: float,
        actions: dict[str, str],
        log_interval: float,
    ) -> None:
        self.header = header
        self.actions = actions
        self._audiences = audiences
        self._args = (algorithm, key, leeway)
        self.verifier = tickets.TicketVerifier(algorithm, key, audiences or ("meshproxy",), leeway)
        self.metrics: Metrics | None = None
        self._log = RateLimitedLog(log, log_interval)
        # Built once: local replies and log fields are the same for every call of a class.
        self._denials = {f: _denial(f, plain_http=False) for f in tickets.FAILURES}
        self._http_denials = {f: _denial(f, plain_http=True) for f in tickets.FAILURES}
        self._log_values = {
            (r, a): {"result": r, "action": a} for r in tickets.RESULTS for a in ACTIONS
        }

    def bind(self, context: FilterContext) -> None:
        self.metrics = context.metrics
        if self._audiences is None:
            algorithm, key, leeway = self._args
            self.verifier = tickets.TicketVerifier(algorithm, key, (context.node_service,), leeway)

    async def on_request(self, call: Call) -> Continue | Respond:
        name = self.header
        token: bytes | None = None
        seen = 0
        for k, v in call.headers:
            if k == name:
                token = v
                seen += 1
        if seen:
            remove_header(call.headers, name)  # the app behind us never sees a ticket
        if seen > 1:
            verdict = tickets.Verdict(tickets.INVALID, detail="more than one ticket")
        else:
            verdict = self.verifier.verify(token, time.time())
        result = verdict.result
        if result == tickets.OK:
            call.principal = verdict.principal
            call.filter_state["ticket"] = verdict
            self._count(call, result, "allow")
            call.log_field("ticket", self._log_values[(result, "allow")])
            return CONTINUE
        action = self.actions[result]
        self._count(call, result, action)
        call.log_field("ticket", self._log_values[(result, action)])
        if action == "deny":
            self._log.log(
                logging.INFO, result, "listener %s: denied a call to %s: service ticket %s (%s)",
                call.listener, call.path, result, verdict.detail,
            )
            return self._http_denials[result] if call.protocol is Protocol.HTTP2 else self._denials[result]
        if action == "dry_run":
            self._log.log(
                logging.WARNING, result, "listener %s: dry run: would deny a call to %s: service ticket %s (%s)",
                call.listener, call.path, result, verdict.detail,
            )
        if result == tickets.EXPIRED:
            # A genuine ticket past its time: the caller is known, and rules on it still apply.
            call.principal = verdict.principal
            call.filter_state["ticket"] = verdict
        return CONTINUE

    def _count(self, call: Call, result: str, action: str) -> None:
        m = self.metrics
        if m is not None:
            m.child(m.ticket_verifications, call.listener, result, action).inc()


def _denial(failure: str, plain_http: bool) -> Respond:
    # RFC 9110 15.5.2: a 401 carries a challenge; gRPC and Thrift callers read their status instead.
    headers = [(b"www-authenticate", b'MeshTicket realm="mesh"')] if plain_http else []
    return Respond(
        status=401,
        message=f"service ticket {failure}",
        grpc_status=status.UNAUTHENTICATED,
        headers=headers,
        reason=f"ticket_{failure}",
    )


def destination_service(authority: str) -> str:
    """The service a call goes to: its authority less any port ("api.comment:8080" ->
    "api.comment"); for Thrift, the authority already is the service."""
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] or authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


__all__ = ["IssueTicket", "TicketFilter", "VerifyTicket", "destination_service"]
