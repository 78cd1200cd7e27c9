"""The other process of the shm stress tests: `python -m tests.shm.peer MODE FD [COUNT SEED]`.

FD is the inherited unix socket of a socketpair whose other end made the
segment (meshproxy.shm.accept). `write` sends COUNT messages of random sizes
(seeded), each `len u32 | seq u32 | crc32 u32 | payload`, then closes;
`spam` writes forever (to be killed with SIGKILL mid-stream).
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import zlib

from meshproxy import shm

HEAD = struct.Struct("!III")
POOL = random.Random(1).randbytes(1 << 16)


def message(rng: random.Random, seq: int, max_size: int) -> bytes:
    size = rng.randrange(max_size + 1)
    start = rng.randrange(len(POOL) - size + 1)
    payload = POOL[start : start + size]
    return HEAD.pack(size, seq, zlib.crc32(payload)) + payload


def main() -> None:
    mode, fd = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    out = shm.ShmSocket(shm._receive(sock), timeout=60)
    if mode == "write":
        count, seed, max_size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        rng = random.Random(seed)
        batch: list[bytes] = []
        for seq in range(count):
            batch.append(message(rng, seq, max_size))
            if len(batch) == 64:  # one sendall per 64 messages: the ring sees every size at every offset anyway
                out.sendall(b"".join(batch))
                batch.clear()
        if batch:
            out.sendall(b"".join(batch))
        out.close()
    elif mode == "spam":
        chunk = POOL[:4000]
        while True:
            out.sendall(chunk)


if __name__ == "__main__":
    main()
