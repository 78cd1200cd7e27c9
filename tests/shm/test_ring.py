"""The C ring through cffi: empty/full, every record size across the wrap, corruption.

By default this uses the module `pip install` built (meshproxy._shm_ring).
tests/shm/test_sanitizers.py runs this same file again in a subprocess
against a build with -fsanitize=address,undefined (MESHPROXY_RING_MODULE
names it), so every case here also runs under ASan and UBSan.
"""

from __future__ import annotations

import importlib
import os
import struct
import sys

import pytest

if os.environ.get("MESHPROXY_RING_MODULE"):
    sys.path.insert(0, os.environ["MESHPROXY_RING_DIR"])
    _mod = importlib.import_module(os.environ["MESHPROXY_RING_MODULE"])
else:
    from meshproxy import _shm_ring as _mod

ffi, lib = _mod.ffi, _mod.lib
HEADER = lib.SHM_RING_HEADER
OK, EAGAIN, ETOOBIG, ECORRUPT, EINVAL, ESTATE = (
    lib.SHM_RING_OK, lib.SHM_RING_EAGAIN, lib.SHM_RING_ETOOBIG, lib.SHM_RING_ECORRUPT,
    lib.SHM_RING_EINVAL, lib.SHM_RING_ESTATE,
)
HEAD_AT, WRITER_WAITING_AT, TAIL_AT, READER_WAITING_AT = 64, 72, 128, 136


