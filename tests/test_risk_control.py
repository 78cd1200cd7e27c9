"""risk_control: the guard, the cache and the options on their own; then end to
end through the real proxy with real peers: a grpcio risk server
(tests/peers/risk_peer.py) that allows, denies, holds and is down, a small
HTTP/2 JSON risk server, grpcio and Apache thrift callers and backends.

No test asserts a duration: "report mode does not wait" is shown by order
(the call is answered while the risk server still holds its check).
"""

from __future__ import annotations

import collections
import functools
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from thrift.Thrift import TApplicationException

from meshproxy import risk
from meshproxy.app import App
from meshproxy.call import BytesBody, Call, EmptyBody, Peer, Protocol
from meshproxy.config import ConfigError, load
from meshproxy.filters import risk_control
from meshproxy.filters.base import CONTINUE, FilterOptionError, Respond
from meshproxy.filters.risk_control import RiskControlFilter
from tests.h2client import H2Client
from tests.harness import (
    HOST,
    eventually,
    listen_port,
    metric,
    start_backend,
    start_proxy,
    write_config,
)
from tests.peers.risk_peer import JsonRiskServer, RiskPolicy, grpc_risk_server
from tests.peers.thrift_peer import ThriftServer, client
from tests.test_grpc_e2e import UNARY, EchoService, grpc_server  # noqa: F401 (fixture)

# -- the guard, on a clock the test moves --------------------------------------------


def test_guard_opens_after_n_failures_then_lets_one_probe_through() -> None:
    g = risk.Guard(failures=3, open_for=10.0)
    for t in range(3):
        assert g.admit(t) == risk.ADMITTED
        g.record(risk.ADMITTED, False, t)
    assert g.is_open
    assert g.admit(5.0) == risk.REFUSED  # open: nothing goes out
    assert g.admit(11.9) == risk.REFUSED  # 2 + 10 not yet reached
    assert g.admit(12.0) == risk.PROBE  # the interval is over: one probe
    assert g.admit(12.6) == risk.REFUSED  # while it is out, the others still fail at once
    g.record(risk.PROBE, False, 13.0)  # the probe failed: open for another interval
    assert g.admit(22.9) == risk.REFUSED
    assert g.admit(23.0) == risk.PROBE
    g.record(risk.PROBE, True, 23.1)  # it worked: closed
    assert not g.is_open and g.admit(23.2) == risk.ADMITTED


def test_guard_success_resets_the_count_and_a_cancelled_probe_frees_the_slot() -> None:
    g = risk.Guard(failures=2, open_for=1.0)
    g.record(risk.ADMITTED, False, 0)
    g.record(risk.ADMITTED, True, 0)  # not consecutive: still closed
    g.record(risk.ADMITTED, False, 0)
    assert not g.is_open
    g.record(risk.ADMITTED, False, 0)
    assert g.admit(1.0) == risk.PROBE
    g.abandon(risk.PROBE)  # the probing call was cancelled: no outcome
    assert g.admit(1.0) == risk.PROBE


# -- the cache -------------------------------------------------------------------------

ALLOW = risk.Verdict("allow")


def test_cache_expires_entries_and_stays_within_its_bound() -> None:
    c = risk.VerdictCache(ttl=10.0, max_entries=3)
    for i in range(5):
        c.put(bytes([i]), ALLOW, now=float(i))
        assert len(c) <= 3
    assert c.get(b"\x00", 5.0) is None and c.get(b"\x01", 5.0) is None  # evicted, oldest first
    assert c.get(b"\x04", 13.9) == ALLOW
    assert c.get(b"\x04", 14.0) is None  # its ttl is over
    c.put(b"\x02", risk.Verdict("deny"), now=20.0)  # expired ones are purged when room is needed
    assert len(c) == 1


