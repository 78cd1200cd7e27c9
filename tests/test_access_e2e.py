"""Service tickets and authz end to end, with real peers: grpcio clients and
servers, the example h2c backend, Apache thrift servers and hand-written
TTHeader frames, through one or two real meshproxy instances.

Tickets the tests present themselves (expired, signed with another key, for
another audience, garbage) are made with meshproxy/tickets.py and the key
files of tests/tickets_keys.py; the egress -> ingress tests let meshproxy
issue them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from thrift.Thrift import TApplicationException, TMessageType

from meshproxy import tickets
from meshproxy.app import App
from tests import harness
from tests.h2client import H2Client
from tests.peers.gen.echo import Echo
from tests.peers.thrift_peer import ThriftServer, client, decode_reply, encode_call
from tests.test_grpc_e2e import SERVER_STREAM, UNARY, EchoService, grpc_server  # noqa: F401 (fixture)
from tests.test_thrift_e2e import read_frame, ttheader_call, ttheader_reply
from tests.tickets_keys import write_keys

HOST = harness.HOST
FRONTEND = "spiffe://mesh/ns/default/sa/frontend"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 1 << 20)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def servers() -> Sequence[ThriftServer]:
    started: list[ThriftServer] = []
    yield started  # type: ignore[misc]
    for s in started:
        s.stop()


def thrift_server(servers: list[ThriftServer], transport: str) -> ThriftServer:
    s = ThriftServer(transport, "binary")
    s.start()
    servers.append(s)
    return s


def config(
    listeners: str,
    clusters: str,
    *,
    service: str = "api",
    unit: str = "",
    access_log: str = "{enabled: false}",
) -> str:
    node = f'{{service: "{service}", unit: "{unit}"}}' if unit else f'{{service: "{service}"}}'
    return f"""\
node: {node}
admin: {{address: "{HOST}:0"}}
access_log: {access_log}
drain_timeout: 1s
listeners:
{listeners}
clusters:
{clusters}"""


def listener(name: str, direction: str, filters: str, cluster: str, protocol: str = "http2", thrift: str = "") -> str:
    """One listener routing everything to `cluster`; `filters` are YAML list items (no indent)."""
    lines = filters.strip().splitlines()
    filter_text = "    filters:\n" + "".join(f"      {line}\n" for line in lines) if lines else "    filters: []\n"
    match = "{}" if protocol == "thrift" else "{prefix: /}"
    return f"""\
  - name: {name}
    direction: {direction}
    address: "{HOST}:0"
    protocol: {protocol}
{thrift}{filter_text}    routes:
      - match: {match}
        cluster: {cluster}
"""


def cluster(name: str, port: int, protocol: str = "http2", transport: str = "") -> str:
    thrift = f"    thrift: {{transport: {transport}}}\n" if transport else ""
    return f"""\
  - name: {name}
    protocol: {protocol}
{thrift}    endpoints: ["{HOST}:{port}"]
"""


async def start(nursery: trio.Nursery, tmp_path: Path, text: str, name: str) -> App:
    return await harness.start_proxy(nursery, harness.write_config(tmp_path, text, f"{name}.yaml"))


def verify_filter(keys: dict[str, Path], **actions: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in actions.items())
    return f"- {{name: ticket, mode: verify, algorithm: EdDSA, key: '{keys['ed_pub']}'{extra}}}\n"


def make_ticket(keys: dict[str, Path], kind: str, subject: str = FRONTEND, audience: str = "api") -> str | None:
    key = tickets.load_signing_key("EdDSA", str(keys["ed_key"]))
    now = time.time()
    if kind == "ok":
        return tickets.TicketIssuer("EdDSA", key, subject, 60).token(audience, now)
    if kind == "expired":
        return tickets.TicketIssuer("EdDSA", key, subject, 60).token(audience, now - 600)
    if kind == "bad_signature":
        other = tickets.load_signing_key("EdDSA", str(keys["other_ed_key"]))
        return tickets.TicketIssuer("EdDSA", other, subject, 60).token(audience, now)
    if kind == "wrong_audience":
        return tickets.TicketIssuer("EdDSA", key, subject, 60).token("billing", now)
    if kind == "garbage":
        return "eyJ0eXAiOi.garbage.x"
    return None


def grpc_unary(
    port: int, ticket: str | None = None, path: str = UNARY, metadata: Sequence[tuple[str, str]] = (),
    authority: str | None = None,
) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of one unary call through grpcio."""
    md = [*metadata, *([("x-mesh-ticket", ticket)] if ticket is not None else [])]
    options = [*GRPC_OPTIONS, *([("grpc.default_authority", authority)] if authority else [])]
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as ch:
        try:
            ch.unary_unary(path)(b"hi", metadata=md, timeout=5)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


