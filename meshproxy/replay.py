"""Clients that send recorded calls again (for `meshproxy mirror replay`).

HTTP/2 and gRPC calls are rebuilt from the record (method, path, authority,
headers but the redacted ones, the captured body); a Thrift record holds the
whole framed call, which is written as it was and answered by one framed
reply. A truncated body cannot be replayed faithfully, so such records fail.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import trio

from meshproxy.codec import thrift
from meshproxy.mirror import Record

REDACTED = "<redacted>"
_SKIP = {":method", ":path", ":scheme", ":authority", "host", "content-length"}


class H2Replayer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()

    @classmethod
    async def connect(cls, host: str, port: int) -> H2Replayer:
        r = cls(await trio.open_tcp_stream(host, port))
        await r.stream.send_all(r.conn.data_to_send())
        return r

    async def call(self, record: Record) -> int:
        m = record.meta
        if m.get("request_truncated"):
            raise ValueError("the recorded request body was truncated")
        headers = [(b":method", m["method"].encode()), (b":scheme", b"http"),
                   (b":authority", (m.get("service") or "replay").encode()), (b":path", m["path"].encode())]
        headers += [(k.encode(), v.encode("latin-1")) for k, v in m.get("request_headers", [])
                    if k not in _SKIP and v != REDACTED]
        sid = self.conn.get_next_available_stream_id()
        body = record.request
        self.conn.send_headers(sid, headers, end_stream=not body)
        sent = 0
        while sent < len(body):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                await self._read(sid)
                continue
            chunk = body[sent : sent + window]
            sent += len(chunk)
            self.conn.send_data(sid, chunk, end_stream=sent >= len(body))
            await self.stream.send_all(self.conn.data_to_send())
        await self.stream.send_all(self.conn.data_to_send())
        status = 0
        while True:
            for e in await self._read(sid):
                if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                    status = int(dict(e.headers)[b":status"])
                elif isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                    return status
                elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                    raise ConnectionError(f"stream reset ({e.error_code})")

    async def _read(self, sid: int) -> list[h2.events.Event]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("connection closed")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        await self.stream.send_all(self.conn.data_to_send())
        return events


class ThriftReplayer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader: thrift.Reader | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> ThriftReplayer:
        return cls(await trio.open_tcp_stream(host, port))

    async def call(self, record: Record) -> int:
        if record.meta.get("request_truncated"):
            raise ValueError("the recorded call was truncated")
        await self.stream.send_all(record.request)
        if record.meta.get("method") == "oneway":
            return 200
        if self.reader is None:
            self.reader = thrift.Reader(None, None)
        while (msg := self.reader.next()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.reader.feed(data)
        return 200 if msg.head.mtype == thrift.REPLY else 500