def test_cache_key_uses_only_the_chosen_fields() -> None:
    a = risk.CheckRequest(request_id="1", principal="p", path="/a", headers=((b"x-user", b"7"), (b"x-d", b"1")))
    b = risk.CheckRequest(request_id="2", principal="p", path="/a", headers=((b"x-user", b"7"), (b"x-d", b"2")))
    assert risk.cache_key(a, risk.KEY_FIELDS) != risk.cache_key(b, risk.KEY_FIELDS)  # x-d differs
    assert risk.cache_key(a, ("principal", "header:x-user")) == risk.cache_key(b, ("principal", "header:x-user"))
    # A header present with an empty value is not the header absent.
    empty = risk.CheckRequest(headers=((b"x-user", b""),))
    assert risk.cache_key(empty, ("header:x-user",)) != risk.cache_key(risk.CheckRequest(), ("header:x-user",))


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key", "says"), [
    ({}, "cluster", "required"),
    ({"mode": "audit"}, "mode", "enforce, report"),
    ({"timeout": "0s"}, "timeout", "above 0s"),
    ({"timeout": "5 minutes"}, "timeout", "duration"),
    ({"failure_mode": "open"}, "failure_mode", "allow, deny"),
    ({"protocol": "http"}, "protocol", "grpc, json"),
    ({"path": "/x"}, "path", "only with protocol: json"),
    ({"protocol": "json", "path": "x"}, "path", "starting with '/'"),
    ({"headers": ["x-a", ":path"]}, "headers", "[1]"),
    ({"body_bytes": "2MiB"}, "body_bytes", "at most"),
    ({"sample": 1.5}, "sample", "from 0 to 1"),
    ({"cache": {"ttl": "0s"}}, "cache.ttl", "above 0s"),
    ({"cache": {"max_entries": 0}}, "cache.max_entries", "from 1"),
    ({"cache": {"key": ["principal", "colour"]}}, "cache.key", "[1]: unknown field 'colour'"),
    ({"cache": {"key": ["header:x-user"]}}, "cache.key[0]", "not in headers"),
    ({"cache": {"key": ["body"]}}, "cache.key", "body_bytes is 0"),
    ({"cache": {"size": 5}}, "cache.size", "unknown option"),
    ({"report_queue": 0}, "report_queue", "from 1"),
    ({"report_batch": 101}, "report_batch", "from 1 to 100"),
    ({"report_linger": "2s"}, "report_linger", "from 0s to 1s"),
    ({"guard": {"failures": 0}}, "guard.failures", "from 1"),
    ({"guard": {"open_for": "never"}}, "guard.open_for", "duration"),
    ({"retries": 2}, "retries", "unknown option"),
])
def test_bad_options_name_the_key(options: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(FilterOptionError) as e:
        RiskControlFilter.from_options({"cluster": "risk", **options} if options else {})
    assert e.value.key == key and says in e.value.message, (e.value.key, e.value.message)


def test_config_error_has_the_key_path(tmp_path: Path) -> None:
    text = CONFIG.format(direction="egress", protocol="http2", thrift="", match="{prefix: /}", backend=1,
                         risk_cluster=one_endpoint(2),
                         access_log="{enabled: false}",
                         filter="{name: risk_control, cluster: risk, guard: {failures: -1}, cache: {ttl: 1 hour}}")
    with pytest.raises(ConfigError) as e:
        load(str(write_config(tmp_path, text)))
    assert any("listeners[0].filters[0].cache.ttl: expected a duration" in line for line in e.value.lines)


# -- what a check says about a call --------------------------------------------------------


def call_with(headers: list[tuple[bytes, bytes]], body: Any = None, protocol: Protocol = Protocol.GRPC) -> Call:
    return Call(1, protocol, Peer("127.0.0.1:1", identity="spiffe://mesh/sa/web"), "test", "ingress",
                "api.comment:8080", "POST", "/echo.Echo/Unary", headers, body or EmptyBody(), 0.0,
                request_id="rid-1")


class FakeStreamBody:
    """What the proxy hands a filter for HTTP/2: a body with a receive buffer (chunks)."""

    def __init__(self, chunks: list[bytes], ended: bool) -> None:
        self.chunks = collections.deque((c, len(c)) for c in chunks)
        self.ended = ended
        self.trailers = None

    async def read(self) -> bytes:
        raise AssertionError("the filter must not read (and so wait for) the body")

    def release(self) -> None:
        pass


async def test_check_request_fields_and_body_prefix() -> None:
    f = RiskControlFilter.from_options({"cluster": "risk", "headers": ["x-user", "X-Device"], "body_bytes": 6})
    f.listener, f.direction = "test", "ingress"
    headers = [(b"x-user", b"7"), (b"x-mesh-unit", b"u2"), (b"tt.from_service", b"web"), (b"x-other", b"no"),
               (b"x-device", b"d")]
    r = await f.check_request(call_with(headers, FakeStreamBody([b"abcd", b"efgh"], ended=True)))
    assert (r.request_id, r.principal, r.source_service, r.source_unit) == ("rid-1", "spiffe://mesh/sa/web", "web", "u2")
    assert (r.destination_service, r.method, r.path, r.protocol) == ("api.comment", "Unary", "/echo.Echo/Unary", "grpc")
    assert r.headers == ((b"x-user", b"7"), (b"x-device", b"d"))
    assert (r.body, r.body_truncated) == (b"abcdef", True)
    # A body still arriving: what is buffered, flagged; never a wait.
    r = await f.check_request(call_with([], FakeStreamBody([b"ab"], ended=False)))
    assert (r.body, r.body_truncated) == (b"ab", True)
    r = await f.check_request(call_with([], FakeStreamBody([b"abc", b"def"], ended=True)))
    assert (r.body, r.body_truncated) == (b"abcdef", False)
    # Thrift: the message is put back whole for the proxy.
    c = call_with([], BytesBody(b"0123456789"), Protocol.THRIFT)
    r = await f.check_request(c)
    assert (r.body, r.body_truncated) == (b"012345", True) and await c.body.read() == b"0123456789"


async def test_an_unbound_filter_fails_its_checks_by_its_failure_mode() -> None:
    # No cluster (config checks build filters unbound): unavailable -> failure_mode.
    open_ = RiskControlFilter.from_options({"cluster": "risk"})
    c = call_with([])
    assert await open_.on_request(c) is CONTINUE
    assert c.log_fields == {"risk": "fail_open", "risk_reason": "unavailable"}
    closed = RiskControlFilter.from_options({"cluster": "risk", "failure_mode": "deny"})
    verdict = await closed.on_request(call_with([]))
    assert isinstance(verdict, Respond) and verdict.status == 403 and verdict.reason == "risk_failed"


# -- end to end ----------------------------------------------------------------------------

CONFIG = """\
node: {{service: api, unit: u1}}
admin: {{address: "127.0.0.1:0"}}
access_log: {access_log}
listeners:
  - name: test
    direction: {direction}
    address: "127.0.0.1:0"
    protocol: {protocol}{thrift}
    filters:
      - {filter}
    routes:
      - match: {match}
        cluster: backend
clusters:
  - {{name: backend, protocol: {protocol}, endpoints: ["127.0.0.1:{backend}"]}}
  - {risk_cluster}
"""


def one_endpoint(port: int) -> str:
    return json.dumps({"name": "risk", "protocol": "http2", "endpoints": [f"127.0.0.1:{port}"]})


def risk_filter(**options: Any) -> str:
    return json.dumps({"name": "risk_control", "cluster": "risk", "headers": ["x-risk", "x-user"], **options})


async def start(nursery: trio.Nursery, tmp_path: Path, backend: int, risk_port: int, *,
                listener_protocol: str = "http2", access_log: str = "{enabled: false}", direction: str = "ingress",
                risk_cluster: dict[str, Any] | None = None, **options: Any) -> App:
    """The proxy with one listener (risk_control, then a route to `backend`) and the risk cluster
    (`risk_cluster`, else one endpoint: `risk_port`)."""
    thrift = "\n    thrift: {transport: auto}" if listener_protocol == "thrift" else ""
    match = "{}" if listener_protocol == "thrift" else "{prefix: /}"
    text = CONFIG.format(direction=direction, protocol=listener_protocol, thrift=thrift, match=match, backend=backend,
                         risk_cluster=json.dumps(risk_cluster) if risk_cluster else one_endpoint(risk_port),
                         access_log=access_log, filter=risk_filter(**options))
    return await start_proxy(nursery, write_config(tmp_path, text))


def the_filter(app: App) -> RiskControlFilter:
    f = app.listeners["test"].proxy.state.chain.filters[0]
    assert isinstance(f, RiskControlFilter)
    return f


def grpc_calls(port: int, risks: list[str | None], timeout: float = 10.0, user: str = "7") -> list[str]:
    """One unary call per entry (its x-risk header); the reply or the status code's name."""
    out = []
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        for r in risks:
            md = (("x-user", user),) + ((("x-risk", r),) if r is not None else ())
            try:
                out.append(ch.unary_unary(UNARY)(b"hi", metadata=md, timeout=timeout).decode())
            except grpc.RpcError as e:
                out.append(e.code().name)
    return out


def grpc_call_details(port: int, risk_value: str) -> tuple[str, str]:
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        try:
            ch.unary_unary(UNARY)(b"hi", metadata=(("x-risk", risk_value),), timeout=10)
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""
    return "OK", ""


@pytest.fixture
def policy() -> RiskPolicy:
    return RiskPolicy()


@pytest.fixture
def backend(grpc_server: tuple[int, EchoService]) -> int:  # noqa: F811
    """The port of a grpcio echo server (tests/test_grpc_e2e.py) standing for the app."""
    return grpc_server[0]


@pytest.fixture
def risk_server(policy: RiskPolicy) -> Iterator[int]:
    with grpc_risk_server(policy) as (port, _):
        yield port


def verdicts(app: App, verdict: str, mode: str = "enforce") -> float:
    return metric(app, "meshproxy_risk_verdicts_total", listener="test", mode=mode, verdict=verdict)


def failures(app: App, reason: str) -> float:
    return metric(app, "meshproxy_risk_failures_total", listener="test", reason=reason)


async def test_enforce_allows_denies_and_reviews(nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy,
                                                 risk_server: int, backend: int) -> None:
    log_path = tmp_path / "access.log"
    app = await start(nursery, tmp_path, backend, risk_server, access_log=f"{{enabled: true, path: '{log_path}'}}")
    port = listen_port(app)
    got = await trio.to_thread.run_sync(grpc_calls, port, [None, "deny", "review", None])
    assert got == ["hi", "PERMISSION_DENIED", "hi", "hi"]
    assert policy.seen == 4
    assert (verdicts(app, "allow"), verdicts(app, "deny"), verdicts(app, "review")) == (2, 1, 1)
    # The reason code goes to the access log, never to the caller.
    code, details = await trio.to_thread.run_sync(grpc_call_details, port, "deny")
    assert code == "PERMISSION_DENIED" and "test_deny" not in details and details == "denied by risk control"

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []

    await eventually(lambda: len(logged()) == 5, timeout=5)
    denied = [e for e in logged() if e.get("risk") == "deny"]
    assert len(denied) == 2 and all(e["risk_reason"] == "test_deny" and e["reason"] == "risk_denied" for e in denied)
    assert [e.get("risk_reason") for e in logged() if e.get("risk") == "review"] == ["test_review"]
    assert metric(app, "meshproxy_risk_check_seconds_count", listener="test") == 5


async def test_the_check_carries_the_call(nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy,
                                          risk_server: int) -> None:
    origin = await start_backend(nursery)
    app = await start(nursery, tmp_path, origin.port, risk_server, body_bytes=8)
    h2 = await H2Client.connect(listen_port(app))
    sid = h2.request("/echo", "POST", [(b"x-request-id", b"req-42"), (b"x-user", b"7"), (b"x-mesh-unit", b"u9"),
                                       (b"x-secret", b"not sent")], end=False)
    h2.conn.send_data(sid, b"0123456789abcdef", end_stream=True)
    await h2.flush()  # headers and body in one write: the body is buffered when the filter runs
    status, _, body, _ = await h2.response(sid)
    assert (status, body) == (200, b"0123456789abcdef")
    (r,) = policy.requests
    assert (r.request_id, r.source_unit, r.destination_service, r.method, r.path, r.protocol) == (
        "req-42", "u9", "test.local", "POST", "/echo", "http2")
    assert [(h.name, h.value) for h in r.headers] == [("x-user", b"7")]
    assert (r.body, r.body_truncated, r.listener, r.direction, r.mode) == (b"01234567", True, "test", "ingress",
                                                                         "enforce")
    await h2.aclose()


@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
async def test_a_slow_risk_service_times_out_into_the_failure_mode(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int,
    backend: int, failure_mode: str,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, timeout="200ms", failure_mode=failure_mode)
    got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), ["hold"])
    assert got == (["hi"] if failure_mode == "allow" else ["PERMISSION_DENIED"])
    assert policy.answered == 0  # the check was still held when the call got its answer
    assert failures(app, "timeout") == 1
    counter = "meshproxy_risk_fail_open_total" if failure_mode == "allow" else "meshproxy_risk_fail_closed_total"
    assert metric(app, counter, listener="test") == 1


