"""Golden error messages: one test per class of config mistake.

Each test writes a small YAML file, loads it, and compares the exact lines a
user would read (``file: key.path: reason``). The CLI is checked the same way
through a real subprocess: exit code 2 and those lines on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import meshproxy
from meshproxy.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parents[1]

LISTENER = """\
  - name: egress
    direction: egress
    address: "127.0.0.1:15001"
    routes:
      - match: {prefix: /}
        cluster: backend
"""
CLUSTERS = """\
clusters:
  - name: backend
    endpoints: ["127.0.0.1:9000"]
"""
GOOD = "listeners:\n" + LISTENER + CLUSTERS


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshproxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> tuple[str, list[str]]:
    """(the file name as the loader prints it, the problem lines)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    lines = info.value.lines
    assert str(info.value) == "\n".join(lines)
    assert all("\n" not in line for line in lines)  # one line per problem
    return str(path), lines


def with_filters(*filters: str) -> str:
    return "listeners:\n" + LISTENER + "    filters:\n" + "".join(filters) + CLUSTERS


def test_the_base_file_is_good(tmp_path: Path) -> None:
    assert isinstance(load(str(write(tmp_path, GOOD))), Config)


# ---------------------------------------------------------------------------
# Cross-references


def test_unknown_cluster_in_route(tmp_path: Path) -> None:
    text = """\
listeners:
  - name: egress
    direction: egress
    address: "127.0.0.1:15001"
    routes:
      - match: {prefix: /api}
        cluster: backend
      - match: {prefix: /}
        cluster: paymnts
clusters:
  - name: backend
    endpoints: ["127.0.0.1:9000"]
  - name: ledger
    endpoints: ["127.0.0.1:9001"]
"""
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: listeners[0].routes[1].cluster: unknown cluster 'paymnts' (known: backend, ledger)"
    ]


def test_unknown_cluster_when_there_are_none(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "listeners:\n" + LISTENER)
    assert lines == [f"{f}: listeners[0].routes[0].cluster: unknown cluster 'backend' (known: none)"]


def test_duplicate_listener_name(tmp_path: Path) -> None:
    second = LISTENER.replace("15001", "15002")
    f, lines = problems(tmp_path, "listeners:\n" + LISTENER + second + CLUSTERS)
    assert lines == [f"{f}: listeners[1].name: duplicate name 'egress'"]


def test_duplicate_cluster_name(tmp_path: Path) -> None:
    extra = "  - name: backend\n    endpoints: ['127.0.0.1:9001']\n"
    f, lines = problems(tmp_path, GOOD + extra)
    assert lines == [f"{f}: clusters[1].name: duplicate name 'backend'"]


def test_duplicate_address(tmp_path: Path) -> None:
    second = LISTENER.replace("name: egress", "name: other")
    f, lines = problems(tmp_path, "listeners:\n" + LISTENER + second + CLUSTERS)
    assert lines == [
        f"{f}: listeners[1].address: address 127.0.0.1:15001 is also used by listener 'egress'"
    ]


def test_port_zero_listeners_may_share_an_address(tmp_path: Path) -> None:
    first = LISTENER.replace("15001", "0")
    second = first.replace("name: egress", "name: other")
    assert len(load(str(write(tmp_path, "listeners:\n" + first + second + CLUSTERS))).listeners) == 2


# ---------------------------------------------------------------------------
# Keys


def test_unknown_top_level_key(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "listners: []\n" + GOOD)
    assert lines == [
        f"{f}: listners: unknown key (expected one of: node, admin, access_log, listeners, "
        "clusters, drain_timeout, shm, mirror)"
    ]


def test_unknown_nested_key(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("{prefix: /}", "{prefix: /, hedaers: []}"))
    assert lines == [
        f"{f}: listeners[0].routes[0].match.hedaers: unknown key (expected one of: prefix, path, headers)"
    ]


def test_unknown_key_in_limits(tmp_path: Path) -> None:
    text = GOOD.replace("direction: egress", "direction: egress\n    http2: {max_streams: 3}")
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: listeners[0].http2.max_streams: unknown key (expected one of: "
        "max_concurrent_streams, max_header_list_size, stream_window, connection_window, "
        "idle_timeout, write_timeout, keepalive_interval, keepalive_timeout)"
    ]


def test_missing_required_key(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("    direction: egress\n", ""))
    assert lines == [f"{f}: listeners[0].direction: required key is missing"]


