"""Mirroring: the spool format, the queue's accounting, and real calls mirrored end to end.

HTTP/2 calls come from the harness h2 client, gRPC from grpcio, Thrift from
Apache thrift clients; the file sink writes a real spool that is read back
with the same reader `meshproxy mirror tail` uses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trio

from meshproxy import mirror
from meshproxy.app import App
from meshproxy.config import MirrorConfig, MirrorSink
from meshproxy.metrics import Metrics
from tests.h2client import H2Client
from tests.harness import (
    HOST,
    eventually,
    free_port,
    listen_port,
    metric,
    proxy_process,
    start_backend,
    start_proxy,
    write_config,
)
from tests.peers.thrift_peer import ThriftServer, client
from tests.test_grpc_e2e import UNARY, grpc_server

__all__ = ["grpc_server"]


def sink_config(directory: Path, **kw: object) -> MirrorConfig:
    return MirrorConfig(sink=MirrorSink(directory=str(directory), **kw), flush_interval=0.01)  # type: ignore[arg-type]


# -- the spool -------------------------------------------------------------------------


def test_record_round_trip_and_torn_tail(tmp_path: Path) -> None:
    sink = mirror.FileSink(sink_config(tmp_path))
    records = [mirror.Record({"id": str(i), "path": "/x"}, os.urandom(i * 10), b"r" * i) for i in range(20)]
    sink.write([mirror.encode(r) for r in records])
    sink.close()
    (segment,) = mirror.segments(tmp_path)
    back = list(mirror.read_segment(segment))
    assert [(r.meta["id"], r.request, r.response) for r in back] == [(r.meta["id"], r.request, r.response) for r in records]
    # A torn tail (a crash mid-write): every complete record reads, the partial one is skipped.
    whole = segment.read_bytes()
    segment.write_bytes(whole + mirror.encode(records[5])[:-7])
    assert len(list(mirror.read_segment(segment))) == 20
    # A damaged record is never misread: reading stops before it.
    damaged = bytearray(whole)
    damaged[len(mirror.encode(records[0])) + 20] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    assert [r.meta["id"] for r in mirror.read_segment(segment)] == ["0"]


def test_rotation_and_retention(tmp_path: Path) -> None:
    sink = mirror.FileSink(sink_config(tmp_path, segment_bytes=4096, retention_bytes=20_000, fsync="never"))
    record = mirror.Record({"id": "x"}, b"b" * 1000)
    blob = mirror.encode(record)
    for _ in range(100):
        sink.write([blob])
    sink.close()
    files = mirror.segments(tmp_path)
    assert len(files) > 1
    assert sum(f.stat().st_size for f in files) <= 20_000 + 4096 + len(blob)  # the cap, give or take the open segment
    assert all(f.stat().st_size <= 4096 + len(blob) for f in files)
    assert list(mirror.read_spool(tmp_path))  # what is kept still reads


def test_a_head_without_a_response_reads_back_without_response_fields(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from meshproxy.call import Call, Completion, EmptyBody, Peer, Protocol
    from meshproxy.filters.mirror import MirrorFilter

    # The writer (started by the first record) waits a minute before its first batch: the record stays queued.
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=str(tmp_path)), flush_interval=60),
                      Metrics.create(CollectorRegistry()))
    mirror.install(m)
    try:
        f = MirrorFilter.from_options({"capture_response": False, "max_body_bytes": 4})
        call = Call(1, Protocol.GRPC, Peer("127.0.0.1:1"), "l", "ingress", "svc", "POST", "/Svc/M",
                    [(b"cookie", b"c")], EmptyBody(), 0.0, request_id="rid")
        with pytest.raises(StopIteration):
            f.on_request(call).send(None)
        for observe in call.request_observers:
            observe(call, b"abcdef")
        for hook in call.completion_hooks:
            hook(call, Completion(200, "0", "", 0.25, "127.0.0.1:2", None, [(b":status", b"200")]))
        (blob,) = m._queue
    finally:
        mirror.install(None)
    (record,) = mirror.records_in(blob)
    meta = record.meta
    assert record.request == b"abcd" and record.response == b""
    assert (meta["request_bytes"], meta["request_truncated"], meta["response_bytes"]) == (4, True, 0)
    assert "response_headers" not in meta and "response_truncated" not in meta
    assert meta["request_headers"] == [["cookie", "<redacted>"]] and meta["duration_ms"] == 250.0
    assert (meta["protocol"], meta["path"], meta["grpc_status"], meta["upstream"]) == ("grpc", "/Svc/M", "0", "127.0.0.1:2")


async def test_queue_full_drops_and_counts(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    metrics = Metrics.create(CollectorRegistry())
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=str(tmp_path)), queue_size=3, flush_interval=60), metrics)
    results = [m.submit(mirror.Record({"i": i})) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert not m.submit(mirror.Record({}, b"x" * (m.config.max_record_bytes + 1)))
    value = metrics.registry.get_sample_value
    assert value("meshproxy_mirror_records_total", {"result": "sampled"}) == 6
    assert value("meshproxy_mirror_dropped_total", {"reason": "queue_full"}) == 2
    assert value("meshproxy_mirror_dropped_total", {"reason": "too_large"}) == 1
    assert value("meshproxy_mirror_in_flight", {}) == 3
    await m.close(5)
    assert value("meshproxy_mirror_records_total", {"result": "written"}) == 3
    assert value("meshproxy_mirror_in_flight", {}) == 0
    assert len(list(mirror.read_spool(tmp_path))) == 3


class FlakySink:
    """A sink whose writes fail with `errors` (one each), then block while `hold` is clear."""

    def __init__(self, *errors: Exception) -> None:
        import threading

        self.errors = list(errors)
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.written: list[bytes] = []

    def write(self, blobs: list[bytes]) -> None:
        self.entered.set()
        if self.errors:
            raise self.errors.pop(0)
        self.hold.wait(10)
        self.written += blobs

    def close(self) -> None:
        pass


def counted(metrics: Metrics) -> dict[str, float]:
    value = metrics.registry.get_sample_value
    got = {r: value("meshproxy_mirror_records_total", {"result": r}) for r in ("sampled", "written")}
    got |= {r: value("meshproxy_mirror_dropped_total", {"reason": r}) for r in ("sink_down", "shutdown")}
    got["in_flight"] = value("meshproxy_mirror_in_flight", {})
    assert got["sampled"] == got["written"] + got["sink_down"] + got["shutdown"] + got["in_flight"]
    return got


async def test_a_sink_error_of_any_kind_drops_its_batch_and_the_writer_goes_on(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    metrics = Metrics.create(CollectorRegistry())
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=str(tmp_path)), flush_interval=0.01), metrics)
    m.sink = sink = FlakySink(ValueError("not an OSError"))
    assert m.submit(mirror.Record({"i": 1}))  # starts the writer
    await eventually(lambda: counted(metrics)["sink_down"] == 1, timeout=5)
    assert m.submit(mirror.Record({"i": 2}))
    await eventually(lambda: counted(metrics)["written"] == 1, timeout=5)  # after the 0.1 s backoff
    assert [next(mirror.records_in(b)).meta["i"] for b in sink.written] == [2]
    await m.close(1)
    assert counted(metrics) == {"sampled": 2, "written": 1, "sink_down": 1, "shutdown": 0, "in_flight": 0}


async def test_close_leaves_a_stuck_sink_behind_and_drops_what_is_still_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    monkeypatch.setattr(mirror, "SINK_WRITE_TIMEOUT", 0.2)
    metrics = Metrics.create(CollectorRegistry())
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=str(tmp_path)), flush_interval=0.2), metrics)
    m.sink = sink = FlakySink()
    sink.hold.clear()
    for i in range(3):  # well within the first flush interval: one batch
        assert m.submit(mirror.Record({"i": i}))
    await trio.to_thread.run_sync(sink.entered.wait, 5)
    for i in range(2):
        assert m.submit(mirror.Record({"i": i}))
    with trio.fail_after(5):  # a hang guard: close() must not wait for the stuck write
        await m.close(0.1)
    # The stuck batch is neither written nor dropped yet: in flight; the two queued behind it are dropped.
    assert counted(metrics) == {"sampled": 5, "written": 0, "sink_down": 0, "shutdown": 2, "in_flight": 3}
    assert not m.submit(mirror.Record({"late": True}))
    sink.hold.set()
    await eventually(lambda: counted(metrics)["written"] == 3, timeout=5)
    assert counted(metrics) == {"sampled": 6, "written": 3, "sink_down": 0, "shutdown": 3, "in_flight": 0}


# -- end to end --------------------------------------------------------------------------


def config(tmp_path: Path, protocol: str, port: int, mirror_extra: str = "", filter_extra: str = "") -> str:
    thrift = "\n    thrift: {service: Echo}" if protocol == "thrift" else ""
    match = "{}" if protocol == "thrift" else "{prefix: /}"
    return f"""\
