"""The `ticket` and `authz` filters as plain async tests (the end-to-end ones with
real peers are tests/test_access_e2e.py): verdicts, actions, counters, rule
matching, and the config errors a user reads."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jwt
import pytest
from prometheus_client import CollectorRegistry

from meshproxy import tickets
from meshproxy.call import Call, EmptyBody, Headers, Peer, Protocol, header_value
from meshproxy.config import ConfigError, FilterOptionError, FilterSpec, load
from meshproxy.filters import build
from meshproxy.filters.authz import AuthzFilter, Decision
from meshproxy.filters.base import CONTINUE, FilterContext, Respond
from meshproxy.filters.ratelog import RateLimitedLog
from meshproxy.filters.ticket import IssueTicket, VerifyTicket, destination_service
from meshproxy.metrics import Metrics
from tests.tickets_keys import write_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_keys(tmp_path_factory.mktemp("keys"))


def make_call(
    path: str = "/echo.Echo/Unary",
    headers: Headers | None = None,
    *,
    protocol: Protocol = Protocol.GRPC,
    authority: str = "api:8080",
    identity: str | None = None,
    method: str = "POST",
) -> Call:
    return Call(
        id=1, protocol=protocol, peer=Peer("127.0.0.1:5555", identity), listener="in", direction="ingress",
        authority=authority, method=method, path=path, headers=list(headers or []), body=EmptyBody(), start=0.0,
    )


def context(service: str = "api", unit: str = "") -> tuple[FilterContext, CollectorRegistry]:
    registry = CollectorRegistry()
    return FilterContext("in", "ingress", service, unit, Metrics.create(registry)), registry


def built(name: str, ctx: FilterContext | None = None, **options: object) -> object:
    return build(FilterSpec(name, tuple(options.items())), ctx)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- ticket ------------------------------------------------------------------------------


def issue(keys: dict[str, Path], **options: object) -> IssueTicket:
    ctx, _ = context(service="frontend", unit="u1")
    f = built("ticket", ctx, mode="issue", algorithm="EdDSA", key=str(keys["ed_key"]), **options)
    assert isinstance(f, IssueTicket)
    return f


def verify(keys: dict[str, Path], **options: object) -> tuple[VerifyTicket, CollectorRegistry]:
    ctx, registry = context()
    f = built("ticket", ctx, mode="verify", algorithm="EdDSA", key=str(keys["ed_pub"]), **options)
    assert isinstance(f, VerifyTicket)
    return f, registry


def token(keys: dict[str, Path], kind: str) -> bytes | None:
    """A ticket of each kind the verifier must sort out."""
    key = tickets.load_signing_key("EdDSA", str(keys["ed_key"]))
    now = time.time()
    if kind == "ok":
        return tickets.TicketIssuer("EdDSA", key, "frontend", 60, unit="u1").token("api", now).encode()
    if kind == "expired":
        return tickets.TicketIssuer("EdDSA", key, "frontend", 60).token("api", now - 120).encode()
    if kind == "bad_signature":
        other = tickets.load_signing_key("EdDSA", str(keys["other_ed_key"]))
        return tickets.TicketIssuer("EdDSA", other, "frontend", 60).token("api", now).encode()
    if kind == "wrong_audience":
        return tickets.TicketIssuer("EdDSA", key, "frontend", 60).token("billing", now).encode()
    if kind == "garbage":
        return b"garbage"
    return None


async def test_issue_attaches_a_ticket_for_the_destination(keys: dict[str, Path]) -> None:
    f = issue(keys)
    call = make_call(headers=[(b"x-mesh-ticket", b"from the app")], authority="api:8080")
    assert await f.on_request(call) is CONTINUE
    values = [v for k, v in call.headers if k == b"x-mesh-ticket"]
    assert len(values) == 1  # the app's own value was replaced
    claims = jwt.decode(values[0], options={"verify_signature": False})
    assert (claims["iss"], claims["sub"], claims["aud"], claims["unit"]) == ("frontend", "frontend", "api", "u1")
    assert claims["exp"] - claims["iat"] == 300
    # Thrift: the authority is the service; the ticket is a metadata key under the configured name.
    f2 = issue(keys, audience="api", header="X-Ticket", ttl="1m", service="spiffe://mesh/sa/web")
    thrift = make_call("/Echo/echo", [(b"tt.to_service", b"Echo")], protocol=Protocol.THRIFT, authority="Echo")
    await f2.on_request(thrift)
    claims = jwt.decode(header_value(thrift.headers, b"x-ticket") or b"", options={"verify_signature": False})
    assert (claims["sub"], claims["aud"], claims["exp"] - claims["iat"]) == ("spiffe://mesh/sa/web", "api", 60)
    # Signed once per audience, reused by the next calls.
    for _ in range(50):
        await f.on_request(make_call(authority="api"))
    assert f.issuer.signed == 1


@pytest.mark.parametrize(
    ("authority", "service"),
    [("api:8080", "api"), ("api", "api"), ("[::1]:80", "[::1]"), ("Echo", "Echo"), ("a:b", "a:b")],
)
def test_destination_service(authority: str, service: str) -> None:
    assert destination_service(authority) == service


async def test_verify_ok_sets_the_principal_and_removes_the_ticket(keys: dict[str, Path]) -> None:
    f, registry = verify(keys)
    call = make_call(headers=[(b"x-mesh-ticket", token(keys, "ok") or b""), (b"x-other", b"1")])
    assert await f.on_request(call) is CONTINUE
    assert call.principal == "frontend"
    assert call.headers == [(b"x-other", b"1")]
    assert call.log_fields == {"ticket": {"result": "ok", "action": "allow"}}
    assert call.filter_state["ticket"].unit == "u1"
    assert sample(registry, "meshproxy_ticket_verifications_total", listener="in", result="ok", action="allow") == 1


KINDS = {"expired": "expired", "bad_signature": "invalid", "wrong_audience": "invalid", "garbage": "invalid", "missing": "missing"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ["deny", "allow", "dry_run"])
async def test_each_failure_class_under_each_action(
    keys: dict[str, Path], kind: str, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    result = KINDS[kind]
    f, registry = verify(keys, **{f"on_{result}": action})
    # The other classes stay at deny: degrading one opens no other.
    assert {r: a for r, a in f.actions.items() if r != result} == {r: "deny" for r in tickets.FAILURES if r != result}
    value = token(keys, kind)
    call = make_call(headers=[(b"x-mesh-ticket", value)] if value is not None else [])
    with caplog.at_level(logging.INFO, logger="meshproxy.filters.ticket"):
        verdict = await f.on_request(call)
    assert b"x-mesh-ticket" not in [k for k, _ in call.headers]
    assert sample(registry, "meshproxy_ticket_verifications_total", listener="in", result=result, action=action) == 1
    assert call.log_fields == {"ticket": {"result": result, "action": action}}
    if action == "deny":
        assert verdict == Respond(401, f"service ticket {result}", 16, [], f"ticket_{result}")
        assert call.principal is None
        return
    assert verdict is CONTINUE
    # Only a genuine (expired) ticket names its caller when let through.
    assert call.principal == ("frontend" if result == "expired" else None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if action == "dry_run":
        assert len(warnings) == 1 and f"would deny a call to /echo.Echo/Unary: service ticket {result}" in warnings[0].getMessage()
    else:
        assert not warnings


async def test_plain_http_denial_carries_a_challenge(keys: dict[str, Path]) -> None:
    f, _ = verify(keys)
    verdict = await f.on_request(make_call("/", protocol=Protocol.HTTP2, method="GET"))
    assert isinstance(verdict, Respond) and verdict.status == 401
    assert verdict.headers == [(b"www-authenticate", b'MeshTicket realm="mesh"')]


async def test_two_tickets_are_invalid(keys: dict[str, Path]) -> None:
    f, registry = verify(keys)
    good = token(keys, "ok") or b""
    verdict = await f.on_request(make_call(headers=[(b"x-mesh-ticket", good), (b"x-mesh-ticket", good)]))
    assert isinstance(verdict, Respond) and verdict.reason == "ticket_invalid"
    assert sample(registry, "meshproxy_ticket_verifications_total", listener="in", result="invalid", action="deny") == 1


async def test_dry_run_logs_are_rate_limited(keys: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    f, registry = verify(keys, on_missing="dry_run", on_invalid="dry_run")
    with caplog.at_level(logging.WARNING, logger="meshproxy.filters.ticket"):
        for _ in range(500):
            await f.on_request(make_call())
            await f.on_request(make_call(headers=[(b"x-mesh-ticket", b"junk")]))
    assert len(caplog.records) == 2  # one per class, not one per call
    assert sample(registry, "meshproxy_ticket_verifications_total", listener="in", result="missing", action="dry_run") == 500
    assert sample(registry, "meshproxy_ticket_verifications_total", listener="in", result="invalid", action="dry_run") == 500


def test_rate_limited_log_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for i in range(30):
            now[0] = i * 0.5  # 15 s of calls
            limited.log(logging.WARNING, "k", "line %d", i)
        limited.log(logging.WARNING, "other", "another kind")
    assert [r.getMessage() for r in caplog.records] == [
        "line 0", "line 20 (and 19 more like it in the last 10s)", "another kind",
    ]


async def test_verify_audience_defaults_to_the_node_service(keys: dict[str, Path]) -> None:
    ctx, _ = context(service="billing")
    f = built("ticket", ctx, mode="verify", algorithm="EdDSA", key=str(keys["ed_pub"]))
    verdict = await f.on_request(make_call(headers=[(b"x-mesh-ticket", token(keys, "ok") or b"")]))  # type: ignore[attr-defined]
    assert isinstance(verdict, Respond) and verdict.reason == "ticket_invalid"  # aud api, not billing
    f2 = built("ticket", ctx, mode="verify", algorithm="EdDSA", key=str(keys["ed_pub"]), audience=["billing", "api"])
    assert await f2.on_request(make_call(headers=[(b"x-mesh-ticket", token(keys, "ok") or b"")])) is CONTINUE  # type: ignore[attr-defined]


# -- authz -------------------------------------------------------------------------------

FRONTEND = "spiffe://mesh/ns/default/sa/frontend"


def authz(rules: list[dict[str, object]], **options: object) -> tuple[AuthzFilter, CollectorRegistry]:
    ctx, registry = context()
    f = built("authz", ctx, rules=rules, **options)
    assert isinstance(f, AuthzFilter)
    return f, registry


def with_principal(principal: str | None, **kw: object) -> Call:
    call = make_call(**kw)  # type: ignore[arg-type]
    call.principal = principal
    return call


async def test_the_contract_example() -> None:
    f, registry = authz(
        [{"name": "allow-frontend", "action": "allow", "principals": [FRONTEND], "paths": ["/echo.Echo/"]}],
        dry_run=False, default="deny",
    )
    ok = with_principal(FRONTEND)
    assert await f.on_request(ok) is CONTINUE
    assert ok.filter_state["authz"] == Decision("allow-frontend", "allow", False)
    assert ok.log_fields == {"authz": {"rule": "allow-frontend", "action": "allow", "dry_run": False}, "principal": FRONTEND}
    denied = with_principal("spiffe://mesh/ns/default/sa/other")
    verdict = await f.on_request(denied)
    assert verdict == Respond(403, "permission denied", 7, [], "authz_denied")
    assert "allow-frontend" not in verdict.message and "default" not in verdict.message
    assert denied.log_fields == {"authz": {"rule": "default", "action": "deny", "dry_run": False},
                                 "principal": "spiffe://mesh/ns/default/sa/other"}
    assert await f.on_request(with_principal(FRONTEND, path="/other.Svc/M")) == verdict
    assert isinstance(await f.on_request(with_principal(None)), Respond)  # no principal at all
    labels = {"listener": "in", "dry_run": "false"}
    assert sample(registry, "meshproxy_authz_decisions_total", rule="allow-frontend", action="allow", **labels) == 1
    assert sample(registry, "meshproxy_authz_decisions_total", rule="default", action="deny", **labels) == 3


async def test_the_mtls_identity_counts_when_no_ticket_named_a_principal() -> None:
    f, _ = authz([{"name": "a", "action": "allow", "principals": [FRONTEND]}])
    assert await f.on_request(make_call(identity=FRONTEND)) is CONTINUE
    # A ticket's principal wins over the peer identity.
    assert isinstance(await f.on_request(with_principal("spiffe://x", identity=FRONTEND)), Respond)


async def test_first_match_wins_and_globs() -> None:
    f, _ = authz([
        {"name": "no-admin", "action": "deny", "paths": [{"prefix": "/admin."}]},
        {"name": "ops", "action": "allow", "principals": ["spiffe://mesh/ns/ops/*"]},
        {"name": "any-sa-web", "action": "allow", "principals": ["spiffe://mesh/ns/*/sa/web"], "paths": [{"exact": "/echo.Echo/Unary"}]},
        {"name": "anyone-authenticated", "action": "allow", "principals": ["*"], "paths": ["/health"]},
    ])
    cases = [
        ("spiffe://mesh/ns/ops/sa/x", "/admin.Admin/Drop", "no-admin"),
        ("spiffe://mesh/ns/ops/sa/x", "/echo.Echo/Unary", "ops"),
        ("spiffe://mesh/ns/dev/sa/web", "/echo.Echo/Unary", "any-sa-web"),
        ("spiffe://mesh/ns/dev/sa/web", "/echo.Echo/Bidi", "default"),  # exact path
        ("spiffe://mesh/ns/dev/sa/webx", "/echo.Echo/Unary", "default"),  # globs match whole strings
        ("spiffe://mesh/ns/a/b/sa/web", "/echo.Echo/Unary", "any-sa-web"),  # '*' spans '/'
        ("anything", "/health", "anyone-authenticated"),
        (None, "/health", "default"),  # '*' needs some principal
        ("anything", "/health/x", "default"),  # no trailing '/': exact
    ]
    for principal, path, rule in cases:
        call = with_principal(principal, path=path)
        await f.on_request(call)
        assert call.filter_state["authz"].rule == rule, (principal, path)


async def test_services_methods_units_and_headers() -> None:
    f, _ = authz([
        {"name": "svc", "action": "allow", "services": ["billing"], "methods": ["Unary"]},
        {"name": "get", "action": "allow", "methods": ["GET"]},
        {"name": "unit", "action": "allow", "source_units": ["u2*"]},
        {"name": "tenant", "action": "allow", "headers": {"x-tenant": ["a", "b*"], "x-env": "prod"}},
    ])

    async def rule(call: Call) -> str:
        await f.on_request(call)
        return str(call.filter_state["authz"].rule)

    assert await rule(make_call(authority="billing:443")) == "svc"  # port ignored
    assert await rule(make_call(authority="billing", path="/echo.Echo/Bidi")) == "default"
    assert await rule(make_call("/x", protocol=Protocol.HTTP2, method="GET")) == "get"
    assert await rule(make_call(headers=[(b"x-mesh-unit", b"u2b")])) == "unit"
    assert await rule(make_call(headers=[(b"x-tenant", b"bee"), (b"x-env", b"prod")])) == "tenant"
    assert await rule(make_call(headers=[(b"x-tenant", b"bee")])) == "default"  # both headers needed
    assert await rule(make_call(headers=[(b"x-tenant", b"c"), (b"x-tenant", b"a"), (b"x-env", b"prod")])) == "tenant"
    # A verified ticket's unit wins over the header anyone can set.
    call = make_call(headers=[(b"x-mesh-unit", b"u2")])
    call.filter_state["ticket"] = tickets.Verdict("ok", "frontend", "u1")
    assert await rule(call) == "default"


async def test_thrift_metadata_and_ttheader_integer_keys() -> None:
    f, _ = authz([
        {"name": "from-web", "action": "allow", "headers": {"tt.from_service": "web*"}, "methods": ["echo"]},
        {"name": "tenant", "action": "allow", "headers": {"X-Tenant": "a"}, "services": ["Echo"]},
    ])

    async def rule(headers: Headers, path: str = "/Echo/echo") -> str:
        call = make_call(path, headers, protocol=Protocol.THRIFT, authority="Echo", method="call")
        await f.on_request(call)
        return str(call.filter_state["authz"].rule)

    assert await rule([(b"tt.from_service", b"web.frontend")]) == "from-web"
    assert await rule([(b"tt.from_service", b"web.frontend")], "/Echo/greet") == "default"
    assert await rule([(b"X-Tenant", b"a")], "/Echo/greet") == "tenant"  # metadata keys matched lower-case
    assert await rule([(b"x-tenant", b"a")], "/Echo/greet") == "tenant"


async def test_dry_run_counts_and_lets_through(caplog: pytest.LogCaptureFixture) -> None:
    f, registry = authz([{"name": "nobody", "action": "deny"}], dry_run=True, default="allow")
    with caplog.at_level(logging.WARNING, logger="meshproxy.filters.authz"):
        for _ in range(100):
            call = with_principal("p")
            assert await f.on_request(call) is CONTINUE
    assert call.filter_state["authz"] == Decision("nobody", "deny", True)
    assert call.log_fields == {"authz": {"rule": "nobody", "action": "deny", "dry_run": True}, "principal": "p"}
    assert sample(registry, "meshproxy_authz_decisions_total", listener="in", rule="nobody", action="deny", dry_run="true") == 100
    assert len(caplog.records) == 1 and "dry run: rule nobody would deny /echo.Echo/Unary" in caplog.records[0].getMessage()


async def test_no_rules_default_deny_and_allow() -> None:
    deny, _ = authz([])
    assert isinstance(await deny.on_request(make_call()), Respond)
    allow, _ = authz([], default="allow")
    assert await allow.on_request(make_call()) is CONTINUE


async def test_unbound_filters_work_without_metrics(keys: dict[str, Path]) -> None:
    f = built("authz", None, rules=[{"name": "a", "action": "allow"}])
    assert await f.on_request(make_call()) is CONTINUE  # type: ignore[attr-defined]
    v = built("ticket", None, mode="verify", algorithm="HS256", secret=str(keys["secret"]), on_missing="allow")
    assert await v.on_request(make_call()) is CONTINUE  # type: ignore[attr-defined]


# -- option errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"rules": [{"name": "a", "action": "permit"}]}, "rules[0].action", "expected allow or deny, got 'permit'"),
        ({"rules": [{"name": "a"}]}, "rules[0].action", "required key is missing (allow or deny)"),
        ({"rules": [{"name": "a", "action": "allow", "principals": ["spiffe://x/[ab]"]}]}, "rules[0].principals[0]",
         "bad pattern 'spiffe://x/[ab]': '*' is the only wildcard ('[' is not allowed)"),
        ({"rules": [{"name": "a", "action": "allow", "services": ["a", "b**"]}]}, "rules[0].services[1]",
         "bad pattern 'b**': '**' (one '*' already matches any run, '/' included)"),
        ({"rules": [{"name": "a", "action": "allow", "paths": ["echo"]}]}, "rules[0].paths[0]",
         "expected a path starting with '/', got 'echo'"),
        ({"rules": [{"name": "a", "action": "allow", "paths": [{"regex": "/x"}]}]}, "rules[0].paths[0]",
         "expected {prefix: PATH} or {exact: PATH}, got {'regex': '/x'}"),
        ({"rules": [{"name": "a", "action": "allow", "principals": []}]}, "rules[0].principals",
         "an empty list matches nothing: leave the field out to match everything"),
        ({"rules": [{"name": "a", "action": "allow", "headers": {"x-a": "?"}}]}, "rules[0].headers.x-a[0]",
         "bad pattern '?': '*' is the only wildcard ('?' is not allowed)"),
        ({"rules": [{"name": "a", "action": "allow", "principal": ["x"]}]}, "rules[0].principal",
         "unknown key (expected: action, headers, methods, name, paths, principals, services, source_units)"),
        ({"rules": [{"name": "a", "action": "allow"}, {"name": "a", "action": "deny"}]}, "rules[1].name",
         "duplicate rule name 'a' (names are metric labels)"),
        ({"rules": [{"name": "default", "action": "allow"}]}, "rules[0].name",
         "'default' names the default action; choose another name"),
        ({"default": "permit"}, "default", "expected allow or deny, got 'permit'"),
        ({"dry_run": "yes"}, "dry_run", "expected true or false, got 'yes'"),
        ({"rules": {"a": 1}}, "rules", "expected a list of rules, got {'a': 1}"),
        ({"rule": []}, "rule", "unknown option (expected: default, dry_run, log_interval, rules, unit_header)"),
    ],
)
def test_authz_option_errors(options: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(FilterOptionError) as info:
        built("authz", **options)
    assert (info.value.key, info.value.message) == (key, message)


def test_ticket_option_errors(keys: dict[str, Path]) -> None:
    ed_key, ed_pub = str(keys["ed_key"]), str(keys["ed_pub"])
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"algorithm": "EdDSA", "key": ed_key}, "mode", "required option is missing (issue or verify)"),
        ({"mode": "issue", "key": ed_key}, "algorithm", "required option is missing (EdDSA, ES256, HS256)"),
        ({"mode": "sign", "algorithm": "EdDSA", "key": ed_key}, "mode", "expected one of issue, verify, got 'sign'"),
        ({"mode": "issue", "algorithm": "RS256", "key": ed_key}, "algorithm",
         "expected one of EdDSA, ES256, HS256, got 'RS256'"),
        ({"mode": "issue", "algorithm": "none", "key": ed_key}, "algorithm",
         "expected one of EdDSA, ES256, HS256, got 'none'"),
        ({"mode": "issue", "algorithm": "EdDSA"}, "key", "required for EdDSA (a file path)"),
        ({"mode": "issue", "algorithm": "EdDSA", "key": "/no/such/key.pem"}, "key",
         "cannot read '/no/such/key.pem': No such file or directory"),
        ({"mode": "issue", "algorithm": "ES256", "key": ed_key}, "key",
         f"'{ed_key}' holds a Ed25519 key; ES256 needs a P-256 (secp256r1) key"),
        ({"mode": "issue", "algorithm": "EdDSA", "key": ed_pub}, "key", "is not an unencrypted PEM private key"),
        ({"mode": "verify", "algorithm": "HS256", "key": ed_key}, "key",
         "HS256 uses a shared secret: give 'secret: FILE', not 'key'"),
        ({"mode": "verify", "algorithm": "HS256", "secret": str(keys["short_secret"])}, "secret",
         "an HS256 secret needs at least 32 bytes, it has 9"),
        ({"mode": "verify", "algorithm": "EdDSA", "secret": ed_key}, "secret",
         "EdDSA uses a PEM key file: give 'key: FILE', not 'secret'"),
        ({"mode": "verify", "algorithm": "EdDSA", "key": ed_pub, "on_expired": "ignore"}, "on_expired",
         "expected one of deny, allow, dry_run, got 'ignore'"),
        ({"mode": "verify", "algorithm": "EdDSA", "key": ed_pub, "ttl": "5m"}, "ttl",
         "unknown option (expected: algorithm, audience, header, key, leeway, log_interval, mode, on_expired, "
         "on_invalid, on_missing)"),
        ({"mode": "issue", "algorithm": "EdDSA", "key": ed_key, "on_missing": "allow"}, "on_missing",
         "unknown option (expected: algorithm, audience, header, key, mode, service, ttl)"),
        ({"mode": "issue", "algorithm": "EdDSA", "key": ed_key, "ttl": "2s"}, "ttl", "a ticket must live at least 10s, got '2s'"),
        ({"mode": "verify", "algorithm": "EdDSA", "key": ed_pub, "audience": []}, "audience",
         "expected an audience or a non-empty list of them, got []"),
        ({"mode": "verify", "algorithm": "EdDSA", "key": ed_pub, "header": "bad header"}, "header",
         "expected a header name, got 'bad header'"),
    ]
    for options, key, message in cases:
        with pytest.raises(FilterOptionError) as info:
            built("ticket", **options)
        assert info.value.key == key, options
        assert message in info.value.message, (options, info.value.message)


def test_config_errors_name_the_key_path(tmp_path: Path) -> None:
    """Golden lines, as the loader prints them."""
    path = tmp_path / "bad.yaml"
    path.write_text("""\