def test_missing_listeners(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, CLUSTERS)
    assert lines == [f"{f}: listeners: required key is missing"]


def test_missing_route_cluster(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("        cluster: backend\n", ""))
    assert lines == [f"{f}: listeners[0].routes[0].cluster: required key is missing (or clusters, with weights)"]


# ---------------------------------------------------------------------------
# Types and values


def test_list_where_a_mapping_is_expected(tmp_path: Path) -> None:
    text = GOOD.replace("direction: egress", "direction: egress\n    http2: [1, 2]")
    f, lines = problems(tmp_path, text)
    assert lines == [f"{f}: listeners[0].http2: expected a mapping, got a list"]


def test_whole_file_is_a_list(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "- a\n- b\n")
    assert lines == [f"{f}: (top level): expected a mapping, got a list"]


def test_mapping_where_a_list_is_expected(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "listeners: {name: x}\n" + CLUSTERS)
    assert lines == [f"{f}: listeners: expected a list, got a mapping"]


def test_string_where_a_list_is_expected(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace('["127.0.0.1:9000"]', '"127.0.0.1:9000"'))
    assert lines == [f"{f}: clusters[0].endpoints: expected a list, got a string"]


def test_bad_duration(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "drain_timeout: 10 seconds\n" + GOOD)
    assert lines == [f"{f}: drain_timeout: expected a duration like 250ms, 5s or 1m, got '10 seconds'"]


def test_bad_nested_duration(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("cluster: backend", "cluster: backend\n        timeout: 5sec"))
    assert lines == [
        f"{f}: listeners[0].routes[0].timeout: expected a duration like 250ms, 5s or 1m, got '5sec'"
    ]


def test_bad_address(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace('"127.0.0.1:15001"', '"127.0.0.1"'))
    assert lines == [f"{f}: listeners[0].address: expected host:port, got '127.0.0.1'"]


def test_port_out_of_range(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace('"127.0.0.1:15001"', '"127.0.0.1:99999"'))
    assert lines == [f"{f}: listeners[0].address: port out of range: 99999"]


def test_port_not_a_number(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace('"127.0.0.1:15001"', '"127.0.0.1:http"'))
    assert lines == [f"{f}: listeners[0].address: port must be a number, got 'http'"]


def test_bad_endpoint(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace('"127.0.0.1:9000"', '"127.0.0.1:0"'))
    assert lines == [f"{f}: clusters[0].endpoints[0]: port out of range: 0"]


def test_bad_enum(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("direction: egress", "direction: outbound"))
    assert lines == [f"{f}: listeners[0].direction: expected one of egress, ingress, got 'outbound'"]


def test_bad_limit(tmp_path: Path) -> None:
    text = GOOD.replace("direction: egress", "direction: egress\n    http2: {stream_window: 1KiB}")
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: listeners[0].http2.stream_window: expected a window from 65535 bytes to 2GiB-1, got 1024"
    ]


def test_prefix_and_path_together(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, GOOD.replace("{prefix: /}", "{prefix: /, path: /x}"))
    assert lines == [f"{f}: listeners[0].routes[0].match: give prefix or path, not both"]


# ---------------------------------------------------------------------------
# Filters


def test_unknown_filter_name(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, with_filters("      - name: faultt\n"))
    from meshproxy.filters import FILTER_TYPES

    assert lines == [
        f"{f}: listeners[0].filters[0].name: unknown filter 'faultt' "
        f"(built-in: {', '.join(sorted(FILTER_TYPES))}; or give module:Class)"
    ]
    assert "fault" in FILTER_TYPES


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nosuch.mod:X", "cannot import filter module 'nosuch.mod': No module named 'nosuch'"),
        ("meshproxy.filters.fault:Nope", "module 'meshproxy.filters.fault' has no attribute 'Nope'"),
        ("collections:OrderedDict", "'collections:OrderedDict' is not a meshproxy.filters.base.Filter subclass"),
    ],
    ids=["cannot import", "no such class", "not a Filter"],
)
def test_bad_filter_import_path_names_the_name_key(tmp_path: Path, name: str, reason: str) -> None:
    """Like an unknown built-in name, a bad import path is a problem with `name`."""
    f, lines = problems(tmp_path, with_filters(f"      - name: '{name}'\n"))
    assert lines == [f"{f}: listeners[0].filters[0].name: {reason}"]


def test_filter_without_a_name(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, with_filters("      - abort: {}\n"))
    assert lines == [f"{f}: listeners[0].filters[0].name: required key is missing"]