class Pair:
    """One ring in a private buffer, with a producer and a consumer handle."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = lib.shm_ring_region_size(capacity)
        self.mem = ffi.new("unsigned char[]", self.size)
        assert lib.shm_ring_init(self.mem, self.size, capacity) == OK
        self.tx = ffi.new("shm_ring *")
        self.rx = ffi.new("shm_ring *")
        assert lib.shm_ring_attach(self.tx, self.mem, self.size) == OK
        assert lib.shm_ring_attach(self.rx, self.mem, self.size) == OK
        self.max = lib.shm_ring_max_record(capacity)

    def write(self, data: bytes) -> int:
        return int(lib.shm_ring_write(self.tx, data, len(data)))

    def read(self) -> tuple[int, bytes]:
        buf = ffi.new("char[]", max(self.max, 1))
        n = ffi.new("uint32_t *")
        rc = lib.shm_ring_read(self.rx, buf, self.max, n)
        return rc, ffi.buffer(buf, n[0])[:] if rc == OK else b""

    def poke64(self, at: int, value: int) -> None:
        ffi.buffer(self.mem + at, 8)[:] = struct.pack("<Q", value)

    def poke32(self, at: int, value: int) -> None:
        ffi.buffer(self.mem + at, 4)[:] = struct.pack("<I", value)


def test_empty_then_one_record() -> None:
    p = Pair(256)
    assert p.read() == (EAGAIN, b"")
    assert p.write(b"abc") == OK
    assert p.read() == (OK, b"abc")
    assert p.read() == (EAGAIN, b"")


def test_full_ring_refuses_then_frees() -> None:
    p = Pair(256)
    written = 0
    while p.write(b"x" * 24) == OK:  # 32 bytes a record
        written += 1
    assert written == 256 // 32
    assert p.write(b"") == EAGAIN  # not even an empty record fits
    assert p.read() == (OK, b"x" * 24)
    assert p.write(b"y" * 24) == OK  # the freed 32 bytes
    assert p.write(b"y") == EAGAIN


def test_max_record_and_too_big() -> None:
    p = Pair(256)
    assert p.max == 256 // 2 - 8
    assert p.write(b"m" * (p.max + 1)) == ETOOBIG
    assert p.write(b"m" * p.max) == OK
    assert p.read() == (OK, b"m" * p.max)


@pytest.mark.parametrize("capacity", [64, 256])
def test_every_record_size_across_the_wrap(capacity: int) -> None:
    """Every size 0..max from every 8-byte start position: each record round-trips intact."""
    p = Pair(capacity)
    for start in range(0, capacity, 8):
        for size in range(p.max + 1):
            # Move the ring to `start` (empty), then write one record of `size` and read it back.
            while (int(p.tx.head) & (capacity - 1)) != start:
                assert p.write(b"") == OK
                assert p.read() == (OK, b"")
            payload = bytes((size + i) % 251 for i in range(size))
            assert p.write(payload) == OK, (start, size)
            assert p.read() == (OK, payload), (start, size)
    assert lib.shm_ring_readable(p.rx) == 0


def test_reserve_commit_and_peek_release() -> None:
    p = Pair(256)
    out = ffi.new("void **")
    assert lib.shm_ring_commit(p.tx) == ESTATE
    assert lib.shm_ring_reserve(p.tx, 5, out) == OK
    assert lib.shm_ring_reserve(p.tx, 5, out) == ESTATE
    ffi.memmove(ffi.cast("char *", out[0]), b"hello", 5)
    assert lib.shm_ring_readable(p.rx) == 0  # nothing visible before commit
    assert lib.shm_ring_commit(p.tx) == OK
    ptr, n = ffi.new("void **"), ffi.new("uint32_t *")
    assert lib.shm_ring_release(p.rx) == ESTATE
    assert lib.shm_ring_peek(p.rx, ptr, n) == OK and n[0] == 5
    assert lib.shm_ring_peek(p.rx, ptr, n) == OK and n[0] == 5  # peek again: the same record
    assert ffi.buffer(ptr[0], 5)[:] == b"hello"
    assert lib.shm_ring_release(p.rx) == OK
    assert lib.shm_ring_peek(p.rx, ptr, n) == EAGAIN


def test_write_some_splits_and_read_some_joins() -> None:
    p = Pair(1024)
    data = bytes(range(256)) * 3
    src = ffi.from_buffer(data)
    assert lib.shm_ring_write_some(p.tx, src, len(data)) == len(data)  # 768 > max 504: two records
    buf = ffi.new("char[]", 1000)
    off = ffi.new("uint32_t *")
    got = b""
    while True:
        n = lib.shm_ring_read_some(p.rx, buf, 100, off)  # reads across record boundaries, 100 at a time
        if n == 0:
            break
        got += ffi.buffer(buf, n)[:]
    assert got == data and off[0] == 0
    # A full ring takes only part, and the rest later.
    big = b"z" * 5000
    first = lib.shm_ring_write_some(p.tx, ffi.from_buffer(big), len(big))
    assert 0 < first < 1024
    assert lib.shm_ring_write_some(p.tx, ffi.from_buffer(big), len(big)) == 0


def test_wake_flags() -> None:
    p = Pair(256)
    assert lib.shm_ring_reader_needs_wake(p.tx) == 0  # nobody sleeps yet
    assert lib.shm_ring_reader_sleep(p.rx) == 0  # empty: sleep
    assert p.write(b"x") == OK
    assert lib.shm_ring_reader_needs_wake(p.tx) == 1  # the reader sleeps: ring once
    assert lib.shm_ring_reader_needs_wake(p.tx) == 0  # ... not twice
    p.read()
    assert lib.shm_ring_reader_sleep(p.rx) == 0
    lib.shm_ring_reader_awake(p.rx)
    assert p.write(b"x") == OK
    assert lib.shm_ring_reader_needs_wake(p.tx) == 0  # awake readers are not rung
    assert lib.shm_ring_reader_sleep(p.rx) == 1  # data came before it slept: do not sleep
    # The writer side.
    while p.write(b"y" * 24) == OK:
        pass
    assert lib.shm_ring_writer_sleep(p.tx, 24) == 0
    assert p.read()[0] == OK
    assert lib.shm_ring_writer_needs_wake(p.rx) == 1


def test_doorbell_on_an_eventfd() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert lib.shm_ring_doorbell_drain(fd) == 0  # nothing to drain is fine
        assert lib.shm_ring_doorbell_ring(fd) == 0
        assert lib.shm_ring_doorbell_ring(fd) == 0
        assert os.eventfd_read(fd) == 2
    finally:
        os.close(fd)
    assert lib.shm_ring_doorbell_ring(-1) < 0


# -- never trusting the other side ---------------------------------------------------


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        (0, 0xDEADBEEF, "magic"),
        (4, 2, "version"),
        (8, 100, "capacity not a power of two"),
        (8, 1 << 40, "capacity larger than the region"),
    ],
)
def test_attach_rejects_bad_headers(where: int, value: int, problem: str) -> None:
    p = Pair(256)
    if where == 8:
        p.poke64(8, value)
    else:
        p.poke32(where, value)
    h = ffi.new("shm_ring *")
    assert lib.shm_ring_attach(h, p.mem, p.size) == EINVAL, problem
    assert lib.shm_ring_attach(h, p.mem, 10) == EINVAL
    assert lib.shm_ring_init(p.mem, p.size, 100) == EINVAL


@pytest.mark.parametrize(
    ("name", "at", "value"),
    [
        ("head past a ring ahead", HEAD_AT, 256 + 64),
        ("head not 8-aligned", HEAD_AT, 12),
        ("head going backwards", HEAD_AT, 0),
    ],
)
def test_consumer_detects_bad_head(name: str, at: int, value: int) -> None:
    p = Pair(256)
    assert p.write(b"abc") == OK and p.write(b"def") == OK
    assert p.read() == (OK, b"abc")
    p.poke64(at, value)
    assert p.read()[0] == ECORRUPT, name
    assert p.read()[0] == ECORRUPT  # poisoned for good
    assert lib.shm_ring_readable(p.rx) == 1  # a sleeper wakes to see the error


@pytest.mark.parametrize(
    ("name", "value"), [("tail past head", 72), ("tail going backwards", 16), ("tail not 8-aligned", 33)]
)
def test_producer_detects_bad_tail(name: str, value: int) -> None:
    p = Pair(256)
    for _ in range(3):
        assert p.write(b"abcdefgh") == OK
    p.read()
    p.read()
    assert p.write(b"seen") == OK  # the producer has now seen tail = 32
    p.poke64(TAIL_AT, value)
    assert p.write(b"x") == ECORRUPT, name
    assert lib.shm_ring_write_some(p.tx, ffi.from_buffer(b"xy"), 2) == ECORRUPT


@pytest.mark.parametrize(
    ("name", "length"),
    [("longer than the biggest record", 10_000), ("past what was committed", 40), ("wrap marker at 0", 0xFFFFFFFF)],
)
def test_consumer_detects_bad_record_lengths(name: str, length: int) -> None:
    p = Pair(256)
    assert p.write(b"abc") == OK  # 8 bytes committed
    p.poke32(HEADER, length)
    assert p.read()[0] == ECORRUPT, name


def test_a_wrap_marker_past_committed_bytes_is_corrupt() -> None:
    p = Pair(256)
    for _ in range(7):
        assert p.write(b"a" * 24) == OK and p.read()[0] == OK  # tail and head at 224
    assert p.write(b"b") == OK  # 8 bytes at 224
    p.poke32(HEADER + 224, 0xFFFFFFFF)  # claims the 32-byte end is unused: more than committed
    assert p.read()[0] == ECORRUPT


def test_garbage_everywhere_never_reads_out_of_bounds() -> None:
    """Random headers and data: only codes come back (ASan checks the "never out of bounds")."""
    import random

    rng = random.Random(7)
    for _ in range(3000):
        p = Pair(128)
        for _ in range(rng.randrange(4)):
            p.write(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        for _ in range(rng.randrange(1, 4)):
            at = rng.choice([HEAD_AT, TAIL_AT, HEADER + 8 * rng.randrange(16)])
            if at in (HEAD_AT, TAIL_AT):
                p.poke64(at, rng.choice([rng.randrange(1 << 64), rng.randrange(512), 8 * rng.randrange(64)]))
            else:
                p.poke32(at, rng.choice([rng.randrange(1 << 32), rng.randrange(128), 0xFFFFFFFF]))
        for _ in range(6):
            assert p.read()[0] in (OK, EAGAIN, ECORRUPT)
            assert p.write(b"q" * rng.randrange(60)) in (OK, EAGAIN, ECORRUPT, ETOOBIG)
