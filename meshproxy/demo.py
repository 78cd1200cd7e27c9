"""An example HTTP/2 backend and `meshproxy demo`.

`ExampleBackend` is a small h2c server on trio, used by the demo and by the
tests as a real origin: GET /size/N answers N bytes, POST /echo echoes the
body (streaming, with back-pressure), /status/N answers status N, /slow/MS
waits MS milliseconds, POST /v1/risk/check answers a risk_control check
(JSON: DENY for the users in `deny_users`, by their x-user-id header, else
ALLOW), anything else answers "hello from the example backend". With a
`name`, every response says it in `x-backend`. Run it alone with
`python -m meshproxy.demo backend --port 9000 [--name a] [--deny-users 666,667]`.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import tempfile
import textwrap

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

Headers = list[tuple[bytes, bytes]]
RISK_PATH = "/v1/risk/check"
MAX_CHECK_BYTES = 64 * 1024  # of a check's body kept for the verdict


class ExampleBackend:
    """h2c origin; counts the requests it saw (tests read `.requests`, `.resets`).

    Tests make it fail on command: a non-zero `fail_status` answers every
    request with that status; `stall` leaves requests unanswered until set back.
    """

    def __init__(self, name: str = "", deny_users: frozenset[str] = frozenset()) -> None:
        self.name = name.encode()
        self.deny_users = deny_users
        self.requests: list[Headers] = []
        self.resets = 0
        self.port = 0
        self.body_sizes: list[int] = []  # of each whole request body received (not /echo's)
        self.fail_status = 0
        self.stall = False

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        lock = trio.Lock()
        windows: dict[int, trio.Event] = {}
        bodies: dict[int, trio.MemorySendChannel[bytes | None]] = {}
        scopes: dict[int, trio.CancelScope] = {}

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        async def send_body(sid: int, data: bytes, end: bool = True) -> None:
            while data:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    windows[sid] = trio.Event()
                    await flush()
                    await windows[sid].wait()
                    continue
                n = min(window, conn.max_outbound_frame_size, len(data))
                conn.send_data(sid, data[:n])
                data = data[n:]
                await flush()
            if end:
                conn.end_stream(sid)
                await flush()

        async def handle(sid: int, headers: Headers, body: trio.MemoryReceiveChannel[bytes | None]) -> None:
            h = dict(headers)
            path = h.get(b":path", b"/").decode()
            self.requests.append(headers)
            with trio.CancelScope() as scope:
                scopes[sid] = scope
                try:
                    await respond(sid, path, body)
                except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

        async def respond(sid: int, path: str, body: trio.MemoryReceiveChannel[bytes | None]) -> None:
            if True:
                if path == "/echo" or path.startswith("/echo?"):
                    conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
                    await flush()
                    async for chunk in body:
                        if chunk is None:
                            break
                        await send_body(sid, chunk, end=False)
                    conn.send_headers(sid, [(b"x-echo-done", b"1")], end_stream=True)
                    await flush()
                    return
                size = 0
                received = bytearray()
                async for chunk in body:
                    if chunk is None:
                        break
                    size += len(chunk)
                    if path == RISK_PATH and len(received) < MAX_CHECK_BYTES:
                        received += chunk
                self.body_sizes.append(size)
                extra: Headers = [(b"x-backend", self.name)] if self.name else []
                if path == RISK_PATH:
                    payload = self._verdict(received)
                    extra.append((b"content-type", b"application/json"))
                elif path.startswith("/size/"):
                    payload = b"x" * int(path[6:])
                elif path.startswith("/slow/"):
                    await trio.sleep(int(path[6:]) / 1000)
                    payload = b"slow\n"
                else:
                    payload = b"hello from the example backend\n"
                while self.stall:
                    await trio.sleep(0.01)
                status = int(path[8:]) if path.startswith("/status/") else 200
                status = self.fail_status or status
                conn.send_headers(sid, [(b":status", str(status).encode()), (b"content-length", str(len(payload)).encode()),
                                        *extra])
                await send_body(sid, payload)

        try:
            async with trio.open_nursery() as nursery:
                await flush()
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    try:
                        events = conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        await flush()
                        break
                    for event in events:
                        if isinstance(event, h2.events.RequestReceived):
                            send, recv = trio.open_memory_channel[bytes | None](64)
                            bodies[event.stream_id] = send
                            if event.stream_ended:
                                send.send_nowait(None)
                            nursery.start_soon(handle, event.stream_id, event.headers, recv)
                        elif isinstance(event, h2.events.DataReceived):
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                            ch = bodies.get(event.stream_id)
                            if ch is not None:
                                await ch.send(event.data)
                        elif isinstance(event, h2.events.StreamEnded):
                            ch = bodies.get(event.stream_id)
                            if ch is not None:
                                await ch.send(None)
                        elif isinstance(event, h2.events.StreamReset):
                            self.resets += 1
                            if event.stream_id in scopes:
                                scopes[event.stream_id].cancel()
                        elif isinstance(event, h2.events.WindowUpdated):
                            for ev in list(windows.values()):
                                ev.set()
                    await flush()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass

    def _verdict(self, check: bytes) -> bytes:
        """A CheckResponse (JSON) for a CheckRequest (JSON, docs/risk_control.md): a toy policy."""
        try:
            headers = json.loads(check).get("headers", [])
            users = {base64.b64decode(h["value"]).decode("utf-8", "replace")
                     for h in headers if h.get("name") == "x-user-id"}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return json.dumps({"verdict": "REVIEW", "reason": f"unreadable_check_{type(e).__name__}"}).encode()
        if users & self.deny_users:
            return b'{"verdict": "DENY", "reason": "user_blocked"}'
        return b'{"verdict": "ALLOW", "reason": "ok"}'


async def h2_get(port: int, path: str, host: str = "127.0.0.1", body: bytes | None = None) -> tuple[int, Headers, bytes]:
    """A one-shot h2c client call: (status, headers, body)."""
    stream = await trio.open_tcp_stream(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    headers = [(b":method", b"POST" if body else b"GET"), (b":scheme", b"http"), (b":authority", b"demo"), (b":path", path.encode())]
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    await stream.send_all(conn.data_to_send())
    status, resp_headers, chunks = 0, [], []
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            done = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    resp_headers = event.headers
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            await stream.send_all(conn.data_to_send())
            if done:
                break
    await stream.aclose()
    return status, resp_headers, b"".join(chunks)


DEMO_CONFIG = """\
node: {{service: demo, unit: u1}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: {{enabled: true, path: stdout}}
listeners:
  - name: demo-egress
    direction: egress
    address: "127.0.0.1:{listen}"
    protocol: http2
    filters:
      - name: headers
        response: {{set: {{x-served-by: meshproxy-demo}}}}
    routes:
      - match: {{prefix: /size}}
        cluster: example
        timeout: 5s
      - match: {{prefix: /status}}
        cluster: example
        timeout: 5s
clusters:
  - name: example
    protocol: http2
    endpoints: ["127.0.0.1:{backend}"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo() -> int:
    from meshproxy.app import App
    from meshproxy.config import load

    async def main() -> None:
        backend = ExampleBackend()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(backend.serve)
            listen, admin = _free_port(), _free_port()
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(DEMO_CONFIG.format(admin=admin, listen=listen, backend=port))
            print(f"example backend on 127.0.0.1:{port}; config written to {f.name}:")
            print(textwrap.indent(open(f.name).read(), "    "))
            app = App(load(f.name))
            await nursery.start(app.run)
            for path in ("/size/100", "/size/16384", "/status/503", "/no-such-route"):
                status, headers, body = await h2_get(listen, path)
                served_by = dict(headers).get(b"x-served-by", b"").decode()
                print(f"GET {path} -> {status}, {len(body)} bytes, x-served-by: {served_by}")
            await trio.sleep(0.6)  # let the access log flush
            print(f"\nthe admin endpoint was http://127.0.0.1:{admin}/metrics; the demo stops now")
            app.shutdown()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0


def _backend_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m meshproxy.demo backend")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--name", default="", help="sent back in an x-backend header (which unit answered)")
    p.add_argument("--deny-users", default="", help="x-user-id values whose risk checks get DENY, comma-separated")
    args = p.parse_args(argv)
    backend = ExampleBackend(args.name, frozenset(u for u in args.deny_users.split(",") if u))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(backend.serve, args.host, args.port)
            print(json.dumps({"example_backend": f"{args.host}:{port}"}), flush=True)

    trio.run(main)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        raise SystemExit(_backend_main(sys.argv[2:]))
    raise SystemExit(run_demo())