def run(fn: object, *args: object) -> object:
    return trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]


def metrics_text(app: App) -> str:
    return harness.http_get(f"http://{app.admin_address}/metrics")[1].decode()


# -- tickets: every failure class under every action --------------------------------------

KINDS = {"ok": "ok", "expired": "expired", "bad_signature": "invalid", "wrong_audience": "invalid",
         "garbage": "invalid", "missing": "missing"}


@pytest.mark.parametrize("action", ["deny", "allow", "dry_run"])
async def test_each_ticket_failure_class_under_each_action(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, EchoService], keys: dict[str, Path], action: str  # noqa: F811
) -> None:
    grpc_port, service = grpc_server
    filters = verify_filter(keys, on_expired=action, on_invalid=action, on_missing=action)
    app = await start(nursery, tmp_path, config(listener("in", "ingress", filters, "app"), cluster("app", grpc_port)), "in")
    port = harness.listen_port(app, "in")
    for kind, result in KINDS.items():
        code, details = await run(grpc_unary, port, make_ticket(keys, kind))  # type: ignore[misc]
        if result == "ok" or action != "deny":
            assert code == grpc.StatusCode.OK, (kind, details)
            # The app behind the proxy never sees a ticket.
            assert "x-mesh-ticket" not in dict(service.metadata)
        else:
            assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, f"service ticket {result}"), kind
    expected = {"ok": 1, "expired": 1, "invalid": 3, "missing": 1}
    for result, n in expected.items():
        taken = "allow" if result == "ok" else action
        await harness.eventually(lambda r=result, t=taken, n=n: harness.metric(  # type: ignore[misc]
            app, "meshproxy_ticket_verifications_total", listener="in", result=r, action=t) == n)
    # The same counters, as Prometheus scrapes them.
    scraped = {
        (sample.labels["result"], sample.labels["action"]): sample.value
        for family in text_string_to_metric_families(await run(metrics_text, app))  # type: ignore[arg-type]
        for sample in family.samples
        if sample.name == "meshproxy_ticket_verifications_total"
    }
    assert scraped[("invalid", action)] == 3 and scraped[("ok", "allow")] == 1
    denied = 5 if action == "deny" else 0
    assert harness.metric(app, "meshproxy_local_replies_total", listener="in", reason="ticket_invalid") == (3 if denied else 0)


async def test_degrading_one_class_opens_no_other(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, EchoService], keys: dict[str, Path]  # noqa: F811
) -> None:
    grpc_port, _ = grpc_server
    filters = verify_filter(keys, on_expired="allow")
    app = await start(nursery, tmp_path, config(listener("in", "ingress", filters, "app"), cluster("app", grpc_port)), "in")
    port = harness.listen_port(app, "in")
    assert (await run(grpc_unary, port, make_ticket(keys, "expired")))[0] == grpc.StatusCode.OK  # type: ignore[index]
    assert (await run(grpc_unary, port, make_ticket(keys, "bad_signature")))[0] == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]
    assert (await run(grpc_unary, port, None))[0] == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]


# -- egress issues, ingress verifies: two meshproxy instances ------------------------------