@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
async def test_a_stopped_risk_service_is_unavailable(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, backend: int,
    failure_mode: str,
) -> None:
    with grpc_risk_server(policy) as (risk_port, server):
        app = await start(nursery, tmp_path, backend, risk_port, failure_mode=failure_mode, timeout="2s")
        port = listen_port(app)
        assert await trio.to_thread.run_sync(grpc_calls, port, ["deny"]) == ["PERMISSION_DENIED"]
        server.stop(0).wait()
        got = await trio.to_thread.run_sync(grpc_calls, port, [None, None])
    assert got == (["hi", "hi"] if failure_mode == "allow" else ["PERMISSION_DENIED"] * 2)
    assert failures(app, "unavailable") == 2


async def test_the_guard_stops_calling_a_hanging_service(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    policy.hold_all = True
    app = await start(nursery, tmp_path, backend, risk_server, timeout="100ms",
                      guard={"failures": 2, "open_for": "60s"})
    got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), [None] * 8)
    assert got == ["hi"] * 8
    # Two checks reached the service and timed out; the guard answered the other six at once.
    assert policy.seen == 2
    assert (failures(app, "timeout"), failures(app, "guard_open")) == (2, 6)
    assert metric(app, "meshproxy_risk_fail_open_total", listener="test") == 8