admin: {{address: "{HOST}:0"}}
mirror:
  sink: {{type: file, directory: {tmp_path / 'spool'}, fsync: never}}
  flush_interval: 10ms{mirror_extra}
listeners:
  - name: test
    direction: egress
    address: "{HOST}:0"
    protocol: {protocol}{thrift}
    filters:
      - {{name: mirror, sample: 1.0, max_body_bytes: 1000, capture_response: true{filter_extra}}}
    routes:
      - match: {match}
        cluster: backend
clusters:
  - name: backend
    protocol: {protocol}
    endpoints: ["{HOST}:{port}"]
"""


def reconciles(app: App) -> bool:
    sampled = metric(app, "meshproxy_mirror_records_total", result="sampled")
    written = metric(app, "meshproxy_mirror_records_total", result="written")
    dropped = sum(
        metric(app, "meshproxy_mirror_dropped_total", reason=r) for r in ("queue_full", "too_large", "sink_down", "shutdown")
    )
    return sampled == written + dropped + metric(app, "meshproxy_mirror_in_flight")


async def written(app: App, n: int) -> None:
    await eventually(lambda: metric(app, "meshproxy_mirror_records_total", result="written") >= n, timeout=5)


async def test_http2_calls_are_mirrored(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "http2", backend.port)))
    c = await H2Client.connect(listen_port(app))
    for i in range(20):
        trace = [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")] if i == 1 else []
        status, _, _, _ = await c.get(f"/size/{1500 if i == 0 else 10}", extra=[(b"authorization", b"Bearer s3cret"), *trace])
        assert status == 200
    await c.aclose()
    await written(app, 20)
    records = list(mirror.read_spool(tmp_path / "spool"))
    assert len(records) == 20 and reconciles(app)
    first = records[0].meta
    assert (first["protocol"], first["path"], first["status"], first["listener"]) == ("http2", "/size/1500", 200, "test")
    assert ["authorization", "<redacted>"] in first["request_headers"]
    assert first["response_truncated"] is True and len(records[0].response) == 1000
    assert len(records[1].response) == 10 and records[1].meta["response_truncated"] is False
    assert first["end"] >= first["start"] and first["duration_ms"] >= 0 and first["cluster"] == "backend"
    # Derived from the head when read: one id prefix per process, counting up; traceparent from the headers.
    ids = [r.meta["id"].split("-") for r in records]
    seqs = [int(n, 16) for _, n in ids]
    assert len({run for run, _ in ids}) == 1 and seqs == list(range(seqs[0], seqs[0] + 20))
    assert first["traceparent"] is None
    assert records[1].meta["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert first["request_bytes"] == 0 and first["response_bytes"] == 1000 and first["route"] == "test.0"


async def received_by_submit(monkeypatch: pytest.MonkeyPatch, sock: socket.socket) -> bytes:
    """What `sock` (non-blocking) had received when the proxy submitted the next mirror record.

    submit() runs inside the call's completion hook on the proxy's event loop, so
    nothing is sent meanwhile: the bytes are what the call sent before its hooks ran.
    """
    got: list[bytes] = []
    submitted = trio.Event()
    real_submit = mirror.Mirror.submit

    def submit(self: mirror.Mirror, record: mirror.Record) -> bool:
        try:
            while data := sock.recv(65536):
                got.append(data)
        except BlockingIOError:
            pass
        submitted.set()
        return real_submit(self, record)

    monkeypatch.setattr(mirror.Mirror, "submit", submit)
    with trio.fail_after(5):
        await submitted.wait()
    return b"".join(got)


async def test_a_lone_call_is_answered_before_its_record_is_made(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client of a connection with no other stream open does not wait for mirroring: when the
    record is submitted, the whole response is already in the client's socket buffer."""
    import h2.config
    import h2.connection
    import h2.events

    backend = await start_backend(nursery)
    app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "http2", backend.port)))
    with socket.create_connection((HOST, listen_port(app))) as sock:
        sock.setblocking(False)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/size/10")],
                          end_stream=True)
        sock.sendall(conn.data_to_send())
        received = await received_by_submit(monkeypatch, sock)
    assert any(isinstance(e, h2.events.StreamEnded) for e in conn.receive_data(received))