async def test_egress_ticket_to_ingress_verify_and_authz(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, EchoService], keys: dict[str, Path]  # noqa: F811
) -> None:
    grpc_port, service = grpc_server
    log_path = tmp_path / "ingress-access.log"
    ingress_filters = verify_filter(keys) + f"""\
- name: authz
  dry_run: false
  default: deny
  rules:
    - {{name: allow-frontend, action: allow, principals: ["{FRONTEND}"], paths: ["{UNARY}"]}}
"""
    ingress = await start(nursery, tmp_path, config(
        listener("in", "ingress", ingress_filters, "app"), cluster("app", grpc_port),
        service="api", access_log=f"{{enabled: true, path: '{log_path}'}}",
    ), "ingress")
    egress_filters = f"- {{name: ticket, mode: issue, algorithm: EdDSA, key: '{keys['ed_key']}', ttl: 1m}}\n"
    egress = await start(nursery, tmp_path, config(
        listener("out", "egress", egress_filters, "ingress"), cluster("ingress", harness.listen_port(ingress, "in")),
        service=FRONTEND, unit="u1",
    ), "egress")
    port = harness.listen_port(egress, "out")
    # The audience is the destination service: the authority less its port.
    for _ in range(3):
        assert await run(grpc_unary, port, None, UNARY, (), "api:8080") == (grpc.StatusCode.OK, "")
    assert "x-mesh-ticket" not in dict(service.metadata)
    assert await run(grpc_unary, port, None, SERVER_STREAM, (), "api:8080") == (
        grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    # Another audience: the ingress (node.service api) refuses the ticket.
    assert await run(grpc_unary, port, None, UNARY, (), "billing") == (
        grpc.StatusCode.UNAUTHENTICATED, "service ticket invalid")
    await harness.eventually(lambda: harness.metric(
        ingress, "meshproxy_authz_decisions_total", listener="in", rule="default", action="deny", dry_run="false") == 1)
    assert harness.metric(ingress, "meshproxy_ticket_verifications_total", listener="in", result="ok", action="allow") == 4
    assert harness.metric(ingress, "meshproxy_ticket_verifications_total", listener="in", result="invalid", action="deny") == 1
    assert harness.metric(ingress, "meshproxy_authz_decisions_total", listener="in", rule="allow-frontend",
                          action="allow", dry_run="false") == 3
    # Signed once per audience and reused, not per call.
    issuer = egress.listeners["out"].proxy.state.chain.filters[0].issuer  # type: ignore[attr-defined]
    assert issuer.signed == 2
    ingress.access_log.flush()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert lines[0]["authz"] == {"rule": "allow-frontend", "action": "allow", "dry_run": False}
    assert lines[0]["ticket"] == {"result": "ok", "action": "allow"} and lines[0]["principal"] == FRONTEND
    denied = next(line for line in lines if line["path"] == SERVER_STREAM)
    assert denied["authz"] == {"rule": "default", "action": "deny", "dry_run": False}
    assert denied["reason"] == "authz_denied" and denied["grpc_status"] == 7


# -- authz on HTTP/2 and gRPC ------------------------------------------------------------


AUTHZ_RULES = """\
- name: authz
  default: deny
  rules:
    - {name: no-bidi, action: deny, paths: [/echo.Echo/Bidi]}
    - {name: frontends, action: allow, principals: ["spiffe://mesh/ns/*/sa/frontend"], paths: ["/echo.Echo/"]}
    - {name: tenant-a, action: allow, headers: {x-tenant: a}}
"""


async def test_authz_by_path_principal_glob_and_header(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, EchoService], keys: dict[str, Path]  # noqa: F811
) -> None:
    grpc_port, _ = grpc_server
    filters = verify_filter(keys, on_missing="allow") + AUTHZ_RULES
    app = await start(nursery, tmp_path, config(listener("in", "ingress", filters, "app"), cluster("app", grpc_port)), "in")
    port = harness.listen_port(app, "in")
    ok, denied = (grpc.StatusCode.OK, ""), (grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    cases = [
        (make_ticket(keys, "ok"), UNARY, (), ok, "frontends"),
        (make_ticket(keys, "ok", "spiffe://mesh/ns/prod/sa/frontend"), UNARY, (), ok, "frontends"),
        (make_ticket(keys, "ok", "spiffe://mesh/ns/prod/sa/backend"), UNARY, (), denied, "default"),
        (make_ticket(keys, "ok"), "/echo.Echo/Bidi", (), denied, "no-bidi"),
        (None, UNARY, (("x-tenant", "a"),), ok, "tenant-a"),
        (None, UNARY, (("x-tenant", "b"),), denied, "default"),
        (None, UNARY, (), denied, "default"),
    ]
    for ticket, path, md, expected, _ in cases:
        if path == "/echo.Echo/Bidi":
            got = await run(grpc_bidi, port, ticket)
        else:
            got = await run(grpc_unary, port, ticket, path, md)
        assert got == expected, (ticket, path, md)
    for rule, action, n in [("frontends", "allow", 2), ("tenant-a", "allow", 1), ("no-bidi", "deny", 1), ("default", "deny", 3)]:
        await harness.eventually(lambda r=rule, a=action, n=n: harness.metric(  # type: ignore[misc]
            app, "meshproxy_authz_decisions_total", listener="in", rule=r, action=a, dry_run="false") == n)
    assert harness.metric(app, "meshproxy_local_replies_total", listener="in", reason="authz_denied") == 4


def grpc_bidi(port: int, ticket: str | None) -> tuple[grpc.StatusCode, str]:
    md = [("x-mesh-ticket", ticket)] if ticket else []
    with grpc.insecure_channel(f"{HOST}:{port}", options=GRPC_OPTIONS) as ch:
        try:
            list(ch.stream_stream("/echo.Echo/Bidi")(iter([b"a", b"b"]), metadata=md, timeout=5))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


async def test_authz_dry_run_counts_but_allows(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, EchoService], keys: dict[str, Path]  # noqa: F811
) -> None:
    grpc_port, _ = grpc_server
    filters = AUTHZ_RULES.replace("- name: authz\n", "- name: authz\n  dry_run: true\n")
    app = await start(nursery, tmp_path, config(listener("in", "ingress", filters, "app"), cluster("app", grpc_port)), "in")
    port = harness.listen_port(app, "in")
    for _ in range(5):
        assert await run(grpc_unary, port) == (grpc.StatusCode.OK, "")
    assert await run(grpc_bidi, port, None) == (grpc.StatusCode.OK, "")
    await harness.eventually(lambda: harness.metric(
        app, "meshproxy_authz_decisions_total", listener="in", rule="default", action="deny", dry_run="true") == 5)
    assert harness.metric(app, "meshproxy_authz_decisions_total", listener="in", rule="no-bidi", action="deny", dry_run="true") == 1
    assert harness.metric(app, "meshproxy_local_replies_total", listener="in", reason="authz_denied") == 0