@contextmanager
def and_a_hanging_endpoint(good_port: int) -> Iterator[tuple[RiskPolicy, dict[str, Any]]]:
    """A second grpcio risk server, holding every check, and a round-robin risk cluster of
    both endpoints that ejects one after two gateway errors in a row."""
    hanging = RiskPolicy()
    hanging.hold_all = True
    with grpc_risk_server(hanging) as (hanging_port, _):
        yield hanging, {"name": "risk", "protocol": "http2", "lb": "round_robin",
                        "endpoints": [f"127.0.0.1:{good_port}", f"127.0.0.1:{hanging_port}"],
                        "outlier": {"consecutive_errors": 2, "base_ejection": "60s"}}


def ejections(app: App) -> float:
    return metric(app, "meshproxy_outlier_ejections_total", destination_service="risk", reason="consecutive_errors")


async def test_a_hanging_endpoint_of_the_risk_cluster_is_ejected(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """Checks tell the risk cluster's outlier detection when they get no answer: with the good
    endpoint answering every other check the guard never opens, so ejection is what helps."""
    with and_a_hanging_endpoint(risk_server) as (hanging, cluster):
        app = await start(nursery, tmp_path, backend, 0, risk_cluster=cluster, timeout="100ms", failure_mode="deny",
                          guard={"failures": 3})
        got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), [None] * 10)
    assert got.count("PERMISSION_DENIED") == 2  # the hanging endpoint's two timeouts; then it is out
    assert got[-5:] == ["hi"] * 5
    assert (hanging.seen, policy.seen) == (2, 8)
    assert ejections(app) == 1
    assert not the_filter(app).guard.is_open