async def test_a_lone_thrift_call_is_answered_before_its_record_is_made(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.peers.gen.echo import Echo
    from tests.peers.thrift_peer import encode_call

    with ThriftServer("framed", "binary") as backend:
        app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "thrift", backend.port)))
        with socket.create_connection((HOST, listen_port(app))) as sock:
            sock.setblocking(False)
            call = encode_call("echo", Echo.echo_args(data=b"lone"), 1)
            sock.sendall(struct.pack("!I", len(call)) + call)
            reply = await received_by_submit(monkeypatch, sock)
    assert len(reply) > 4 and struct.unpack("!I", reply[:4])[0] == len(reply) - 4 and reply.endswith(b"lone\x00")


async def test_grpc_calls_are_mirrored_with_trailers(
    nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, object]
) -> None:
    port, _ = grpc_server
    app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "http2", port)))

    def calls() -> None:
        with grpc.insecure_channel(f"{HOST}:{listen_port(app)}") as ch:
            unary = ch.unary_unary(UNARY)
            for i in range(10):
                assert unary(b"msg-%d" % i, timeout=5) == b"msg-%d" % i

    await trio.to_thread.run_sync(calls)
    await written(app, 10)
    records = list(mirror.read_spool(tmp_path / "spool"))
    assert len(records) == 10 and reconciles(app)
    r = records[3]
    assert r.meta["protocol"] == "grpc" and r.meta["path"] == UNARY and r.meta["grpc_status"] == "0"
    assert r.request == b"\x00" + struct.pack("!I", 5) + b"msg-3" and r.response.endswith(b"msg-3")
    assert ["x-trailing", "2"] in r.meta["response_trailers"]