listeners:
  - name: in
    direction: ingress
    address: "127.0.0.1:15006"
    filters:
      - {name: ticket, mode: verify, algorithm: ES256, key: /missing/pub.pem}
      - name: authz
        rules:
          - {name: ok, action: allow, principals: ["spiffe://mesh/*"]}
          - {name: bad, action: reject}
    routes:
      - match: {prefix: /}
        cluster: app
        filters:
          - {name: authz, rules: [{name: r, action: allow, principals: ["a?"]}]}
clusters:
  - {name: app, endpoints: ["127.0.0.1:9000"]}
""")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.lines == [
        f"{path}: listeners[0].filters[0].key: cannot read '/missing/pub.pem': No such file or directory",
        f"{path}: listeners[0].filters[1].rules[1].action: expected allow or deny, got 'reject'",
        f"{path}: listeners[0].routes[0].filters[0].rules[0].principals[0]: bad pattern 'a?': '*' is the only "
        "wildcard ('?' is not allowed)",
    ]


async def test_the_decision_cache_is_bounded_and_keyed_by_what_rules_see(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshproxy.filters import authz as authz_module

    monkeypatch.setattr(authz_module, "DECISION_CACHE_SIZE", 4)
    f, _ = authz([
        {"name": "a", "action": "allow", "principals": ["p*"], "headers": {"x-t": "1"}},
        {"name": "b", "action": "allow", "source_units": ["u9"]},
    ])
    for i in range(20):
        # Same path every time: principal, header and unit decide, and the cache must tell them apart.
        principal = f"p{i}" if i % 2 else f"q{i}"
        call = with_principal(principal, headers=[(b"x-t", b"1"), (b"x-mesh-unit", b"u9" if i % 3 == 0 else b"u1")])
        await f.on_request(call)
        expected = "a" if i % 2 else ("b" if i % 3 == 0 else "default")
        assert call.filter_state["authz"].rule == expected, i
        assert len(f._cache) <= 4


async def test_verify_takes_a_list_of_keys_while_rotating(keys: dict[str, Path]) -> None:
    ctx, _ = context()
    f = built("ticket", ctx, mode="verify", algorithm="EdDSA", key=[str(keys["other_ed_key"]), str(keys["ed_pub"])])
    assert await f.on_request(make_call(headers=[(b"x-mesh-ticket", token(keys, "ok") or b"")])) is CONTINUE  # type: ignore[attr-defined]
    with pytest.raises(FilterOptionError) as info:
        built("ticket", mode="verify", algorithm="EdDSA", key=[str(keys["ed_pub"]), "/no/such.pem"])
    assert (info.value.key, info.value.message) == ("key", "cannot read '/no/such.pem': No such file or directory")
    with pytest.raises(FilterOptionError) as info:
        built("ticket", mode="issue", algorithm="EdDSA", key=[str(keys["ed_key"])])
    assert info.value.key == "key"
