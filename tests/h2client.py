"""A small real HTTP/2 client on trio + h2, for tests that need to misbehave
(stop reading, send bad frames) or look at frames the proxy sends."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

Headers = list[tuple[bytes, bytes]]


class H2Client:
    def __init__(self, stream: trio.SocketStream, validate: bool = True, window: int | None = None) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list[h2.events.Event] = []
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, port: int, **kw: object) -> H2Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port), **kw)  # type: ignore[arg-type]
        await client.flush()
        return client

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    def request(self, path: str, method: str = "GET", extra: Headers | None = None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"test.local"),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        return sid

    async def receive(self, ack: bool = True) -> list[h2.events.Event]:
        """One read's worth of events (empty list at EOF)."""
        data = await self.stream.receive_some(65536)
        if not data:
            return []
        events = self.conn.receive_data(data)
        for e in events:
            if ack and isinstance(e, h2.events.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.events += events
        await self.flush()
        return events

    async def response(self, sid: int) -> tuple[int, Headers, bytes, Headers | None]:
        """Read until stream `sid` ends: (status, headers, body, trailers); status -1 on reset."""
        status, headers, body, trailers = 0, [], bytearray(), None
        seen = 0
        while True:
            for e in self.events[seen:]:
                if getattr(e, "stream_id", None) != sid:
                    continue
                if isinstance(e, h2.events.ResponseReceived):
                    headers = e.headers
                    status = int(dict(e.headers)[b":status"])
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data
                elif isinstance(e, h2.events.TrailersReceived):
                    trailers = e.headers
                elif isinstance(e, h2.events.StreamEnded):
                    return status, headers, bytes(body), trailers
                elif isinstance(e, h2.events.StreamReset):
                    return -1, headers, bytes(body), None
            seen = len(self.events)
            if not await self.receive():
                raise ConnectionError("connection closed before the response ended")

    async def get(self, path: str, **kw: object) -> tuple[int, Headers, bytes, Headers | None]:
        sid = self.request(path, **kw)  # type: ignore[arg-type]
        await self.flush()
        return await self.response(sid)

    async def aclose(self) -> None:
        await self.stream.aclose()


