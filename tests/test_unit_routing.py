"""unit_routing: decisions (sans-IO) and end to end with real gRPC and Thrift backends standing for units."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from meshproxy.call import Call, EmptyBody, Peer, Protocol
from meshproxy.config import ConfigError, load
from meshproxy.filters.base import FilterOptionError
from meshproxy.filters.unit_routing import UnitRoutingFilter
from tests.harness import HOST, listen_port, metric, start_proxy, write_config
from tests.peers.thrift_peer import ThriftServer, client

UNARY = "/echo.Echo/Unary"


def make(**options: Any) -> UnitRoutingFilter:
    base: dict[str, Any] = {"key": {"header": "x-user-id"}, "targets": {"a": "backend-a", "b": "backend-b"}}
    base.update(options)
    return UnitRoutingFilter.from_options(base)


def call_with(headers: list[tuple[bytes, bytes]]) -> Call:
    return Call(1, Protocol.GRPC, Peer("127.0.0.1:1"), "test", "ingress", "svc", "POST", UNARY, headers,
                EmptyBody(), 0.0)


def decide(f: UnitRoutingFilter, key: str | None) -> tuple[object, Call]:
    c = call_with([(b"x-user-id", key.encode())] if key is not None else [])
    coro = f.on_request(c)
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value, c
    raise AssertionError("on_request awaited")


HALVES = [{"unit": "a", "from": 0, "to": 499}, {"unit": "b", "from": 500, "to": 999}]


# -- decisions ----------------------------------------------------------------------------


def test_hash_ranges_split_keys_by_slot_and_always_the_same_way() -> None:
    import zlib

    f = make(hash_ranges=HALVES)
    for uid in ("1", "42", "alice", "10000"):
        want = "backend-a" if zlib.crc32(uid.encode()) % 1000 < 500 else "backend-b"
        assert decide(f, uid)[1].cluster == want
        assert decide(f, uid)[1].cluster == want
    share_a = sum(decide(f, str(i))[1].cluster == "backend-a" for i in range(4000)) / 4000
    assert 0.45 < share_a < 0.55


def test_table_ranges_and_direct() -> None:
    table = make(table={"42": "a", "43": "b"})
    assert decide(table, "42")[1].cluster == "backend-a" and decide(table, "43")[1].cluster == "backend-b"
    ranges = make(ranges=[{"unit": "a", "from": 0, "to": 99}, {"unit": "b", "from": 100, "to": 199}])
    assert [decide(ranges, k)[1].cluster for k in ("0", "99", "100", "199")] == ["backend-a"] * 2 + ["backend-b"] * 2
    direct = make(key={"header": "x-unit"}, mode="direct")
    c = call_with([(b"x-unit", b"b")])
    coro = direct.on_request(c)
    with pytest.raises(StopIteration):
        coro.send(None)
    assert c.cluster == "backend-b"


def test_no_key_gets_a_clear_reply_or_the_default_unit() -> None:
    f = make(table={"42": "a"})
    for key in (None, "7"):  # absent, and a key no unit owns
        verdict, c = decide(f, key)
        assert getattr(verdict, "status", None) == 400 and c.cluster is None
    with_default = make(table={"42": "a"}, default="b")
    verdict, c = decide(with_default, None)
    assert c.cluster == "backend-b" and c.log_fields == {"unit": "b", "unit_reason": "default"}
    ranges = make(ranges=[{"unit": "a", "from": 0, "to": 9}])
    assert getattr(decide(ranges, "x")[0], "status", None) == 400  # not a number


def test_gray_moves_about_the_share_sticky_and_growing() -> None:
    at10 = make(hash_ranges=HALVES, targets={"a": "a1", "b": "b1"},
                gray={"a": {"target": "a2", "percent": 10}})
    at30 = make(hash_ranges=HALVES, targets={"a": "a1", "b": "b1"}, gray={"a": {"target": "a2", "percent": 30}})
    keys = [str(i) for i in range(6000)]
    first = {k: decide(at10, k)[1].cluster for k in keys}
    assert first == {k: decide(at10, k)[1].cluster for k in keys}  # the same keys each time
    in_a = [k for k in keys if first[k] in ("a1", "a2")]
    moved = [k for k in in_a if first[k] == "a2"]
    assert 0.08 < len(moved) / len(in_a) < 0.12
    # Growing the share keeps every key already moved.
    assert all(decide(at30, k)[1].cluster == "a2" for k in moved)
    assert 0.27 < sum(decide(at30, k)[1].cluster == "a2" for k in in_a) / len(in_a) < 0.33


def test_gray_share_does_not_follow_the_unit_slot() -> None:
    """The unit owns 10% of the slots; at 10% gray, about 10% of its keys move (crc32 twice would skew this)."""
    f = make(hash_ranges=[{"unit": "a", "from": 0, "to": 99}, {"unit": "b", "from": 100, "to": 999}],
             gray={"a": {"target": "a2", "percent": 10}})
    picks = [decide(f, f"{i:04d}")[1].cluster for i in range(10_000)]
    in_a = picks.count("backend-a") + picks.count("a2")
    assert 0.075 < picks.count("a2") / in_a < 0.125


class _Pool:
    def __init__(self, up: bool) -> None:
        self.up = up

    def healthy(self, now: float) -> bool:
        return self.up


class _Cluster:
    def __init__(self, up: bool) -> None:
        self.pools = [_Pool(up)]


async def test_a_down_gray_target_keeps_the_unit_before_failing_over() -> None:
    from meshproxy.filters.base import FilterContext

    f = make(table={str(i): "a" for i in range(200)}, gray={"a": {"target": "a2", "percent": 50}},
             fallback={"a": "b"})
    f.bind(FilterContext("test", clusters={"backend-a": _Cluster(True), "backend-b": _Cluster(True),
                                           "a2": _Cluster(False)}))
    picks = {decide(f, str(i))[1].cluster for i in range(200)}
    assert picks == {"backend-a"}  # the gray share's target is down: the unit's own, not unit b


def test_observe_decides_but_changes_nothing() -> None:
    f = make(table={"42": "b"}, observe=True)
    verdict, c = decide(f, "42")
    assert c.cluster is None and c.log_fields == {"unit": "b", "unit_reason": "observe:table"}
    verdict, c = decide(f, None)  # no key: observed, not refused
    assert getattr(verdict, "status", None) is None


@pytest.mark.parametrize(("options", "where", "says"), [
    ({"hash_ranges": [{"unit": "a", "from": 0, "to": 600}, {"unit": "b", "from": 500, "to": 999}]},
     "hash_ranges", "slot 500 is in two ranges"),
    ({"hash_ranges": [{"unit": "c", "from": 0, "to": 9}]}, "hash_ranges", "unit 'c' has no entry in targets"),
    ({"hash_ranges": [{"unit": "a", "from": 0, "to": 1000}]}, "hash_ranges", "outside 0..999"),
    ({"table": {"1": "a"}, "fallback": {"a": "z"}}, "fallback", "unit 'z'"),
    ({"mode": "hash"}, "hash_ranges", "required for mode hash"),
    ({"table": {"1": "a"}, "ranges": [{"unit": "a", "from": 0, "to": 1}]}, "ranges", "not used by mode table"),
    ({"table": {"1": "a"}, "gray": {"a": {"target": "x", "percent": 101}}}, "gray", "from 0 to 100"),
    ({"table": {"1": "a"}, "key": {"header": "x", "metadata": "y"}}, "key", "exactly one"),
    ({"ranges": [{"unit": "a", "from": 0, "to": 10}, {"unit": "b", "from": 5, "to": 20}]}, "ranges", "overlap"),
])
def test_bad_options_name_the_key(options: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(FilterOptionError) as e:
        make(**options)
    assert e.value.key == where and says in e.value.message


def test_config_error_has_the_key_path(tmp_path: Path) -> None:
    text = CONFIG.format(port_a=1, port_b=2, protocol="http2", thrift="", match="{prefix: /}",
                         filter="{name: unit_routing, key: {header: x-user-id}, table: {'1': a}, "
                                "targets: {a: backend-a}, fallback: {a: c}}")
    with pytest.raises(ConfigError) as e:
        load(str(write_config(tmp_path, text)))
    assert "listeners[0].filters[0].fallback: unit 'c' has no entry in targets" in "\n".join(e.value.lines)


def test_clusters_named_by_filters_are_checked(tmp_path: Path) -> None:
    def problems(filter_text: str) -> str:
        text = CONFIG.format(port_a=1, port_b=2, protocol="http2", thrift="", match="{prefix: /}", filter=filter_text)
        with pytest.raises(ConfigError) as e:
            load(str(write_config(tmp_path, text)))
        return "\n".join(e.value.lines)

    unit = problems("{name: unit_routing, key: {header: k}, table: {'1': a}, targets: {a: backend-z}}")
    assert "listeners[0].filters[0].targets.a: unknown cluster 'backend-z'" in unit
    gray = problems("{name: unit_routing, key: {header: k}, table: {'1': a}, targets: {a: backend-a}, "
                    "gray: {a: {target: nope, percent: 5}}}")
    assert "listeners[0].filters[0].gray.a.target: unknown cluster 'nope'" in gray
    assert "listeners[0].filters[0].cluster: unknown cluster 'risk'" in problems("{name: risk_control, cluster: risk}")


def test_a_10000_entry_table_is_one_lookup() -> None:
    table = {str(i): ("a" if i % 2 else "b") for i in range(10_000)}
    f = make(table=table)
    assert decide(f, "9999")[1].cluster == "backend-a" and decide(f, "0")[1].cluster == "backend-b"
    assert f.table is not None and len(f.table) == 10_000


# -- end to end ---------------------------------------------------------------------------

CONFIG = """\
admin: {{address: "127.0.0.1:0"}}
listeners:
  - name: test
    direction: ingress
    address: "127.0.0.1:0"
    protocol: {protocol}{thrift}
    filters:
      - {filter}
    routes:
      - match: {match}
        cluster: backend-a