def test_bad_filter_option(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, with_filters("      - name: fault\n        abort: {percentage: 150}\n"))
    assert lines == [
        f"{f}: listeners[0].filters[0].abort.percentage: expected a percentage from 0 to 100, got 150"
    ]


def test_unknown_filter_option(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, with_filters("      - name: fault\n        abrt: {percentage: 50}\n"))
    assert lines == [
        f"{f}: listeners[0].filters[0].abrt: unknown option (expected: abort, delay, header_gate)"
    ]


def test_bad_option_of_a_later_filter(tmp_path: Path) -> None:
    text = with_filters("      - name: headers\n", "      - name: fault\n        abort: {http_status: 99}\n")
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: listeners[0].filters[1].abort.http_status: expected an HTTP status from 200 to 599, got 99"
    ]


def test_connection_specific_header_in_headers_filter(tmp_path: Path) -> None:
    text = with_filters("      - name: headers\n        request: {set: {connection: close}}\n")
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: listeners[0].filters[0].request.set: connection-specific header connection"
    ]


# ---------------------------------------------------------------------------
# The file itself


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "listeners:\n\t- name: x\n")
    assert lines == [f"{f}: line 2, column 1: invalid YAML: found character '\\t' that cannot start any token"]


def test_empty_file(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "")
    assert lines == [f"{f}: the file is empty"]


