"""conf/units-risk.yaml runs as its header says: the example backends it names
(`python -m meshproxy.demo backend ...`, as processes), meshproxy on the config
(its ports moved to free ones), curl as the client."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HOST, free_port, http_get, proxy_process

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "units-risk.yaml"
# The ports the example uses: admin, listener, and the backends of its header.
PORTS = (15100, 15101, 9001, 9002, 9003, 9300)


@contextlib.contextmanager
def backend(port: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy.demo", "backend", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the example backend on {port} did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def curl(port: int, path: str, user: str | None = None) -> tuple[int, str]:
    """(status, x-backend) of a GET through the proxy."""
    user_header = ["-H", f"x-user-id: {user}"] if user is not None else []
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", *user_header,
                          f"http://{HOST}:{port}{path}"], capture_output=True, timeout=10, check=True).stdout.decode()
    served_by = re.search(r"^x-backend: (\S+)", out, re.M | re.I)
    return int(out.split()[1]), served_by[1] if served_by else ""


def unit(user: str) -> str:
    """The unit the example's hash ranges give a user (docs/configuration.md: crc32(key) % 1000)."""
    return "a" if zlib.crc32(user.encode()) % 1000 <= 499 else "b"


@pytest.mark.needs("curl")
def test_the_units_and_risk_example_runs_as_its_header_says(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    ports = {old: free_port() for old in PORTS}
    for old, new in ports.items():
        assert f"127.0.0.1:{old}" in text
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    config = tmp_path / "units-risk.yaml"
    config.write_text(text)
    listen = ports[15101]
    with backend(ports[9001], "--name", "orders-a"), backend(ports[9002], "--name", "orders-b") as orders_b, \
            backend(ports[9003], "--name", "orders-a-v2"), \
            backend(ports[9300], "--name", "risk", "--deny-users", "666"), \
            proxy_process(config, ports[15100]) as proxy:
        users = [str(u) for u in range(1, 41)]
        served = {u: curl(listen, "/size/10", u) for u in users}
        assert {status for status, _ in served.values()} == {200}
        for u, (_, name) in served.items():  # unit a's users: 10% of them on orders-a-v2 (gray)
            assert name in (("orders-a", "orders-a-v2") if unit(u) == "a" else ("orders-b",)), u
        assert {name for _, name in served.values()} >= {"orders-a", "orders-b"}
        assert all(curl(listen, "/size/10", u) == served[u] for u in users[:10])  # sticky
        assert curl(listen, "/size/10") == (200, "orders-a")  # no user: the default unit
        assert curl(listen, "/size/10", "666")[0] == 403  # the risk service denies user 666
        v2 = {curl(listen, "/v2/size/10", u)[1] for u in users}
        assert v2 == {"orders-a", "orders-a-v2"}  # the weighted route: 90/10 by user

        orders_b.kill()  # unit b's backend goes away: its users fail over to unit a
        orders_b.wait(5)
        b_user = next(u for u in users if unit(u) == "b")
        for _ in range(3):  # the first call finds out (it may fail), the next ones fail over
            status, name = curl(listen, "/size/10", b_user)
        assert (status, name) == (200, "orders-a")

        wanted = ('"unit_reason":"failover"', '"risk":"deny","risk_reason":"user_blocked"')
        deadline = time.monotonic() + 5  # the access log is written in batches
        while not all(w in proxy.log() for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(w in proxy.log() for w in wanted)
        metrics = http_get(f"http://{HOST}:{ports[15100]}/metrics")[1].decode()
        assert re.search(r'meshproxy_risk_verdicts_total\{[^}]*verdict="deny"[^}]*\} 1\.0', metrics)
        assert re.search(r'meshproxy_unit_decisions_total\{[^}]*reason="failover"', metrics)