clusters:
  - {{name: backend-a, protocol: {protocol}, endpoints: ["127.0.0.1:{port_a}"]}}
  - {{name: backend-b, protocol: {protocol}, endpoints: ["127.0.0.1:{port_b}"]}}
"""


@pytest.fixture
def unit_servers() -> Iterator[dict[str, tuple[int, Any]]]:
    """Two gRPC servers, each answering with its unit's name."""
    out = {}
    for unit in ("a", "b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        reply = f"unit-{unit}".encode()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "echo.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx, r=reply: r)}),))
        out[unit] = (server.add_insecure_port(f"{HOST}:0"), server)
        server.start()
    yield out
    for _, server in out.values():
        server.stop(0)


def grpc_units(port: int, keys: list[str | None]) -> list[str]:
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        out = []
        for k in keys:
            md = (("x-user-id", k),) if k is not None else ()
            try:
                out.append(ch.unary_unary(UNARY)(b"", metadata=md, timeout=5).decode())
            except grpc.RpcError as e:
                out.append(e.code().name)
        return out


def filter_line(extra: str = "") -> str:
    return ("{name: unit_routing, key: {header: x-user-id}, table: {'1': a, '2': b, '3': a}, "
            "targets: {a: backend-a, b: backend-b}" + extra + "}")


