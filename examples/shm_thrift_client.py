"""An app calling through its sidecar over shared memory, with a plain Apache thrift client.

    python -m tests.peers.thrift_peer serve --port 9100 --transport framed --protocol binary &
    meshproxy --conf conf/egress.yaml &
    python examples/shm_thrift_client.py

`shm.connect("app")` reaches the listener `address: "shm:app"` (its unix
socket lives in the `shm.directory` of the sidecar's config; the default is
$XDG_RUNTIME_DIR/meshproxy or /tmp/meshproxy-UID). What it returns is
socket-like, so thrift's TSocket takes it as its handle: every byte after the
one-time handshake goes through the shared-memory rings.
"""

from __future__ import annotations

import sys
from pathlib import Path

from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

from meshproxy import shm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test IDL's generated code
from tests.peers.gen.echo import Echo


def main() -> None:
    handle = TSocket.TSocket()
    handle.setHandle(shm.connect("app"))
    transport = TTransport.TFramedTransport(handle)
    client = Echo.Client(TBinaryProtocol.TBinaryProtocol(transport))
    try:
        print(client.echo(b"hello over shared memory"))
        print(client.greet("shm"))
    finally:
        transport.close()


if __name__ == "__main__":
    main()