async def test_plain_http2_gets_401_and_403(nursery: trio.Nursery, tmp_path: Path, keys: dict[str, Path]) -> None:
    backend = await harness.start_backend(nursery)
    filters = verify_filter(keys, on_missing="allow") + """\
- name: authz
  rules:
    - {name: sizes, action: allow, paths: [/size/], methods: [GET]}
"""
    app = await start(nursery, tmp_path, config(listener("in", "ingress", filters, "app"), cluster("app", backend.port)), "in")
    h2 = await H2Client.connect(harness.listen_port(app, "in"))
    try:
        status, _, body, _ = await h2.get("/size/10")
        assert (status, body) == (200, b"x" * 10)
        status, headers, body, _ = await h2.get("/size/10", method="POST")  # methods: [GET]
        assert (status, body) == (403, b"permission denied\n")
        status, headers, body, _ = await h2.get("/size/10", extra=[(b"x-mesh-ticket", b"nope")])
        assert (status, body) == (401, b"service ticket invalid\n")
        assert (b"www-authenticate", b'MeshTicket realm="mesh"') in headers
    finally:
        await h2.aclose()
    assert len(backend.requests) == 1


# -- Thrift --------------------------------------------------------------------------------


def ttheader_exchange(port: int, method: str, strings: dict[bytes, bytes], ints: dict[int, bytes], seqid: int = 5) -> tuple[dict[bytes, bytes], object]:
    """One TTHeader call of Echo.`method`: (the reply's string key/values, the result or exception)."""
    args = Echo.echo_args(data=b"tt") if method == "echo" else Echo.greet_args(name="tt")
    frame = ttheader_call(encode_call(method, args, seqid), seqid, strings, ints)
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(frame)
        _, _, reply_strings, body = ttheader_reply(read_frame(s))
    _, mtype, got_seqid, result = decode_reply(body, method)
    assert got_seqid == seqid
    return reply_strings, (result if mtype == TMessageType.EXCEPTION else result.success)


