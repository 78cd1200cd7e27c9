"""The filter chain and the built-in filters, as plain async tests.

Calls and responses are built directly (meshproxy/call.py); the "upstream"
is the test itself, between the request and the response hooks. The small
filters below are also what the registry tests load by import path.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from meshproxy.call import Call, EmptyBody, Headers, Peer, Protocol, Response
from meshproxy.codec.h2 import request_problem
from meshproxy.config import FilterOptionError, FilterSpec
from meshproxy.filters import FILTER_TYPES, build, build_chain, resolve
from meshproxy.filters.authz import AuthzFilter
from meshproxy.filters.base import CONTINUE, Chain, Continue, Filter, Options, Respond
from meshproxy.filters.fault import FaultFilter
from meshproxy.filters.headers import HeadersFilter
from meshproxy.filters.mirror import MirrorFilter
from meshproxy.filters.overload import OverloadFilter
from meshproxy.filters.rate_limit import RateLimitFilter
from meshproxy.filters.risk_control import RiskControlFilter
from meshproxy.filters.ticket import TicketFilter
from meshproxy.filters.unit_routing import UnitRoutingFilter


def make_call(headers: Headers | None = None, *, grpc: bool = False) -> Call:
    return Call(
        id=1,
        protocol=Protocol.GRPC if grpc else Protocol.HTTP2,
        peer=Peer("127.0.0.1:5555"),
        listener="egress",
        direction="egress",
        authority="svc.local",
        method="POST" if grpc else "GET",
        path="/echo.Echo/Say" if grpc else "/",
        headers=list(headers or []),
        body=EmptyBody(),
        start=0.0,
    )


def make_response(headers: Headers | None = None) -> Response:
    return Response(status=200, headers=list(headers or []), body=EmptyBody())


class Recorder(Filter):
    """Appends (tag, hook) to a shared log; optionally answers the request locally."""

    name = "recorder"

    def __init__(self, tag: str, log: list[tuple[str, str]], respond: Respond | None = None) -> None:
        self.tag = tag
        self.log = log
        self.respond = respond

    async def on_request(self, call: Call) -> Continue | Respond:
        self.log.append((self.tag, "request"))
        return self.respond or CONTINUE

    async def on_response(self, call: Call, response: Response) -> None:
        self.log.append((self.tag, "response"))


class RequestOnly(Filter):
    name = "request-only"

    def __init__(self, tag: str, log: list[tuple[str, str]]) -> None:
        self.tag = tag
        self.log = log

    async def on_request(self, call: Call) -> Continue | Respond:
        self.log.append((self.tag, "request"))
        return CONTINUE


class ResponseOnly(Filter):
    name = "response-only"

    def __init__(self, tag: str, log: list[tuple[str, str]]) -> None:
        self.tag = tag
        self.log = log

    async def on_response(self, call: Call, response: Response) -> None:
        self.log.append((self.tag, "response"))


async def run(chain: Chain, call: Call, log: list[tuple[str, str]]) -> tuple[Respond | None, Response]:
    """What the proxy does: request hooks, upstream (or the local reply), response hooks."""
    local, ran = await chain.on_request(call)
    if local is None:
        log.append(("upstream", "call"))
        response = make_response([(b"server", b"backend")])
    else:
        response = make_response(local.headers)
        response.status = local.status
    await chain.on_response(call, response, ran)
    return local, response


# ---------------------------------------------------------------------------
# Order and short-circuit


async def test_request_hooks_in_order_response_hooks_in_reverse() -> None:
    log: list[tuple[str, str]] = []
    chain = Chain([Recorder("A", log), Recorder("B", log), Recorder("C", log)])
    local, _ = await run(chain, make_call(), log)
    assert local is None
    assert log == [
        ("A", "request"),
        ("B", "request"),
        ("C", "request"),
        ("upstream", "call"),
        ("C", "response"),
        ("B", "response"),
        ("A", "response"),
    ]


async def test_respond_short_circuits_and_only_filters_that_ran_see_the_response() -> None:
    log: list[tuple[str, str]] = []
    deny = Respond(403, "denied", reason="test")
    chain = Chain([Recorder("A", log), Recorder("B", log, respond=deny), Recorder("C", log)])
    local, response = await run(chain, make_call(), log)
    assert local is deny
    assert response.status == 403
    assert log == [("A", "request"), ("B", "request"), ("B", "response"), ("A", "response")]


async def test_first_filter_responding_leaves_the_rest_untouched() -> None:
    log: list[tuple[str, str]] = []
    chain = Chain([Recorder("A", log, respond=Respond(429)), Recorder("B", log), ResponseOnly("R", log)])
    local, _ = await run(chain, make_call(), log)
    assert local == Respond(429)
    assert log == [("A", "request"), ("A", "response")]


async def test_response_only_filter_after_the_responder_is_skipped_before_it_runs() -> None:
    log: list[tuple[str, str]] = []
    chain = Chain(
        [ResponseOnly("R1", log), Recorder("A", log, respond=Respond(503)), ResponseOnly("R2", log)]
    )
    await run(chain, make_call(), log)
    assert log == [("A", "request"), ("A", "response"), ("R1", "response")]


async def test_mixed_hooks_keep_their_positions() -> None:
    log: list[tuple[str, str]] = []
    chain = Chain([RequestOnly("Q", log), ResponseOnly("R", log), Recorder("A", log)])
    await run(chain, make_call(), log)
    assert log == [
        ("Q", "request"),
        ("A", "request"),
        ("upstream", "call"),
        ("A", "response"),
        ("R", "response"),
    ]


async def test_hooks_a_filter_does_not_override_are_never_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called: list[str] = []

    async def base_on_request(self: Filter, call: Call) -> Continue:
        called.append("request")
        return CONTINUE

    async def base_on_response(self: Filter, call: Call, response: Response) -> None:
        called.append("response")

    # A spy in the base class: every filter that does not override a hook inherits it.
    monkeypatch.setattr(Filter, "on_request", base_on_request)
    monkeypatch.setattr(Filter, "on_response", base_on_response)
    log: list[tuple[str, str]] = []
    chain = Chain([RequestOnly("Q", log), ResponseOnly("R", log)])
    await run(chain, make_call(), log)
    assert called == []
    assert log == [("Q", "request"), ("upstream", "call"), ("R", "response")]


async def test_empty_chain() -> None:
    log: list[tuple[str, str]] = []
    local, _ = await run(Chain([]), make_call(), log)
    assert local is None
    assert log == [("upstream", "call")]


def test_chain_repr_names_its_filters() -> None:
    assert repr(Chain([RequestOnly("Q", []), ResponseOnly("R", [])])) == "<Chain ['RequestOnly', 'ResponseOnly']>"


# ---------------------------------------------------------------------------
# headers


async def test_headers_filter_edits_requests_and_responses() -> None:
    f = HeadersFilter.from_options(
        {
            "request": {
                "set": {"X-Env": "prod", "x-retries": 3},
                "add": {"x-via": "meshproxy"},
                "remove": ["x-debug"],
            },
            "response": {"set": {"x-served-by": "meshproxy"}, "remove": ["server"]},
        }
    )
    chain = Chain([f])
    call = make_call(
        [
            (b"x-env", b"dev"),
            (b"x-debug", b"1"),
            (b"accept", b"*/*"),
            (b"x-env", b"staging"),
            (b"x-via", b"sidecar-a"),
            (b"x-debug", b"2"),
        ]
    )
    local, response = await run(chain, call, [])
    assert local is None
    # remove, then set (in place of the first, the rest dropped), then add.
    assert call.headers == [
        (b"x-env", b"prod"),
        (b"accept", b"*/*"),
        (b"x-via", b"sidecar-a"),
        (b"x-retries", b"3"),
        (b"x-via", b"meshproxy"),
    ]
    assert response.headers == [(b"x-served-by", b"meshproxy")]


async def test_headers_filter_with_no_options_changes_nothing() -> None:
    call = make_call([(b"a", b"1")])
    _, response = await run(Chain([HeadersFilter.from_options({})]), call, [])
    assert call.headers == [(b"a", b"1")]
    assert response.headers == [(b"server", b"backend")]


@pytest.mark.parametrize(
    "options",
    [
        {"request": {"set": {"connection": "close"}}},
        {"request": {"set": {":path": "/x"}}},
        {"request": {"set": {"x-a": "a\r\nb"}}},
        {"request": {"set": {"x-a": True}}},
        {"request": {"remove": "x-a"}},
        {"request": {"sett": {}}},
        {"requests": {}},
        {"request": []},
    ],
)
def test_headers_filter_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(FilterOptionError):
        HeadersFilter.from_options(options)


@pytest.mark.parametrize(
    "options",
    [
        {"request": {"set": {"x env": "1"}}},  # space: not a token character
        {"request": {"add": {"x-caf\u00e9": "1"}}},  # non-ASCII, silently becomes b"x-caf?"
        {"request": {"set": {"x:a": "1"}}},
        {"request": {"set": {"te": "gzip"}}},  # RFC 9113 8.2.2: te may only be "trailers"
        {"request": {"set": {"x-a": " padded"}}},  # RFC 9113 8.2.1: no edge whitespace
        {"response": {"add": {"x-a": "tab\t"}}},
    ],
    ids=["space in name", "non-ascii name", "colon in name", "te gzip", "leading space", "trailing tab"],
)
def test_headers_filter_refuses_edits_that_make_messages_malformed(options: dict[str, Any]) -> None:
    """A config that passes --check must not make every request malformed:
    whatever the filter would write, request_problem (the next hop's check) must accept."""
    with pytest.raises(FilterOptionError):
        f = HeadersFilter.from_options(options)
        # Show what would go out if the options were accepted.
        headers: Headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
        f.request.apply(headers)
        f.response.apply(headers)
        pytest.fail(f"accepted; next hop says: {request_problem(headers)}")


# ---------------------------------------------------------------------------
# fault


def abort_filter(percentage: float, **extra: Any) -> FaultFilter:
    return FaultFilter.from_options(
        {"abort": {"http_status": 503, "grpc_status": 14, "percentage": percentage}, **extra}
    )


async def test_fault_abort_100_percent_answers_with_the_configured_statuses() -> None:
    chain = Chain([abort_filter(100)])
    for grpc in (False, True):
        call = make_call(grpc=grpc)
        local, ran = await chain.on_request(call)
        assert local == Respond(status=503, grpc_status=14, message="fault injected", reason="fault")
        assert ran == 1
        assert call.flags == ["fault"]  # the access log's response_flags


async def test_fault_abort_defaults() -> None:
    local, _ = await Chain([FaultFilter.from_options({"abort": {}})]).on_request(make_call())
    assert local is not None
    assert (local.status, local.grpc_status) == (503, 14)


async def test_fault_abort_0_percent_never_fires() -> None:
    chain = Chain([abort_filter(0)])
    for _ in range(2000):
        call = make_call()
        local, _ = await chain.on_request(call)
        assert local is None and call.flags is None


async def test_fault_abort_fires_about_the_configured_share() -> None:
    chain = Chain([abort_filter(30)])
    hits = 0
    for _ in range(4000):
        local, _ = await chain.on_request(make_call())
        hits += local is not None
    assert 0.25 < hits / 4000 < 0.35  # ~7 standard deviations either way


async def test_fault_delay_sleeps_the_configured_time(autojump_clock: trio.testing.MockClock) -> None:
    chain = Chain([FaultFilter.from_options({"delay": {"duration": "250ms", "percentage": 100}})])
    start = trio.current_time()
    local, _ = await chain.on_request(make_call())
    assert local is None
    assert trio.current_time() - start == pytest.approx(0.25)


async def test_fault_delay_then_abort(autojump_clock: trio.testing.MockClock) -> None:
    f = FaultFilter.from_options(
        {"delay": {"duration": "2s"}, "abort": {"http_status": 500, "grpc_status": 13}}
    )
    start = trio.current_time()
    local, _ = await Chain([f]).on_request(make_call())
    assert trio.current_time() - start == pytest.approx(2.0)
    assert local is not None and (local.status, local.grpc_status) == (500, 13)


async def test_fault_delay_0_percent_does_not_sleep(autojump_clock: trio.testing.MockClock) -> None:
    chain = Chain([FaultFilter.from_options({"delay": {"duration": "5s", "percentage": 0}})])
    start = trio.current_time()
    await chain.on_request(make_call())
    assert trio.current_time() == start


async def test_fault_delay_is_cut_by_the_callers_deadline(autojump_clock: trio.testing.MockClock) -> None:
    chain = Chain([FaultFilter.from_options({"delay": {"duration": "10s"}})])
    start = trio.current_time()
    with trio.move_on_after(1.0):
        await chain.on_request(make_call())
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_fault_header_gate(autojump_clock: trio.testing.MockClock) -> None:
    f = FaultFilter.from_options(
        {"header_gate": "X-Chaos", "delay": {"duration": "1s"}, "abort": {"percentage": 100}}
    )
    chain = Chain([f])
    start = trio.current_time()
    local, _ = await chain.on_request(make_call([(b"user-agent", b"x")]))
    assert local is None
    assert trio.current_time() == start  # not delayed either
    local, _ = await chain.on_request(make_call([(b"x-chaos", b"")]))
    assert local is not None and local.status == 503
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"abort": {"percentage": 150}}, "abort.percentage"),
        ({"abort": {"http_status": 99}}, "abort.http_status"),
        ({"abort": {"grpc_status": 0}}, "abort.grpc_status"),
        ({"delay": {"duration": "soon"}}, "delay.duration"),
        ({"delay": {"duraton": "1s"}}, "delay.duraton"),
        ({"delay": 5}, "delay"),
        ({"header_gate": ""}, "header_gate"),
        ({"abrt": {}}, "abrt"),
    ],
)
def test_fault_bad_options_name_their_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(FilterOptionError) as info:
        FaultFilter.from_options(options)
    assert info.value.key == key