async def test_thrift_calls_are_mirrored_byte_for_byte(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer("framed", "binary") as backend:
        app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "thrift", backend.port)))

        def calls() -> None:
            with client(listen_port(app)) as c:
                for i in range(15):
                    assert c.echo(b"t%d" % i) == b"t%d" % i

        await trio.to_thread.run_sync(calls)
        await written(app, 15)
    records = list(mirror.read_spool(tmp_path / "spool"))
    assert len(records) == 15 and reconciles(app)
    r = records[7]
    assert (r.meta["protocol"], r.meta["path"], r.meta["service"], r.meta["status"]) == ("thrift", "/Echo/echo", "Echo", 200)
    # The whole framed call, as the client sent it: length prefix, strict binary head, args.
    assert struct.unpack("!I", r.request[:4])[0] == len(r.request) - 4
    assert r.request[4:8] == b"\x80\x01\x00\x01" and b"echo" in r.request and r.request.endswith(b"t7\x00")
    assert r.response[4:8] == b"\x80\x01\x00\x02"


async def test_a_dead_sink_never_fails_calls_and_counts_add_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    (tmp_path / "spool").write_text("a file where the spool directory should be")  # every write fails
    app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "http2", backend.port, "\n  queue_size: 5")))
    c = await H2Client.connect(listen_port(app))
    for _ in range(40):
        status, _, _, _ = await c.get("/size/10")
        assert status == 200
    await c.aclose()
    await eventually(lambda: metric(app, "meshproxy_mirror_in_flight") == 0, timeout=5)
    assert metric(app, "meshproxy_mirror_records_total", result="sampled") == 40
    assert metric(app, "meshproxy_mirror_records_total", result="written") == 0
    assert metric(app, "meshproxy_mirror_dropped_total", reason="sink_down") >= 1
    assert reconciles(app)