async def test_a_hanging_endpoint_is_ejected_when_callers_deadlines_cut_its_checks(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """The same with `timeout` above the callers' deadlines: the call's end cancels the check,
    and outlier detection must hear of it all the same."""
    with and_a_hanging_endpoint(risk_server) as (hanging, cluster):
        app = await start(nursery, tmp_path, backend, 0, risk_cluster=cluster, timeout="1s", guard={"failures": 3})
        port = listen_port(app)
        got = []
        for _ in range(8):
            got += await trio.to_thread.run_sync(lambda: grpc_calls(port, [None], timeout=0.3))
            cut = got.count("DEADLINE_EXCEEDED")
            await eventually(lambda cut=cut: failures(app, "timeout") == cut)  # the proxy saw it end
    assert got.count("DEADLINE_EXCEEDED") == 2 and got[-4:] == ["hi"] * 4
    assert hanging.seen == 2 and ejections(app) == 1


async def test_a_check_the_calls_deadline_cut_short_early_does_not_trip_the_guard(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, timeout="10s", guard={"failures": 1})
    port = listen_port(app)
    # The caller allows 300ms, under a tenth of the filter's 10s: too short to say the service is down.
    assert await trio.to_thread.run_sync(lambda: grpc_calls(port, ["hold"], timeout=0.3)) == ["DEADLINE_EXCEEDED"]
    assert not the_filter(app).guard.is_open
    assert await trio.to_thread.run_sync(grpc_calls, port, ["deny"]) == ["PERMISSION_DENIED"]  # still asked
    assert policy.seen == 2
    assert failures(app, "timeout") == 1  # a timeout all the same, in the metrics


async def test_checks_the_calls_deadline_cuts_count_against_the_guard_when_they_had_time(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """Callers whose deadlines are shorter than `timeout` must not each wait for a hanging service."""
    policy.hold_all = True
    log_path = tmp_path / "access.log"
    app = await start(nursery, tmp_path, backend, risk_server, timeout="1s", failure_mode="deny",
                      guard={"failures": 2, "open_for": "60s"}, access_log=f"{{enabled: true, path: '{log_path}'}}")
    port = listen_port(app)
    # 300ms is above a tenth of 1s: two cut checks open the guard, and the next calls fail closed at once.
    for n in (1, 2):
        assert await trio.to_thread.run_sync(lambda: grpc_calls(port, [None], timeout=0.3)) == ["DEADLINE_EXCEEDED"]
        await eventually(lambda n=n: failures(app, "timeout") == n)  # the proxy saw the call end (after its caller)
    got = await trio.to_thread.run_sync(lambda: grpc_calls(port, [None] * 2, timeout=0.3))
    assert got == ["PERMISSION_DENIED"] * 2
    assert policy.seen == 2
    assert (failures(app, "timeout"), failures(app, "guard_open")) == (2, 2)
    assert metric(app, "meshproxy_risk_check_seconds_count", listener="test") == 2

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []

    await eventually(lambda: len(logged()) == 4, timeout=5)
    assert [e.get("risk_reason") for e in logged()] == ["timeout", "timeout", "guard_open", "guard_open"]


async def test_the_cache_answers_identical_calls(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server,
                      cache={"ttl": "60s", "key": ["principal", "path", "header:x-risk", "header:x-user"]})
    port = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_calls, port, [None, None, "deny", "deny"]) == [
        "hi", "hi", "PERMISSION_DENIED", "PERMISSION_DENIED"]
    assert policy.seen == 2  # the second of each pair came from the cache
    assert await trio.to_thread.run_sync(lambda: grpc_calls(port, [None], user="8")) == ["hi"]  # another key
    assert policy.seen == 3
    hits = metric(app, "meshproxy_risk_cache_lookups_total", listener="test", result="hit")
    assert (hits, metric(app, "meshproxy_risk_cache_lookups_total", listener="test", result="miss")) == (2, 3)
    assert verdicts(app, "deny") == 2  # cached verdicts count as verdicts


async def test_report_mode_answers_the_call_while_the_check_is_held(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s")
    port = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_calls, port, ["hold"]) == ["hi"]
    # The check reaches the service, which holds it: the call was answered before any verdict.
    await eventually(lambda: policy.seen == 1, timeout=5)
    assert policy.answered == 0 and verdicts(app, "allow", "report") == 0
    # A deny in report mode is counted, not enforced.
    assert await trio.to_thread.run_sync(grpc_calls, port, ["deny"]) == ["hi"]
    await eventually(lambda: verdicts(app, "deny", "report") == 1, timeout=5)
    policy.release.set()
    await eventually(lambda: verdicts(app, "allow", "report") == 1, timeout=5)
    assert metric(app, "meshproxy_risk_fail_open_total", listener="test") == 0


async def test_report_mode_drops_checks_when_its_queue_is_full(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    policy.hold_all = True
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_queue=1, report_concurrency=1)
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), [None] * 5) == ["hi"] * 5
    dropped = metric(app, "meshproxy_risk_report_dropped_total", listener="test")
    assert dropped >= 2  # one check in flight, one queued: the rest had no room
    policy.release.set()
    f = the_filter(app)
    with trio.fail_after(10):
        await f.reports_sent()
    assert policy.seen + dropped == 5 and verdicts(app, "allow", "report") == policy.seen