# ---------------------------------------------------------------------------
# The registry


class MyFilter(Filter):
    """A team's own filter, loaded by import path."""

    name = "my-filter"

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MyFilter:
        opts = Options(options)
        greeting = opts.get("greeting", lambda v: str(v).encode(), b"hello")
        opts.done()
        return cls(greeting)

    async def on_request(self, call: Call) -> Continue | Respond:
        call.headers.append((b"x-greeting", self.greeting))
        return CONTINUE


class NotAFilter:
    async def on_request(self, call: Call) -> Continue:
        return CONTINUE


def test_resolve_builtins() -> None:
    assert resolve("headers") is HeadersFilter
    assert resolve("fault") is FaultFilter
    assert resolve("mirror") is MirrorFilter
    assert FILTER_TYPES == {
        "headers": HeadersFilter, "fault": FaultFilter, "mirror": MirrorFilter, "ticket": TicketFilter, "authz": AuthzFilter,
        "unit_routing": UnitRoutingFilter, "risk_control": RiskControlFilter, "rate_limit": RateLimitFilter,
        "overload": OverloadFilter,
    }


def test_resolve_by_import_path() -> None:
    assert resolve("tests.filters.test_chain:MyFilter") is MyFilter


async def test_build_chain_from_specs_passes_options() -> None:
    chain = build_chain(
        (
            FilterSpec("tests.filters.test_chain:MyFilter", (("greeting", "hi"),)),
            FilterSpec("headers", (("request", {"set": {"x-env": "prod"}}),)),
        )
    )
    call = make_call()
    await chain.on_request(call)
    assert call.headers == [(b"x-greeting", b"hi"), (b"x-env", b"prod")]


def test_build_reports_the_filters_own_option_errors() -> None:
    with pytest.raises(FilterOptionError) as info:
        build(FilterSpec("tests.filters.test_chain:MyFilter", (("greting", "hi"),)))
    assert info.value.key == "greting"


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(FilterOptionError) as info:
        resolve("ratelimit")
    assert info.value.key == "name"
    assert info.value.message == (
        "unknown filter 'ratelimit' (built-in: authz, fault, headers, mirror, overload, rate_limit, risk_control, "
        "ticket, unit_routing; or give module:Class)")


@pytest.mark.parametrize(
    "name",
    ["tests.filters.test_chain:NotAFilter", "tests.filters.test_chain:make_call", "tests.filters.test_chain:CONTINUE"],
)
def test_non_filter_is_rejected(name: str) -> None:
    with pytest.raises(FilterOptionError, match=r"is not a meshproxy\.filters\.base\.Filter subclass"):
        resolve(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("tests.filters.nosuch:X", "cannot import filter module 'tests.filters.nosuch'"),
        ("tests.filters.test_chain:Missing", "has no attribute 'Missing'"),
    ],
)
def test_unloadable_import_path(name: str, reason: str) -> None:
    with pytest.raises(FilterOptionError, match=reason):
        resolve(name)