async def test_grpc_calls_land_on_their_unit(nursery: trio.Nursery, tmp_path: Path,
                                            unit_servers: dict[str, tuple[int, Any]]) -> None:
    text = CONFIG.format(port_a=unit_servers["a"][0], port_b=unit_servers["b"][0], protocol="http2", thrift="",
                         match="{prefix: /}", filter=filter_line())
    app = await start_proxy(nursery, write_config(tmp_path, text))
    got = await trio.to_thread.run_sync(grpc_units, listen_port(app), ["1", "2", "3", "2", None, "9"])
    assert got == ["unit-a", "unit-b", "unit-a", "unit-b", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    decisions = "meshproxy_unit_decisions_total"
    assert metric(app, decisions, listener="test", unit="b", target="backend-b", reason="table") == 2
    assert metric(app, decisions, listener="test", unit="-", target="-", reason="no_key") == 2


async def test_observe_mode_routes_as_if_absent(nursery: trio.Nursery, tmp_path: Path,
                                               unit_servers: dict[str, tuple[int, Any]]) -> None:
    text = CONFIG.format(port_a=unit_servers["a"][0], port_b=unit_servers["b"][0], protocol="http2", thrift="",
                         match="{prefix: /}", filter=filter_line(", observe: true"))
    app = await start_proxy(nursery, write_config(tmp_path, text))
    got = await trio.to_thread.run_sync(grpc_units, listen_port(app), ["1", "2", None])
    assert got == ["unit-a", "unit-a", "unit-a"]  # the route's cluster, every time
    assert metric(app, "meshproxy_unit_decisions_total", listener="test", unit="b", target="backend-b",
                  reason="observe") == 1


async def test_failover_when_a_units_backends_are_down(nursery: trio.Nursery, tmp_path: Path,
                                                      unit_servers: dict[str, tuple[int, Any]]) -> None:
    text = CONFIG.format(port_a=unit_servers["a"][0], port_b=unit_servers["b"][0], protocol="http2", thrift="",
                         match="{prefix: /}", filter=filter_line(", fallback: {a: b, b: a}"))
    app = await start_proxy(nursery, write_config(tmp_path, text))
    port = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_units, port, ["2"]) == ["unit-b"]
    unit_servers["b"][1].stop(0)
    # The first call finds unit b's endpoint gone (and marks it); the next ones fail over to a.
    first = await trio.to_thread.run_sync(grpc_units, port, ["2"])
    assert first in (["UNAVAILABLE"], ["unit-a"])
    assert await trio.to_thread.run_sync(grpc_units, port, ["2", "2"]) == ["unit-a", "unit-a"]
    assert metric(app, "meshproxy_unit_decisions_total", listener="test", unit="a", target="backend-a",
                  reason="failover") >= 2