async def test_report_mode_bounds_the_body_bytes_of_checks_being_sent_too(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The byte budget covers body prefixes in a batch on its way, not only those queued: else
    report_concurrency x report_batch x body_bytes could be held past it."""
    message = 7  # the gRPC message of b"hi": a 5-byte prefix and 2 bytes
    monkeypatch.setattr(risk_control, "MAX_REPORT_QUEUE_BYTES", 2 * message)
    policy.hold_all = True
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s", body_bytes=64,
                      report_queue=100, report_concurrency=4, report_batch=1, report_linger="0s")
    port = listen_port(app)
    for _ in range(2):
        assert await trio.to_thread.run_sync(grpc_calls, port, [None]) == ["hi"]
        await eventually(lambda: the_filter(app)._reporter.queue == collections.deque(), timeout=5)
    await eventually(lambda: policy.seen == 2, timeout=5)  # both in flight, held by the service
    assert await trio.to_thread.run_sync(grpc_calls, port, [None]) == ["hi"]
    assert metric(app, "meshproxy_risk_report_dropped_total", listener="test") == 1
    policy.release.set()
    with trio.fail_after(10):
        await the_filter(app).reports_sent()
    assert policy.seen == 2 and the_filter(app)._reporter.held_bytes == 0


async def test_report_mode_sends_a_burst_with_several_senders(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """Checks queued together are sent by up to report_concurrency senders at once, not one."""
    policy.hold_all = True
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_queue=100, report_concurrency=4, report_batch=1)

    def burst() -> list[str]:
        with grpc.insecure_channel(f"{HOST}:{listen_port(app)}") as ch:
            futures = [ch.unary_unary(UNARY).future(b"hi", timeout=10) for _ in range(12)]
            return [f.result().decode() for f in futures]

    assert await trio.to_thread.run_sync(burst) == ["hi"] * 12
    # Every sender holds one check at the held service: four in flight.
    await eventually(lambda: policy.seen == 4, timeout=5)
    policy.release.set()
    f = the_filter(app)
    with trio.fail_after(10):
        await f.reports_sent()
    assert policy.seen == 12 and verdicts(app, "allow", "report") == 12


async def test_a_burst_after_a_quiet_spell_wakes_the_parked_sender_and_starts_more(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """Submits in one scheduler tick: a parked sender is woken once; the others start new senders."""
    policy.hold_all = True
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_queue=100, report_concurrency=4, report_batch=1, report_linger="0s")
    f = the_filter(app)
    reporter = f._reporter
    assert reporter is not None
    policy.release.set()  # the first check is answered at once: its sender then parks, idle
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), [None]) == ["hi"]
    await eventually(lambda: policy.answered == 1 and reporter.in_flight == 0, timeout=5)
    assert reporter.senders == 1
    from meshproxy.codec.risk import CheckRequest

    request = CheckRequest(request_id="burst", path=UNARY, mode="report")
    for _ in range(8):  # no await in between: one tick
        reporter.submit(request, None)
    assert reporter.senders == 4
    with trio.fail_after(10):
        await f.reports_sent()
    assert policy.seen == 9


async def report_calls(app: App, risks: list[str | None]) -> None:
    """Calls with these x-risk values (each answered at once), then every report sent."""
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), risks) == ["hi"] * len(risks)
    with trio.fail_after(10):
        await the_filter(app).reports_sent()


async def test_report_mode_sends_a_batch_of_checks_together(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    """One sender, a batch of 4: the four checks are in the service at the same time (a barrier
    of 4 there answers only then), so they went out together, not one after another."""
    policy.gather = threading.Barrier(4)
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_concurrency=1, report_batch=4, report_linger="1s")
    await report_calls(app, [None, "deny", None, "review"])
    assert (policy.seen, policy.ungathered) == (4, 0)
    assert [verdicts(app, v, "report") for v in ("allow", "deny", "review")] == [2, 1, 1]
    assert failures(app, "unavailable") == failures(app, "timeout") == 0


async def test_report_mode_batches_fall_back_to_one_by_one_while_the_guard_is_open(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_concurrency=1, report_batch=4, report_linger="0.2s", guard={"failures": 1, "open_for": "1h"})
    await report_calls(app, ["fail"])
    assert the_filter(app).guard.is_open
    await report_calls(app, [None] * 3)
    assert policy.seen == 1 and failures(app, "guard_open") == 3


async def test_a_late_check_in_a_batch_times_out_alone(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="500ms",
                      report_concurrency=1, report_batch=3, report_linger="1s", guard={"failures": 1, "open_for": "1h"})
    await report_calls(app, [None, "hold", "deny"])
    policy.release.set()
    assert [verdicts(app, v, "report") for v in ("allow", "deny")] == [1, 1]
    assert failures(app, "timeout") == 1
    assert not the_filter(app).guard.is_open  # the batch got verdicts: one attempt, a success


async def test_a_half_open_guard_probes_with_one_check_then_sends_the_rest_together(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, mode="report", timeout="10s",
                      report_concurrency=1, report_batch=3, report_linger="1s",
                      guard={"failures": 1, "open_for": "200ms"})
    await report_calls(app, ["fail"])
    assert the_filter(app).guard.is_open
    await trio.sleep(0.3)  # past open_for: the next check is the probe
    policy.gather = threading.Barrier(2)  # the two after the probe are in the service together
    await report_calls(app, ["solo", None, None])
    assert not the_filter(app).guard.is_open and verdicts(app, "allow", "report") == 3
    assert (failures(app, "guard_open"), policy.seen, policy.ungathered) == (0, 4, 0)


async def test_report_senders_end_after_a_reload_removes_the_filter(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(risk_control, "IDLE_EXIT", 0.05)
    app = await start(nursery, tmp_path, backend, risk_server, mode="report")
    port = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_calls, port, [None, "deny"]) == ["hi", "hi"]
    old = the_filter(app)
    await eventually(lambda: verdicts(app, "deny", "report") == 1, timeout=5)
    text = Path(app.config.source).read_text().replace(risk_filter(mode="report"), '{"name": "headers"}')
    Path(app.config.source).write_text(text)
    assert await app.reload()
    assert await trio.to_thread.run_sync(grpc_calls, port, ["deny"]) == ["hi"]
    assert policy.seen == 2  # the new chain has no risk_control
    reporter = old._reporter
    assert reporter is not None
    await eventually(lambda: reporter.senders == 0, timeout=5)  # idle senders ended by themselves


async def test_sampling_none_sends_no_check(nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy,
                                            risk_server: int, backend: int) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, sample=0)
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), ["deny", "deny"]) == ["hi", "hi"]
    assert policy.seen == 0


async def test_a_reply_without_a_verdict_is_a_bad_reply(
    nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy, risk_server: int, backend: int,
) -> None:
    app = await start(nursery, tmp_path, backend, risk_server, failure_mode="deny")
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), ["bad", "fail"]) == ["PERMISSION_DENIED"] * 2
    assert (failures(app, "bad_reply"), failures(app, "unavailable")) == (1, 1)


async def test_json_mode_against_an_http2_json_server(nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy,
                                                      backend: int) -> None:
    server = JsonRiskServer(policy, path="/risk/v2/check")
    risk_port = await nursery.start(server.serve)
    app = await start(nursery, tmp_path, backend, risk_port, protocol="json", path="/risk/v2/check",
                      failure_mode="deny")
    got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), [None, "deny", "review", "fail"])
    assert got == ["hi", "PERMISSION_DENIED", "hi", "PERMISSION_DENIED"]
    assert [r.method for r in policy.requests] == ["Unary"] * 4  # parsed by json_format: the proto3 JSON mapping
    assert set(server.content_types) == {b"application/json"}
    assert (verdicts(app, "review"), failures(app, "unavailable")) == (1, 1)


async def test_thrift_calls_allowed_and_denied(nursery: trio.Nursery, tmp_path: Path, policy: RiskPolicy,
                                               risk_server: int) -> None:
    with ThriftServer("framed", "binary") as origin:
        app = await start(nursery, tmp_path, origin.port, risk_server, listener_protocol="thrift", body_bytes=64)
        port = listen_port(app)

        def calls() -> list[str]:
            out = []
            for value in (b"ok", b"deny"):
                with client(port, "header", headers={b"x-risk": value}) as c:
                    try:
                        out.append(c.echo(b"hello").decode())
                    except TApplicationException as e:
                        out.append(f"exception: {e.message}")
            return out

        got = await trio.to_thread.run_sync(calls)
    assert got == ["hello", "exception: denied by risk control"]
    first = policy.requests[0]
    assert (first.protocol, first.method, first.path.rpartition("/")[2]) == ("thrift", "echo", "echo")
    assert b"echo" in first.body and [(h.name, h.value) for h in first.headers] == [("x-risk", b"ok")]
    assert verdicts(app, "deny") == 1


def test_an_unknown_cluster_is_a_config_error_and_an_http2_one_is_not(tmp_path: Path) -> None:
    for cluster, says in (("nope", "unknown cluster 'nope'"), ("backend", None)):
        text = CONFIG.format(direction="ingress", protocol="http2", thrift="", match="{prefix: /}", backend=1,
                             risk_cluster=one_endpoint(2),
                             access_log="{enabled: false}", filter=risk_filter(cluster=cluster))
        if says is None:
            load(str(write_config(tmp_path, text)))  # an http2 cluster: fine
            continue
        with pytest.raises(ConfigError) as e:
            load(str(write_config(tmp_path, text)))
        assert f"listeners[0].filters[0].cluster: {says}" in "\n".join(e.value.lines)


def h2_risk_cluster(nursery: trio.Nursery, seen: list[int], replies_per_connection: int = 10,
                    **server: Any) -> tuple[risk.RiskClient, Any]:
    """A JSON RiskClient on a cluster (outlier detection: 2 consecutive errors) of one serve_h2
    endpoint, which answers 200 "ok" (a bad reply) unless `server` says otherwise."""
    from prometheus_client import CollectorRegistry

    from meshproxy.config import Cluster as ClusterConfig
    from meshproxy.config import Outlier
    from meshproxy.metrics import Metrics
    from meshproxy.upstream.cluster import Cluster
    from meshproxy.values import parse_address
    from tests.codec.test_unary_h2 import serve_h2

    listener = socket.create_server((HOST, 0))
    listener.setblocking(False)
    nursery.start_soon(functools.partial(serve_h2, listener, replies_per_connection, seen, **server))
    config = ClusterConfig("risk", "http2", (parse_address(f"{HOST}:{listener.getsockname()[1]}"),),
                           outlier=Outlier(consecutive_errors=2))
    cluster = Cluster(config, nursery, Metrics.create(CollectorRegistry()))
    return risk.RiskClient(cluster, "json", "/v1/risk/check", "risk"), cluster


CHECK = risk.CheckRequest(request_id="r", source_service="a", destination_service="b", path="/")


def reasons(outcomes: list[risk.Verdict | risk.RiskFailure]) -> list[str]:
    return [o.reason if isinstance(o, risk.RiskFailure) else o.verdict for o in outcomes]


async def one_connection(client: risk.RiskClient) -> None:
    """One check, so that the batch after it shares that connection (the shared pool would open
    several for a batch that finds none)."""
    with pytest.raises(risk.RiskFailure, match=risk.BAD_REPLY):
        await client.check(CHECK, trio.current_time() + 5)


@pytest.mark.parametrize("path", ["lean", "shared"])
async def test_refused_checks_say_nothing_to_outlier_detection(nursery: trio.Nursery, path: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks the service refused (RST_STREAM REFUSED_STREAM: not processed), here the first time
    and again when they are sent once more, do not count as gateway errors."""
    if path == "shared":
        monkeypatch.setattr(risk, "LEAN_MAX_BUSY", 0)
    everything = frozenset((c, s) for c in range(1, 8) for s in range(1, 16, 2))
    client, cluster = h2_risk_cluster(nursery, [], refuse=everything)
    outcomes = await client.check_many([CHECK] * 3, trio.current_time() + 5)
    assert reasons(outcomes) == [risk.UNAVAILABLE] * 3
    assert not cluster.pools[0].ejected(trio.current_time())  # six refusals, no gateway error
    await cluster.close(1)


async def test_a_refused_check_sent_again_and_held_past_its_deadline_is_a_timeout(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(risk, "LEAN_MAX_BUSY", 0)
    client, cluster = h2_risk_cluster(nursery, [], refuse=frozenset({(1, 3)}), hold=frozenset({(1, 5)}))
    await one_connection(client)
    assert reasons(await client.check_many([CHECK], trio.current_time() + 0.3)) == [risk.TIMEOUT]
    await cluster.close(1)


async def test_refused_checks_on_the_shared_connections_are_sent_once_more(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(risk, "LEAN_MAX_BUSY", 0)
    seen: list[int] = []
    client, cluster = h2_risk_cluster(nursery, seen, refuse=frozenset((1, s) for s in (3, 5, 7)))
    await one_connection(client)
    outcomes = await client.check_many([CHECK] * 3, trio.current_time() + 5)
    assert reasons(outcomes) == [risk.BAD_REPLY] * 3  # answered ("ok" is no verdict) the second time
    assert len(seen) == 1 + 3
    await cluster.close(1)


async def concurrent_checks(client: risk.RiskClient, n: int) -> list[risk.Verdict | risk.RiskFailure]:
    outcomes: list[risk.Verdict | risk.RiskFailure] = []

    async def one() -> None:
        try:
            outcomes.append(await client.check(CHECK, trio.current_time() + 5))
        except risk.RiskFailure as e:
            outcomes.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return outcomes


@pytest.mark.parametrize(("path", "checks"), [("lean", "batch"), ("shared", "batch"), ("shared", "concurrent")])
async def test_a_connection_lost_under_several_checks_is_one_gateway_error(
        nursery: trio.Nursery, path: str, checks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server answers one check of three on a connection and closes it: the two it held
    fail, and outlier detection (2 consecutive errors eject) hears of one failure, not two,
    whether the checks were a batch or checks of their own sharing the connection."""
    if path == "shared":
        monkeypatch.setattr(risk, "LEAN_MAX_BUSY", 0)
    client, cluster = h2_risk_cluster(nursery, [], replies_per_connection=2,
                                      hold=frozenset((1, s) for s in (5, 7)))
    await one_connection(client)
    if checks == "batch":
        outcomes = await client.check_many([CHECK] * 3, trio.current_time() + 5)
    else:
        outcomes = await concurrent_checks(client, 3)
    assert sorted(reasons(outcomes)) == [risk.BAD_REPLY, risk.UNAVAILABLE, risk.UNAVAILABLE]
    assert not cluster.pools[0].ejected(trio.current_time())
    await cluster.close(1)


async def test_a_failed_connect_to_send_refused_checks_again_counts_once_per_batch(nursery: trio.Nursery) -> None:
    """Refused checks go once more on a fresh connection; when that connect fails, outlier
    detection hears of it as of any failed connect: once per batch (two batches eject)."""
    client, cluster = h2_risk_cluster(nursery, [], refuse=frozenset((1, s) for s in range(3, 12, 2)))
    await one_connection(client)
    cluster.lean.connect_timeout = 0  # the fresh connections cannot be made
    for ejected in (False, True):
        outcomes = await client.check_many([CHECK] * 2, trio.current_time() + 5)
        assert reasons(outcomes) == [risk.UNAVAILABLE] * 2
        assert cluster.pools[0].ejected(trio.current_time()) is ejected
    await cluster.close(1)


def test_a_malformed_or_too_long_reply_is_a_bad_reply_and_a_reset_is_unavailable() -> None:
    from meshproxy.drivers import unary_h2

    client = risk.RiskClient(None, "json", "/v1/risk/check", "risk")  # type: ignore[arg-type]
    for error, reason in [(unary_h2.MalformedReply(1, "content-length"), risk.BAD_REPLY),
                          (unary_h2.ReplyTooLong(8, "long"), risk.BAD_REPLY),
                          (unary_h2.StreamReset(2, "reset"), risk.UNAVAILABLE)]:
        outcome = client._outcome(unary_h2.Response(ended=True, error=error))
        assert isinstance(outcome, risk.RiskFailure) and outcome.reason == reason