@pytest.mark.needs("h2load")
def test_sigkill_leaves_a_spool_that_reads_to_its_last_complete_record(tmp_path: Path) -> None:
    admin = free_port()
    port = free_port()
    text = config(tmp_path, "http2", 1).replace(f'address: "{HOST}:0"', f'address: "{HOST}:{admin}"', 1)
    text = text.replace(f'address: "{HOST}:0"', f'address: "{HOST}:{port}"', 1)
    path = write_config(tmp_path, text)
    with proxy_process(path, admin) as p:
        # Calls to a dead upstream still end (503) and are mirrored; keep them coming, then SIGKILL.
        cmd = ["h2load", "-n", "2000", "-c", "4", "-m", "4", f"http://{HOST}:{port}/x"]
        load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.8)
        p.signal(signal.SIGKILL)
        p.wait(5)
        load.kill()
        load.wait()
    files = mirror.segments(tmp_path / "spool")
    assert files
    records = list(mirror.read_spool(tmp_path / "spool"))
    assert records and all(r.meta["path"] == "/x" and r.meta["status"] == 503 for r in records)


def test_mirror_tail_prints_records(tmp_path: Path) -> None:
    sink = mirror.FileSink(sink_config(tmp_path))
    sink.write([mirror.encode(mirror.Record({"id": str(i), "protocol": "thrift" if i % 2 else "grpc", "path": "/a"},
                                            b"\x80\x01" + bytes(60))) for i in range(6)])
    sink.close()
    out = subprocess.run([sys.executable, "-m", "meshproxy", "mirror", "tail", str(tmp_path), "--protocol", "thrift"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    lines = [json.loads(x) for x in out]
    assert [x["id"] for x in lines] == ["1", "3", "5"]
    assert lines[0]["request_body"]["bytes"] == 62 and lines[0]["request_body"]["hex"].startswith("8001")
    bad = subprocess.run([sys.executable, "-m", "meshproxy", "mirror", "tail", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a spool directory" in bad.stderr



# -- replay ------------------------------------------------------------------------------


def replay(spool: Path | str, port: int, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "mirror", "replay", str(spool), "--to", f"{HOST}:{port}", *extra],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout.splitlines()[-1])


async def test_replay_thrift_reproduces_the_calls(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer("framed", "binary") as recorded:
        app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "thrift", recorded.port)))

        def calls() -> None:
            with client(listen_port(app)) as c:
                for i in range(5):
                    c.note(f"n{i}")
                    assert c.echo(b"e%d" % i) == b"e%d" % i
                assert c.notes() == 5

        await trio.to_thread.run_sync(calls)
        await written(app, 11)
    with ThriftServer("framed", "binary") as fresh:
        summary = await trio.to_thread.run_sync(replay, tmp_path / "spool", fresh.port)
        assert summary["sent"] == 11 and summary["succeeded"] == 11 and summary["failed"] == 0
        assert summary["status_differs_from_record"] == 0

        def notes() -> int:
            with client(fresh.port) as c:
                return c.notes()  # type: ignore[no-any-return]

        # The fresh backend received the 5 oneway notes (and answered the rest).
        assert await trio.to_thread.run_sync(notes) == 5


async def test_replay_grpc_and_http2(nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, object]) -> None:
    port, service = grpc_server
    app = await start_proxy(nursery, write_config(tmp_path, config(tmp_path, "http2", port)))

    def calls() -> None:
        with grpc.insecure_channel(f"{HOST}:{listen_port(app)}") as ch:
            for i in range(6):
                ch.unary_unary(UNARY)(b"r%d" % i, metadata=(("x-replayed", "yes"),), timeout=5)

    await trio.to_thread.run_sync(calls)
    await written(app, 6)
    service.metadata = []  # type: ignore[attr-defined]
    summary = await trio.to_thread.run_sync(replay, tmp_path / "spool", port, "--pace", "rate", "--rate", "200")
    assert (summary["sent"], summary["succeeded"], summary["status_differs_from_record"]) == (6, 6, 0)
    assert ("x-replayed", "yes") in service.metadata  # type: ignore[attr-defined]


# -- queues: real redis-server and nats-server ------------------------------------------------