async def test_thrift_calls_routed_by_a_header_metadata_key(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer("framed", "binary") as unit_a, ThriftServer("framed", "binary") as unit_b:
        text = CONFIG.format(
            port_a=unit_a.port, port_b=unit_b.port, protocol="thrift", thrift="\n    thrift: {transport: auto}",
            match="{}", filter="{name: unit_routing, key: {metadata: uid}, hash_ranges: "
                               "[{unit: a, from: 0, to: 499}, {unit: b, from: 500, to: 999}], "
                               "targets: {a: backend-a, b: backend-b}}")
        app = await start_proxy(nursery, write_config(tmp_path, text))
        port = listen_port(app)
        f = make(key={"metadata": "uid"}, hash_ranges=HALVES)
        keys = [str(i) for i in range(12)]
        expected = {"a": 0, "b": 0}
        for k in keys:
            expected["a" if decide_key(f, b"uid", k) == "backend-a" else "b"] += 1

        def send() -> None:
            for k in keys:
                with client(port, "header", headers={b"uid": k.encode()}) as c:
                    c.note("x")
                    assert c.echo(b"k" + k.encode()) == b"k" + k.encode()  # after the oneway: it has landed

        await trio.to_thread.run_sync(send)

        def counts() -> dict[str, int]:
            out = {}
            for unit, server in (("a", unit_a), ("b", unit_b)):
                with client(server.port) as c:
                    out[unit] = c.notes()
            return out

        assert await trio.to_thread.run_sync(counts) == expected
        assert expected["a"] and expected["b"]


def decide_key(f: UnitRoutingFilter, name: bytes, key: str) -> object:
    c = call_with([(name, key.encode())])
    coro = f.on_request(c)
    with pytest.raises(StopIteration):
        coro.send(None)
    return c.cluster


# -- weighted routes (gray release of a new version) ----------------------------------------

WEIGHTED = CONFIG.replace("        cluster: backend-a\n",
                          "        clusters: [{{name: backend-a, weight: 90}}, {{name: backend-b, weight: 10}}]{sticky}\n")


async def test_weighted_route_splits_calls_and_sticks_on_a_header(
    nursery: trio.Nursery, tmp_path: Path, unit_servers: dict[str, tuple[int, Any]]
) -> None:
    text = WEIGHTED.format(port_a=unit_servers["a"][0], port_b=unit_servers["b"][0], protocol="http2", thrift="",
                           match="{prefix: /}", filter="{name: headers}",
                           sticky="\n        sticky: {header: x-user-id}")
    app = await start_proxy(nursery, write_config(tmp_path, text))
    port = listen_port(app)
    import random

    random.seed(7)  # the unsticky split is random: a fixed seed keeps the bounds from failing by chance
    unsticky = await trio.to_thread.run_sync(grpc_units, port, [None] * 400)
    share_b = unsticky.count("unit-b") / len(unsticky)
    assert 0.05 < share_b < 0.16, share_b
    keys = [f"user{i}" for i in range(300)]
    first = await trio.to_thread.run_sync(grpc_units, port, keys)
    assert await trio.to_thread.run_sync(grpc_units, port, keys) == first  # the same user, the same version
    assert 0.04 < first.count("unit-b") / len(first) < 0.18


def test_sticky_picks_survive_rescaled_weights() -> None:
    from meshproxy.config import Route, RouteMatch
    from meshproxy.router import Router

    def picks(w1: int, w2: int) -> list[str]:
        route = Route("r", RouteMatch(prefix="/"), "", weighted=(("v1", w1), ("v2", w2)), sticky_header="x-user-id")
        router = Router((route,))
        return [router.cluster_for(route, [(b"x-user-id", b"u%d" % i)]) for i in range(2000)]

    assert picks(95, 5) == picks(950, 50)
    moved = sum(a != b for a, b in zip(picks(95, 5), picks(90, 10), strict=True))
    assert 0.02 < moved / 2000 < 0.08  # only the edge moves: about 5% of users, all from v1 to v2


def test_weighted_route_config_errors(tmp_path: Path) -> None:
    def problems(clusters: str, sticky: str = "") -> str:
        text = CONFIG.format(port_a=1, port_b=2, protocol="http2", thrift="", match="{prefix: /}",
                             filter="{name: headers}").replace("        cluster: backend-a\n",
                                                              f"        {clusters}{sticky}\n")
        with pytest.raises(ConfigError) as e:
            load(str(write_config(tmp_path, text)))
        return "\n".join(e.value.lines)

    assert "routes[0].clusters[1]: unknown cluster 'nope'" in problems(
        "clusters: [{name: backend-a, weight: 1}, {name: nope, weight: 1}]")
    assert "routes[0].clusters: the weights add up to 0" in problems("clusters: [{name: backend-a, weight: 0}]")
    assert "routes[0].cluster: give cluster or clusters (with weights), not both" in problems(
        "cluster: backend-a\n        clusters: [{name: backend-b, weight: 1}]")
    assert "routes[0].sticky: only with clusters (weights)" in problems(
        "cluster: backend-a", "\n        sticky: {header: x-user-id}")


async def test_endpoints_tagged_with_a_unit_inside_one_cluster(
    nursery: trio.Nursery, tmp_path: Path, unit_servers: dict[str, tuple[int, Any]]
) -> None:
    pa, pb = unit_servers["a"][0], unit_servers["b"][0]
    text = f"""\
admin: {{address: "127.0.0.1:0"}}
listeners:
  - name: test
    direction: ingress
    address: "127.0.0.1:0"
    filters:
      - {{name: unit_routing, key: {{header: x-user-id}}, table: {{'1': a, '2': b}}, subset: true,
          targets: {{a: backend, b: backend}}, fallback: {{b: a}}}}
    routes:
      - match: {{prefix: /}}
        cluster: backend
clusters:
  - name: backend
    endpoints: [{{address: "127.0.0.1:{pa}", unit: a}}, {{address: "127.0.0.1:{pb}", unit: b}}]
"""
    app = await start_proxy(nursery, write_config(tmp_path, text))
    port = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_units, port, ["1", "2", "2", "1", "2"]) == [
        "unit-a", "unit-b", "unit-b", "unit-a", "unit-b"]
    # Unit b's endpoint goes away: after the call that finds out, b's keys fail over to a's endpoint.
    unit_servers["b"][1].stop(0)
    await trio.to_thread.run_sync(grpc_units, port, ["2"])
    assert await trio.to_thread.run_sync(grpc_units, port, ["2"]) == ["unit-a"]


