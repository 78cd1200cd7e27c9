"""The admin endpoint: plain HTTP/1.1 (h11) for Prometheus, probes and curl.

/metrics (Prometheus text format), /ready (200 once every listener is bound,
503 while draining), /config_dump (effective config, JSON), /clusters
(endpoints and their state, JSON).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshproxy.values import Address

log = logging.getLogger(__name__)

# An admin request is a GET line and a few headers; anything bigger is abuse.
MAX_REQUEST_BYTES = 16 * 1024
IO_TIMEOUT = 10.0
MAX_CONNECTIONS = 64


class AdminSource:
    """What the admin endpoint reports, supplied by the app."""

    registry: Any
    ready: Callable[[], tuple[bool, str]]
    config_dump: Callable[[], dict[str, Any]]
    clusters: Callable[[], list[dict[str, Any]]]

    def __init__(
        self,
        registry: Any,
        ready: Callable[[], tuple[bool, str]],
        config_dump: Callable[[], dict[str, Any]],
        clusters: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.config_dump = config_dump
        self.clusters = clusters


def _json(value: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(value, indent=2).encode() + b"\n"


def respond(source: AdminSource, target: str) -> tuple[int, str, bytes]:
    path = target.partition("?")[0]
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(source.registry)
    if path == "/ready":
        ok, why = source.ready()
        return (200 if ok else 503), "text/plain; charset=utf-8", why.encode() + b"\n"
    if path == "/config_dump":
        return _json(source.config_dump())
    if path == "/clusters":
        return _json(source.clusters())
    if path == "/":
        return 200, "text/plain; charset=utf-8", b"meshproxy admin: /metrics /ready /config_dump /clusters\n"
    return 404, "text/plain; charset=utf-8", b"not found\n"


async def _serve_one(stream: trio.SocketStream, source: AdminSource) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            with trio.fail_after(IO_TIMEOUT):
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_REQUEST_BYTES)
                    conn.receive_data(data)
                    event = conn.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                continue
            if event.method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, "text/plain; charset=utf-8", b"only GET\n"
            else:
                status, ctype, body = respond(source, event.target.decode("latin-1"))
            headers = [("content-type", ctype), ("content-length", str(len(body)))]
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if event.method == b"GET":
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            with trio.fail_after(IO_TIMEOUT):
                await stream.send_all(out)
            if conn.our_state is h11.MUST_CLOSE:
                return
            # Skip any request body, then get ready for the next request.
            while conn.their_state is h11.SEND_BODY:
                if conn.next_event() is h11.NEED_DATA:
                    return
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError):
        return
    finally:
        await stream.aclose()


async def serve_admin(
    address: Address, source: AdminSource, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    if address.kind == "unix":
        raise ValueError("the admin endpoint listens on TCP only")
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    bound = listeners[0].socket.getsockname()
    task_status.started(f"{bound[0]}:{bound[1]}")
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        async with limiter:
            await _serve_one(stream, source)

    await trio.serve_listeners(handler, listeners)
