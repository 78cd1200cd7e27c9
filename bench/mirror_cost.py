"""Per-call CPU cost of the mirror filter on the call path, in process (no sockets).

    python3 bench/mirror_cost.py

Times what a mirrored call adds to the event loop: on_request, one request
and one response chunk seen by the observers, the completion hook, and submit (encoding included) into a file-sink Mirror whose writer is
not running. The writer's own cost is on a worker thread (and in the end-to-end
bench, bench/run.py --targets meshproxy,meshproxy-mirror).
"""

from __future__ import annotations

import gc
import tempfile
import time

from prometheus_client import CollectorRegistry

from meshproxy import mirror
from meshproxy.call import Call, Completion, EmptyBody, Peer, Protocol
from meshproxy.config import MirrorConfig, MirrorSink
from meshproxy.filters.mirror import MirrorFilter
from meshproxy.metrics import Metrics

REPS = 5


def run_coro(coro):  # the filter never awaits anything: drive it by hand
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    raise RuntimeError("filter awaited")


def main() -> None:
    d = tempfile.mkdtemp()
    m = mirror.Mirror(MirrorConfig(sink=MirrorSink(directory=d), queue_size=10**7), Metrics.create(CollectorRegistry()))
    mirror.install(m)
    f = MirrorFilter.from_options({"sample": 1.0, "max_body_bytes": 65536, "capture_response": True})
    headers = [(b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*"), (b"te", b"trailers"),
               (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    resp_headers = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"128"), (b"server", b"nginx")]
    chunk_req, chunk_resp = b"x" * 100, b"y" * 128
    n = 20_000
    best = {False: float("inf"), True: float("inf")}
    gc.freeze()
    for mirrored in (False, True) * REPS:
        m._queue.clear()
        t0 = time.perf_counter()
        for i in range(n):
            call = Call(i, Protocol.HTTP2, Peer("127.0.0.1:1"), "bench", "egress", "origin", "POST", "/small",
                        list(headers), EmptyBody(), 0.0, request_id="r")
            if mirrored:
                run_coro(f.on_request(call))
                for obs in call.request_observers:
                    obs(call, chunk_req)
                for obs in call.response_observers:
                    obs(call, chunk_resp)
                done = Completion(200, "", "", 0.001, "127.0.0.1:2", None, resp_headers)
                for hook in call.completion_hooks:
                    hook(call, done)
                if len(m._queue) >= 256:  # what the writer takes every flush_interval
                    kept = m._queue.popleft()
                    m._queue.clear()
        best[mirrored] = min(best[mirrored], (time.perf_counter() - t0) / n)
    for mirrored, label in ((False, "without mirror"), (True, "with mirror")):
        print(f"{label:15s}: {best[mirrored] * 1e6:6.2f} µs per call (best of {REPS})")
    print(f"bytes per record: {len(kept)}")


if __name__ == "__main__":
    main()
