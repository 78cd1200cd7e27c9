"""The real-peer fixtures themselves, client straight to server (no proxy)."""

from __future__ import annotations

import socket

import pytest
from thrift.Thrift import TApplicationException, TMessageType

from tests.thrift.gen.echo import Calc, Echo, ttypes
from tests.thrift.peers import (
    HOST,
    PROTOCOLS,
    TRANSPORTS,
    ThriftServer,
    decode_reply,
    encode_call,
    frame,
    make_client,
    read_frame,
)

MiB = 1 << 20


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_calls(transport: str, protocol: str) -> None:
    with ThriftServer(transport, protocol) as server:
        client, trans = make_client(server.port, transport, protocol)
        try:
            assert client.echo(b"hi") == b"hi"
            big = bytes(range(256)) * (MiB // 256)
            assert client.echo(big) == big
            assert client.greet("you") == "hello you"
            with pytest.raises(ttypes.Oops) as oops:
                client.greet("boom")
            assert oops.value.why == "boom"
            assert client.sleep(1) is None
            client.note("one way")  # no reply; the next call on this connection sees it
            assert client.notes() == 1
        finally:
            trans.close()


def test_pipelined_raw_frames() -> None:
    with ThriftServer("framed", "binary") as server:
        calls = [
            encode_call("echo", Echo.echo_args(data=b"first"), 1, "binary"),
            encode_call("greet", {"name": "boom"}, 2, "binary"),
            encode_call("echo", {"data": b"third"}, 3, "binary"),
        ]
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            sock.sendall(b"".join(frame(c) for c in calls))  # all three before any reply
            replies = [
                decode_reply(read_frame(sock), m, "binary") for m in ("echo", "greet", "echo")
            ]
        assert replies == [
            ("echo", TMessageType.REPLY, 1, b"first"),
            ("greet", TMessageType.REPLY, 2, ttypes.Oops(why="boom")),
            ("echo", TMessageType.REPLY, 3, b"third"),
        ]


def test_raw_unknown_method_gets_an_application_exception() -> None:
    with ThriftServer("framed", "compact") as server:
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            sock.sendall(frame(encode_call("nope", Echo.echo_args(data=b""), 7, "compact")))
            name, mtype, seqid, exc = decode_reply(read_frame(sock), "echo", "compact")
        assert (name, mtype, seqid) == ("nope", TMessageType.EXCEPTION, 7)
        assert isinstance(exc, TApplicationException)
        assert exc.type == TApplicationException.UNKNOWN_METHOD


def test_multiplexed_and_restart() -> None:
    with ThriftServer("header", "compact", multiplex=True) as server:
        calc, calc_trans = make_client(server.port, "header", "compact", "Calc", multiplexed=True)
        echo, echo_trans = make_client(server.port, "header", "compact", "Echo", multiplexed=True)
        try:
            assert calc.add(2, 3) == 5
            echo.note("x")
            assert echo.notes() == 1
        finally:
            calc_trans.close()
            echo_trans.close()
        port = server.port
        server.restart()
        assert server.port == port and server.running
        echo, echo_trans = make_client(server.port, "header", "compact", "Echo", multiplexed=True)
        try:
            assert echo.notes() == 0  # a fresh process
        finally:
            echo_trans.close()
    assert not server.running


def test_calc_on_its_own_port() -> None:
    with ThriftServer("buffered", "binary", service="Calc") as server:
        client, trans = make_client(server.port, "buffered", "binary", "Calc")
        try:
            assert isinstance(client, Calc.Client)
            assert client.add(-1, 1) == 0
        finally:
            trans.close()


def test_a_server_that_cannot_listen_says_why() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        server = ThriftServer(port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
        assert server.proc is None