def test_tagged_endpoint_config_errors(tmp_path: Path) -> None:
    text = CONFIG.format(port_a=1, port_b=2, protocol="http2", thrift="", match="{prefix: /}", filter="{name: headers}")
    text = text.replace('endpoints: ["127.0.0.1:1"]', 'endpoints: [{address: "127.0.0.1:1", zone: x}]')
    with pytest.raises(ConfigError) as e:
        load(str(write_config(tmp_path, text)))
    assert "clusters[0].endpoints[0].zone: unknown key (expected one of: address, unit)" in "\n".join(e.value.lines)


async def test_thrift_endpoints_tagged_with_a_unit(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer("framed", "binary") as unit_a, ThriftServer("framed", "binary") as unit_b:
        text = f"""\
admin: {{address: "127.0.0.1:0"}}
listeners:
  - name: test
    direction: ingress
    address: "127.0.0.1:0"
    protocol: thrift
    thrift: {{transport: auto}}
    filters:
      - {{name: unit_routing, key: {{metadata: uid}}, table: {{'1': a, '2': b}}, subset: true,
          targets: {{a: backend, b: backend}}}}
    routes:
      - match: {{}}
        cluster: backend
clusters:
  - name: backend
    protocol: thrift
    endpoints: [{{address: "127.0.0.1:{unit_a.port}", unit: a}}, {{address: "127.0.0.1:{unit_b.port}", unit: b}}]
"""
        app = await start_proxy(nursery, write_config(tmp_path, text))
        port = listen_port(app)

        def send() -> None:
            for uid, n in ((b"1", 2), (b"2", 3)):
                with client(port, "header", headers={b"uid": uid}) as c:
                    for _ in range(n):
                        c.note("x")
                    assert c.echo(b"done") == b"done"

        def counts() -> list[int]:
            out = []
            for server in (unit_a, unit_b):
                with client(server.port) as c:
                    out.append(c.notes())
            return out

        await trio.to_thread.run_sync(send)
        assert await trio.to_thread.run_sync(counts) == [2, 3]