def test_file_with_only_comments_is_empty(tmp_path: Path) -> None:
    f, lines = problems(tmp_path, "# nothing here\n")
    assert lines == [f"{f}: the file is empty"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.lines == [f"{path}: cannot read: No such file or directory"]


def test_every_problem_is_reported_one_line_each(tmp_path: Path) -> None:
    text = (
        "drain_timeout: forever\n"
        + "listeners:\n"
        + LISTENER.replace('"127.0.0.1:15001"', '"nohost"').replace("cluster: backend", "cluster: paymnts")
        + "    filters:\n      - name: fault\n        abort: {percentage: 150}\n"
        + CLUSTERS
        + "bogus: 1\n"
    )
    f, lines = problems(tmp_path, text)
    assert lines == [
        f"{f}: bogus: unknown key (expected one of: node, admin, access_log, listeners, clusters, drain_timeout, shm, mirror)",
        f"{f}: drain_timeout: expected a duration like 250ms, 5s or 1m, got 'forever'",
        f"{f}: listeners[0].address: expected host:port, got 'nohost'",
        f"{f}: listeners[0].routes[0].cluster: unknown cluster 'paymnts' (known: backend)",
        f"{f}: listeners[0].filters[0].abort.percentage: expected a percentage from 0 to 100, got 150",
    ]


# ---------------------------------------------------------------------------
# The CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_bad_config_exits_2_with_the_problem_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "drain_timeout: forever\nlisteners:\n" + LISTENER.replace("backend", "paymnts") + CLUSTERS)
    result = run_cli("--conf", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: drain_timeout: expected a duration like 250ms, 5s or 1m, got 'forever'",
        f"{path}: listeners[0].routes[0].cluster: unknown cluster 'paymnts' (known: backend)",
    ]


def test_cli_missing_file_is_one_line_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = run_cli("--conf", str(path))
    assert result.returncode == 2
    assert result.stderr == f"{path}: cannot read: No such file or directory\n"


@pytest.mark.parametrize("name", ["egress.yaml", "ingress.yaml", "governance.yaml", "units-risk.yaml"])
def test_cli_check_prints_the_effective_config(name: str) -> None:
    result = run_cli("--check", "--conf", f"conf/{name}")
    assert result.returncode == 0, result.stderr
    dumped = json.loads(result.stdout)
    assert dumped["source"] == f"conf/{name}"
    assert dumped["listeners"] and dumped["clusters"]
    known = {c["name"] for c in dumped["clusters"]}
    for listener in dumped["listeners"]:
        assert listener["direction"] in ("egress", "ingress")
        assert {c for r in listener["routes"] for c in (r["weighted"] or [r["cluster"]])} <= known
    # Defaults are filled in.
    assert dumped["drain_timeout"] == 10.0
    assert dumped["listeners"][0]["http2"]["write_timeout"] == 30.0


def test_cli_check_mtls_example(tmp_path: Path) -> None:
    """conf/ingress-mtls.yaml with certificates from `meshproxy dev-certs`, as its header says."""
    import shutil

    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy("conf/ingress-mtls.yaml", conf)
    made = run_cli("dev-certs", str(conf / "certs"), "--client", "frontend")
    assert made.returncode == 0, made.stderr
    result = run_cli("--check", "--conf", str(conf / "ingress-mtls.yaml"))
    assert result.returncode == 0, result.stderr
    tls = json.loads(result.stdout)["listeners"][0]["tls"]
    assert tls["mode"] == "strict" and tls["ca"] == str(conf / "certs" / "ca.pem")


def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"meshproxy {meshproxy.__version__}\n"


THRIFT = """\
listeners:
  - name: tin
    direction: egress
    address: "127.0.0.1:15002"
    protocol: thrift
    thrift: {transport: framed, protocol: binary, service: Echo}
    routes:
      - match: {service: Echo, method: echo}
        cluster: echo-thrift
        timeout: 2s
      - match: {}
        cluster: echo-thrift
clusters:
  - name: echo-thrift
    protocol: thrift
    thrift: {transport: ttheader, mux: true, max_requests_per_connection: 500}
    endpoints: ["127.0.0.1:9100"]
  - name: backend
    endpoints: ["127.0.0.1:9000"]
"""


def test_thrift_listener_and_cluster(tmp_path: Path) -> None:
    config = load(str(write(tmp_path, THRIFT)))
    listener = config.listeners[0]
    assert (listener.thrift.transport, listener.thrift.protocol, listener.thrift.service) == ("framed", "binary", "Echo")
    assert (listener.routes[0].match.service, listener.routes[0].match.method) == ("Echo", "echo")
    assert listener.routes[1].match.service is None and listener.routes[1].match.prefix is None
    cluster = config.cluster("echo-thrift")
    assert cluster.thrift.mux and cluster.thrift.max_requests_per_connection == 500


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("transport: framed, protocol", "transport: zipped, protocol",
         "listeners[0].thrift.transport: expected one of framed, buffered, header, ttheader, auto, got 'zipped'"),
        ("match: {service: Echo, method: echo}", "match: {prefix: /Echo/}",
         "listeners[0].routes[0].match.prefix: unknown key (expected one of: service, method, headers)"),
        ("match: {service: Echo, method: echo}", "match: {service: Echo, method: a/b}",
         "listeners[0].routes[0].match.method: expected a name without '/', got 'a/b'"),
        ("      - match: {}\n        cluster: echo-thrift", "      - match: {}\n        cluster: backend",
         "listeners[0].routes[1].cluster: cluster 'backend' speaks http2, this listener thrift"),
        ("thrift: {transport: ttheader, mux: true, max_requests_per_connection: 500}",
         "thrift: {transport: ttheader, protocol: compact}",
         tuple(f"listeners[0].routes[{i}].cluster: cluster 'echo-thrift' speaks thrift compact, this listener binary "
               "(binary and compact are not translated)" for i in (0, 1))),
        ("max_requests_per_connection: 500", "max_requests_per_connection: 0",
         "clusters[0].thrift.max_requests_per_connection: expected a whole number of at least 1, got 0"),
        ("service: Echo}", "service: Echo, max_frame_size: 10}",
         "listeners[0].thrift.max_frame_size: expected a size from 1KiB to 1GiB-1, got 10"),
        ("    endpoints: [\"127.0.0.1:9000\"]", "    endpoints: [\"127.0.0.1:9000\"]\n    thrift: {mux: true}",
         "clusters[1].thrift: only for protocol: thrift"),
    ],
)
def test_thrift_config_errors(tmp_path: Path, old: str, new: str, expected: str | tuple[str, ...]) -> None:
    assert old in THRIFT
    name, lines = problems(tmp_path, THRIFT.replace(old, new, 1))
    want = [expected] if isinstance(expected, str) else list(expected)
    assert lines == [f"{name}: {e}" for e in want]


def test_route_filter_errors_name_their_key_path(tmp_path: Path) -> None:
    text = GOOD.replace("        cluster: backend\n", "        cluster: backend\n        filters:\n          - {name: mirror, sample: 2}\n", 1)
    name, lines = problems(tmp_path, text)
    assert lines == [f"{name}: listeners[0].routes[0].filters[0].sample: expected a share from 0 to 1, got 2"]


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_a_queue_sink_without_its_client_package_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    f, lines = problems(tmp_path, GOOD + f"mirror: {{sink: {{type: {kind}}}}}\n")
    assert lines == [f"{f}: mirror.sink.type: needs the Python package {kind!r}: pip install 'meshproxy[{kind}]'"]
