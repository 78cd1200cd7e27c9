#!/usr/bin/env python3
"""The shared-memory path side by side: the ring from C, the ring from Python, unix sockets, TCP.

    python3 bench/shm_run.py [--quick] [--json out.json]

For 64 B, 1 KiB, 16 KiB and 256 KiB messages, in one run:

  pingpong   one message each way per round trip; p50 and mean round trip
  stream     one-way: messages back to back, then one byte back; MiB/s

over (a) the ring from C (bench/shm_ring_bench.c, built here with gcc against
meshproxy/shm_ring.c), (b) the ring through Python (`meshproxy.shm.ShmSocket`
on both sides, the segment made by `shm.accept` as the sidecar does), (c) a
unix socketpair and (d) TCP on loopback, both plain blocking Python sockets.
The two processes are pinned to CPUs 0 and 1.

Then one end-to-end figure: Thrift calls per second from an app to meshproxy
over shm versus over TCP. The app (pinned to CPU 1, with the C echo backend
bench/thrift_echo_server.c) keeps 32 (then 1) framed-binary echo calls in
flight on one connection; meshproxy runs on CPU 0 with a thrift listener on `shm:bench`
and one on TCP, both routed to the same backend.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SIZES = [64, 1024, 16 * 1024, 256 * 1024]
KINDS = ["shm", "unix", "tcp"]


def pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


def recv_exactly(sock: object, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))  # type: ignore[attr-defined]
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


# -- the child: echo or drain -----------------------------------------------------------


def child(kind: str, mode: str, fd: int, size: int, count: int) -> None:
    from meshproxy import shm

    pin(1)
    raw = socket.socket(fileno=fd)
    sock: object = shm.ShmSocket(shm._receive(raw), timeout=120) if kind == "shm" else raw
    sock.sendall(b"r")  # type: ignore[attr-defined]  # ready: the parent's clock starts after our start-up
    if mode == "pingpong":
        for _ in range(count):
            sock.sendall(recv_exactly(sock, size))  # type: ignore[attr-defined]
    else:
        got = 0
        while got < count:
            chunk = sock.recv(1 << 20)  # type: ignore[attr-defined]
            if not chunk:
                break
            got += len(chunk)
        sock.sendall(b"k")  # type: ignore[attr-defined]
    sock.close()  # type: ignore[attr-defined]


def pair(kind: str, mode: str, size: int, count: int) -> tuple[object, subprocess.Popen[bytes]]:
    from meshproxy import shm

    if kind == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(listener.getsockname())
        mine, _ = listener.accept()
        listener.close()
        for s in (mine, theirs):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        mine, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, mode, str(theirs.fileno()), str(size), str(count)],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    sock: object = shm.ShmSocket(shm.accept(mine, 4 << 20), timeout=120) if kind == "shm" else mine
    recv_exactly(sock, 1)
    return sock, proc


def python_pingpong(kind: str, size: int, count: int) -> dict:
    sock, proc = pair(kind, "pingpong", size, count)
    msg = b"x" * size
    rtts = []
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        sock.sendall(msg)  # type: ignore[attr-defined]
        recv_exactly(sock, size)
        rtts.append(time.perf_counter() - t)
    secs = time.perf_counter() - start
    sock.close()  # type: ignore[attr-defined]
    proc.wait(30)
    return {"rtt_p50_us": round(statistics.median(rtts) * 1e6, 2), "rtt_mean_us": round(secs / count * 1e6, 2)}


def python_stream(kind: str, size: int, total: int) -> dict:
    sock, proc = pair(kind, "stream", size, total)
    msg = b"x" * size
    start = time.perf_counter()
    for _ in range(total // size):
        sock.sendall(msg)  # type: ignore[attr-defined]
    recv_exactly(sock, 1)
    secs = time.perf_counter() - start
    sock.close()  # type: ignore[attr-defined]
    proc.wait(30)
    return {"mib_per_s": round(total / secs / (1 << 20), 1)}


# -- end to end ---------------------------------------------------------------------------


def e2e(tmp: Path, seconds: float, depth: int) -> dict:
    """Calls per second app -> meshproxy over shm versus over TCP, the same pipelined app."""
    from meshproxy import shm

    build = tmp / "build"
    build.mkdir()
    server = build / "thrift_echo_server"
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-o", str(server), str(HERE / "thrift_echo_server.c")], check=True)
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    backend, tcp_port, admin = ports
    echo = subprocess.Popen(["taskset", "-c", "1", str(server), str(backend)], stdout=subprocess.DEVNULL)
    conf = tmp / "shm-bench.yaml"
    conf.write_text(f"""\
admin: {{address: 127.0.0.1:{admin}}}
shm: {{directory: {tmp}}}
listeners:
  - {{name: over-shm, direction: egress, address: "shm:bench", protocol: thrift,
     thrift: {{transport: framed, protocol: binary}}, routes: [{{match: {{}}, cluster: echo}}]}}
  - {{name: over-tcp, direction: egress, address: "127.0.0.1:{tcp_port}", protocol: thrift,
     thrift: {{transport: framed, protocol: binary}}, routes: [{{match: {{}}, cluster: echo}}]}}
