"""Builders for end-to-end tests: real backends, the real proxy, real clients.

Everything listens on 127.0.0.1 with port 0; readiness comes from
`nursery.start`. Each proxy gets its own Prometheus registry so tests can
assert on metrics without seeing each other's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from meshproxy.app import App
from meshproxy.config import load
from meshproxy.demo import ExampleBackend

HOST = "127.0.0.1"


def proxy_yaml(
    backend: str | list[str],
    *,
    listen: str = f"{HOST}:0",
    admin: str = f"{HOST}:0",
    route_timeout: str = "15s",
    filters: str = "",
    extra_listener: str = "",
    cluster_extra: str = "",
    access_log: str = "{enabled: false}",
    drain_timeout: str = "5s",
) -> str:
    """A one-listener, one-cluster config; `filters` is YAML list items, indented by 6."""
    endpoints = ", ".join(f'"{b}"' for b in ([backend] if isinstance(backend, str) else backend))
    text = f"""\
node: {{service: test, unit: u1}}
admin: {{address: "{admin}"}}
access_log: {access_log}
drain_timeout: {drain_timeout}
listeners:
  - name: test
    direction: egress
    address: "{listen}"
    protocol: http2
    filters:
{textwrap.indent(filters, "      ") if filters else "      []"}
    routes:
      - name: main
        match: {{prefix: /}}
        cluster: backend
        timeout: {route_timeout}
{extra_listener}
clusters:
  - name: backend
    protocol: http2
    endpoints: [{endpoints}]
{cluster_extra}
"""
    return text.replace("    filters:\n      []", "    filters: []")


def write_config(directory: Path, text: str, name: str = "meshproxy.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


async def start_backend(nursery: trio.Nursery) -> ExampleBackend:
    backend = ExampleBackend()
    await nursery.start(backend.serve, HOST, 0)
    return backend


async def start_proxy(nursery: trio.Nursery, config_path: Path) -> App:
    app = App(load(str(config_path)), CollectorRegistry())
    await nursery.start(app.run)
    return app


def listen_port(app: App, listener: str = "test") -> int:
    return int(app.listeners[listener].bound.rsplit(":", 1)[1])


def metric(app: App, name: str, **labels: str) -> float:
    value = app.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ProxyProcess:
    """meshproxy as a separate process (for signals: SIGTERM drain, SIGHUP reload)."""

    def __init__(self, config_path: Path, admin_port: int) -> None:
        self.config_path = config_path
        self.admin_port = admin_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.with_suffix(".log")

    def start(self, timeout: float = 10.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "--conf", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshproxy exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                if http_get(f"http://{HOST}:{self.admin_port}/ready", 1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"meshproxy did not become ready: {self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        with contextlib.suppress(AttributeError):
            self._log.close()


@contextlib.contextmanager
def proxy_process(config_path: Path, admin_port: int) -> Iterator[ProxyProcess]:
    p = ProxyProcess(config_path, admin_port)
    try:
        p.start()
        yield p
    finally:
        p.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


__all__ = ["HOST", "os"]


async def eventually(check: object, timeout: float = 2.0) -> None:
    """Wait until `check()` is true: metrics are recorded just after the reply is sent."""
    with trio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.005)