async def test_thrift_authz_on_ttheader_metadata_and_tickets(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer], keys: dict[str, Path]
) -> None:
    backend = thrift_server(servers, "framed")
    log_path = tmp_path / "access.log"
    filters = verify_filter(keys, on_missing="allow", on_expired="dry_run") + """\
- name: authz
  rules:
    - {name: web-echo, action: allow, headers: {tt.from_service: "web.*"}, methods: [echo]}
    - {name: tenant-a, action: allow, headers: {x-tenant: a}, services: [Echo]}
    - {name: frontend, action: allow, principals: ["spiffe://mesh/ns/*/sa/frontend"]}
"""
    thrift = "    thrift: {transport: auto, service: Echo}\n"
    app = await start(nursery, tmp_path, config(
        listener("in", "ingress", filters, "app", "thrift", thrift), cluster("app", backend.port, "thrift", "framed"),
        access_log=f"{{enabled: true, path: '{log_path}'}}",
    ), "in")
    port = harness.listen_port(app, "in")
    web = {6: b"Echo", 3: b"web.frontend"}  # integer keys: ToService, FromService

    def calls() -> dict[str, object]:
        return {
            "web-echo": ttheader_exchange(port, "echo", {}, web),
            "web-greet": ttheader_exchange(port, "greet", {}, web),  # methods: [echo] only
            "evil": ttheader_exchange(port, "echo", {}, {6: b"Echo", 3: b"evil.web"}),
            "tenant": ttheader_exchange(port, "greet", {b"x-tenant": b"a"}, {}),
            "principal": ttheader_exchange(port, "greet", {b"x-mesh-ticket": (make_ticket(keys, "ok") or "").encode()}, {}),
            "expired": ttheader_exchange(port, "greet", {b"x-mesh-ticket": (make_ticket(keys, "expired") or "").encode()}, {}),
            "garbage": ttheader_exchange(port, "echo", {b"x-mesh-ticket": b"garbage"}, web),
        }

    out: dict[str, tuple[dict[bytes, bytes], object]] = await run(calls)  # type: ignore[assignment]
    assert out["web-echo"][1] == b"tt"
    assert out["tenant"][1] == "hello tt"
    assert out["principal"][1] == "hello tt"
    assert out["expired"][1] == "hello tt"  # dry run: let through, and still the frontend's call
    for name, reason, status in [("web-greet", "permission denied", b"403"), ("evil", "permission denied", b"403"),
                                 ("garbage", "service ticket invalid", b"401")]:
        strings, exc = out[name]
        assert isinstance(exc, TApplicationException), name
        assert (exc.type, exc.message) == (TApplicationException.INTERNAL_ERROR, reason), name
        assert strings == {b"biz-status": status, b"biz-message": reason.encode()}, name
    labels = {"listener": "in", "dry_run": "false"}
    await harness.eventually(lambda: harness.metric(app, "meshproxy_authz_decisions_total", rule="default", action="deny", **labels) == 2)
    assert harness.metric(app, "meshproxy_authz_decisions_total", rule="web-echo", action="allow", **labels) == 1
    assert harness.metric(app, "meshproxy_authz_decisions_total", rule="frontend", action="allow", **labels) == 2
    assert harness.metric(app, "meshproxy_ticket_verifications_total", listener="in", result="expired", action="dry_run") == 1
    app.access_log.flush()
    lines = {json.loads(line)["request_id"]: json.loads(line) for line in log_path.read_text().splitlines()}
    denied = [line for line in lines.values() if line.get("authz", {}).get("action") == "deny"]
    assert sorted(line["path"] for line in denied) == ["/Echo/echo", "/Echo/greet"]
    assert all(line["authz"]["rule"] == "default" and line["reason"] == "authz_denied" for line in denied)


async def test_thrift_egress_ticket_to_ingress_through_ttheader(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer], keys: dict[str, Path]
) -> None:
    """Apache framed client -> egress (issue) -> TTHeader -> ingress (verify, authz) -> THeader -> Apache server."""
    backend = thrift_server(servers, "header")
    ingress_filters = verify_filter(keys) + f"""\
- name: authz
  rules:
    - {{name: frontend, action: allow, principals: ["{FRONTEND}"]}}
"""
    thrift = "    thrift: {transport: auto, service: Echo}\n"
    ingress = await start(nursery, tmp_path, config(
        listener("in", "ingress", ingress_filters, "app", "thrift", thrift), cluster("app", backend.port, "thrift", "header"),
    ), "ingress")
    in_port = harness.listen_port(ingress, "in")

    def issue(service: str) -> str:
        return (f"- {{name: ticket, mode: issue, algorithm: EdDSA, key: '{keys['ed_key']}', audience: api, "
                f"service: '{service}'}}\n")

    egress = await start(nursery, tmp_path, config(
        listener("out", "egress", issue(FRONTEND), "ingress", "thrift", thrift)
        + listener("intruder", "egress", issue("spiffe://mesh/ns/default/sa/intruder"), "ingress", "thrift", thrift),
        cluster("ingress", in_port, "thrift", "ttheader"),
        service="frontend",
    ), "egress")

    def calls() -> tuple[dict[str, str], str]:
        with client(harness.listen_port(egress, "out"), "framed", "binary") as c:
            seen = c.headers()
        with client(harness.listen_port(egress, "intruder"), "framed", "binary") as c:
            try:
                c.echo(b"x")
                refused = "no exception"
            except TApplicationException as e:
                refused = f"{e.type}:{e.message}"
        return seen, refused

    seen, refused = await run(calls)  # type: ignore[misc]
    # The ticket went over TTHeader, was checked and removed; the identity keys went on.
    assert "x-mesh-ticket" not in seen
    assert seen["tt.from_service"] == "frontend" and seen["tt.to_method"] == "headers"
    assert refused == f"{TApplicationException.INTERNAL_ERROR}:permission denied"
    await harness.eventually(lambda: harness.metric(
        ingress, "meshproxy_ticket_verifications_total", listener="in", result="ok", action="allow") == 2)
    assert harness.metric(ingress, "meshproxy_authz_decisions_total", listener="in", rule="frontend", action="allow", dry_run="false") == 1
    assert harness.metric(ingress, "meshproxy_authz_decisions_total", listener="in", rule="default", action="deny", dry_run="false") == 1