clusters:
  - {{name: echo, protocol: thrift, thrift: {{transport: framed, protocol: binary, mux: true,
     max_requests_per_connection: 512}}, endpoints: ["127.0.0.1:{backend}"]}}
""")
    proxy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "meshproxy", "--conf", str(conf)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    out: dict = {"seconds": seconds}
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        pin(1)
        for d in (depth, 1):
            key = f"depth_{d}"
            out[key] = {
                "shm_calls_per_s": _drive(lambda: shm.connect("bench", directory=str(tmp), timeout=30), seconds, d),
                "tcp_calls_per_s": _drive(lambda: _tcp(tcp_port), seconds, d),
            }
            out[key]["shm_vs_tcp"] = round(out[key]["shm_calls_per_s"] / out[key]["tcp_calls_per_s"], 3)
    finally:
        proxy.terminate()
        echo.terminate()
        proxy.wait(10)
        echo.wait(10)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


def _tcp(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _call(seqid: int) -> bytes:
    payload = b"x" * 64
    msg = struct.pack("!Ii", 0x80010001, 4) + b"echo" + struct.pack("!i", seqid) + b"\x0b\x00\x01" + \
        struct.pack("!i", len(payload)) + payload + b"\x00"
    return struct.pack("!I", len(msg)) + msg


def _drive(connect: object, seconds: float, depth: int) -> float:
    """One connection, `depth` calls in flight, replies checked by seqid; calls per second."""
    sock = connect()  # type: ignore[operator]
    frame_len = len(_call(0))
    sent = done = 0
    for _ in range(depth):
        sock.sendall(_call(sent))
        sent += 1
    buf = b""
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        buf += sock.recv(1 << 16)
        k = len(buf) // frame_len
        if not k:
            continue
        for i in range(k):
            seqid = struct.unpack_from("!i", buf, i * frame_len + 16)[0]
            if seqid != done:
                raise RuntimeError(f"reply {seqid}, expected {done}")
            done += 1
        buf = buf[k * frame_len :]
        sock.sendall(b"".join(_call(sent + i) for i in range(k)))
        sent += k
    rate = done / (time.perf_counter() - start)
    sock.close()
    return round(rate, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    o = ap.parse_args()
    if o.child:
        kind, mode, fd, size, count = o.child
        child(kind, mode, int(fd), int(size), int(count))
        return 0
    rounds = 2000 if o.quick else 10000
    total = (64 << 20) if o.quick else (256 << 20)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, "stream_bytes": total,
                     "c_ring": {}, "python": {k: {} for k in KINDS}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = tmp / "shm_ring_bench"
        subprocess.run(["gcc", "-O2", "-std=gnu11", f"-I{ROOT / 'meshproxy'}", "-o", str(exe),
                        str(HERE / "shm_ring_bench.c"), str(ROOT / "meshproxy" / "shm_ring.c")], check=True)
        print(f"{'size':>8}  {'transport':10} {'rtt p50 us':>11} {'rtt mean us':>12} {'stream MiB/s':>13}")
        for size in SIZES:
            pp = json.loads(subprocess.run([str(exe), "pingpong", str(size), str(rounds)], capture_output=True,
                                           text=True, check=True).stdout)
            st = json.loads(subprocess.run([str(exe), "stream", str(size), str(total * 4)], capture_output=True,
                                           text=True, check=True).stdout)
            results["c_ring"][size] = {"rtt_p50_us": pp["rtt_p50_us"], "rtt_mean_us": pp["rtt_mean_us"],
                                       "mib_per_s": st["mib_per_s"]}
            print(f"{size:8d}  {'ring (C)':10} {pp['rtt_p50_us']:11.2f} {pp['rtt_mean_us']:12.2f} {st['mib_per_s']:13.1f}")
            pin(0)
            for kind in KINDS:
                r = python_pingpong(kind, size, rounds if size < 65536 else rounds // 4)
                r.update(python_stream(kind, size, total))
                results["python"][kind][size] = r
                label = "ring (py)" if kind == "shm" else kind
                print(f"{size:8d}  {label:10} {r['rtt_p50_us']:11.2f} {r['rtt_mean_us']:12.2f} {r['mib_per_s']:13.1f}",
                      flush=True)
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        ratios = {}
        for size in SIZES:
            s, u = results["python"]["shm"][size], results["python"]["unix"][size]
            ratios[size] = {"rtt_p50_shm_over_unix": round(s["rtt_p50_us"] / u["rtt_p50_us"], 3),
                            "throughput_shm_over_unix": round(s["mib_per_s"] / u["mib_per_s"], 3)}
        results["ratios"] = ratios
        print("\nshm / unix (Python level):", json.dumps(ratios))
        results["e2e_thrift"] = e2e(tmp, 3.0 if o.quick else 5.0, 32)
        print("end to end, Thrift app -> meshproxy:", json.dumps(results["e2e_thrift"]))
    if o.json:
        o.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