def _serve(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import socket

            socket.create_connection((HOST, port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{argv[0]} did not listen on {port}")


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = _serve(["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"], port)
    yield port
    proc.kill()
    proc.wait(5)


@pytest.fixture
def nats_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = _serve(["nats-server", "-js", "-a", HOST, "-p", str(port), "-sd", str(tmp_path / "nats")], port)
    yield port
    proc.kill()
    proc.wait(5)


def queue_config(tmp_path: Path, port: int, sink: str) -> str:
    return config(tmp_path, "thrift", port).replace(
        f"  sink: {{type: file, directory: {tmp_path / 'spool'}, fsync: never}}", f"  sink: {sink}"
    )


@pytest.mark.needs("redis-server")
async def test_thrift_calls_to_redis_streams(nursery: trio.Nursery, tmp_path: Path, redis_port: int) -> None:
    import redis

    url = f"redis://{HOST}:{redis_port}"
    with ThriftServer("framed", "binary") as backend:
        text = queue_config(tmp_path, backend.port, f"{{type: redis, url: '{url}', stream: calls, max_length: 1000}}")
        app = await start_proxy(nursery, write_config(tmp_path, text))

        def calls(n: int) -> None:
            with client(listen_port(app)) as c:
                for i in range(n):
                    assert c.echo(b"r%d" % i) == b"r%d" % i

        await trio.to_thread.run_sync(calls, 12)
        await written(app, 12)
        r = redis.Redis.from_url(url)
        assert r.xlen("calls") == 12
        _, fields = r.xrange("calls", count=1)[0]
        assert fields[b"protocol"] == b"thrift" and fields[b"path"] == b"/Echo/echo" and fields[b"status"] == b"200"
        assert fields[b"request"].endswith(b"r0\x00") and mirror.decode_meta(fields[b"meta"])["service"] == "Echo"
        tail = subprocess.run([sys.executable, "-m", "meshproxy", "mirror", "tail", f"{url}#calls"],
                              capture_output=True, text=True, timeout=30)
        assert len(tail.stdout.splitlines()) == 12
        # The queue dies mid-run: calls go on, records drop (counted), the counters add up.
        r.shutdown(nosave=True)
        await trio.to_thread.run_sync(calls, 20)
        await eventually(lambda: metric(app, "meshproxy_mirror_in_flight") == 0, timeout=10)
        assert metric(app, "meshproxy_mirror_dropped_total", reason="sink_down") >= 1
        assert metric(app, "meshproxy_mirror_records_total", result="sampled") == 32
        assert reconciles(app)


@pytest.mark.needs("nats-server")
async def test_grpc_calls_to_nats_jetstream_and_replay(
    nursery: trio.Nursery, tmp_path: Path, nats_port: int, grpc_server: tuple[int, object]
) -> None:
    port, _ = grpc_server
    url = f"nats://{HOST}:{nats_port}"
    text = config(tmp_path, "http2", port).replace(
        f"  sink: {{type: file, directory: {tmp_path / 'spool'}, fsync: never}}",
        f"  sink: {{type: nats, url: '{url}', subject: mesh.calls}}",
    )
    app = await start_proxy(nursery, write_config(tmp_path, text))

    def calls() -> None:
        with grpc.insecure_channel(f"{HOST}:{listen_port(app)}") as ch:
            for i in range(8):
                assert ch.unary_unary(UNARY)(b"n%d" % i, timeout=5) == b"n%d" % i

    await trio.to_thread.run_sync(calls)
    await written(app, 8)
    assert reconciles(app)
    summary = await trio.to_thread.run_sync(replay, f"{url}#mesh.calls", port)  # type: ignore[arg-type]
    assert (summary["sent"], summary["succeeded"], summary["status_differs_from_record"]) == (8, 8, 0)


async def test_mirror_on_one_route_only(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    text = f"""\
admin: {{address: "{HOST}:0"}}
mirror: {{sink: {{type: file, directory: {tmp_path / 'spool'}, fsync: never}}, flush_interval: 10ms}}
listeners:
  - name: test
    direction: egress
    address: "{HOST}:0"
    filters:
      - {{name: headers, request: {{set: {{x-from-listener: "1"}}}}}}
    routes:
      - match: {{prefix: /size/}}
        cluster: backend
        filters:
          - {{name: mirror, sample: 1.0}}
      - match: {{prefix: /}}
        cluster: backend
clusters:
  - name: backend
    endpoints: ["{HOST}:{backend.port}"]
"""
    app = await start_proxy(nursery, write_config(tmp_path, text))
    c = await H2Client.connect(listen_port(app))
    for path in ("/size/5", "/status/200", "/size/6", "/status/200"):
        assert (await c.get(path))[0] == 200
    await c.aclose()
    await written(app, 2)
    await trio.sleep(0.05)
    records = list(mirror.read_spool(tmp_path / "spool"))
    assert [r.meta["path"] for r in records] == ["/size/5", "/size/6"]
    # The listener's filters ran first: the mirrored request already carries their header.
    assert ["x-from-listener", "1"] in records[0].meta["request_headers"]


# -- tail --follow, from each kind of source --------------------------------------------


def _follow(source: str, write: object, n_before: int, n_after: int) -> list[dict]:
    """Start `tail --follow` after n_before records exist, write n_after more, read them all."""
    import queue
    import threading

    write(0, n_before)  # type: ignore[operator]
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy", "mirror", "tail", "--follow", source],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [got.put(x) for x in proc.stdout or ()], daemon=True).start()
    lines: list[dict] = []
    try:
        deadline = time.monotonic() + 20
        while len(lines) < n_before + n_after and time.monotonic() < deadline:
            try:
                lines.append(json.loads(got.get(timeout=0.5)))
            except queue.Empty:
                continue
            if len(lines) == n_before:
                write(n_before, n_after)  # type: ignore[operator]
        assert proc.poll() is None, "tail --follow exited: " + (proc.stderr.read().decode() if proc.stderr else "")
    finally:
        proc.kill()
        proc.wait(5)
    return lines


def _records(start: int, n: int) -> list[mirror.Record]:
    return [mirror.Record({"id": f"f{i}", "protocol": "grpc", "path": "/a", "listener": "l"}, b"req%d" % i)
            for i in range(start, start + n)]


def test_tail_follow_spool(tmp_path: Path) -> None:
    sink = mirror.FileSink(sink_config(tmp_path))

    def write(start: int, n: int) -> None:
        sink.write([mirror.encode(r) for r in _records(start, n)])

    lines = _follow(str(tmp_path), write, 2, 3)
    sink.close()
    assert [x["id"] for x in lines] == [f"f{i}" for i in range(5)]


@pytest.mark.needs("redis-server")
def test_tail_follow_redis(redis_port: int) -> None:
    url = f"redis://{HOST}:{redis_port}"
    sink = mirror.RedisSink(MirrorConfig(sink=MirrorSink(type="redis", url=url, stream="calls")))

    def write(start: int, n: int) -> None:
        sink.write([mirror.RedisSink.prepare(r) for r in _records(start, n)])

    lines = _follow(f"{url}#calls", write, 2, 3)
    sink.close()
    assert [x["id"] for x in lines] == [f"f{i}" for i in range(5)]
    assert lines[0]["request_body"]["text"] == "req0" and lines[0]["route"] is None  # a left-out default is back


@pytest.mark.needs("nats-server")
def test_tail_follow_nats(nats_port: int) -> None:
    url = f"nats://{HOST}:{nats_port}"
    sink = mirror.NatsSink(MirrorConfig(sink=MirrorSink(type="nats", url=url, subject="mesh.follow")))

    def write(start: int, n: int) -> None:
        sink.write([mirror.NatsSink.prepare(r) for r in _records(start, n)])

    lines = _follow(f"{url}#mesh.follow", write, 2, 3)
    sink.close()
    assert [x["id"] for x in lines] == [f"f{i}" for i in range(5)]


async def test_a_writer_that_cannot_start_leaves_records_queued_and_close_still_writes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from prometheus_client import CollectorRegistry

    starts: list[int] = []

    def refuse(self: threading.Thread) -> None:
        starts.append(1)
        raise RuntimeError("can't start new thread")

    metrics = Metrics.create(CollectorRegistry())
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=str(tmp_path))), metrics)
    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        assert all(m.submit(mirror.Record({"i": i})) for i in range(3))
    assert len(starts) == 1  # tried once, not once per record
    assert counted(metrics) == {"sampled": 3, "written": 0, "sink_down": 0, "shutdown": 0, "in_flight": 3}
    await m.close(5)
    assert counted(metrics) == {"sampled": 3, "written": 3, "sink_down": 0, "shutdown": 0, "in_flight": 0}
    assert len(list(mirror.read_spool(tmp_path))) == 3
