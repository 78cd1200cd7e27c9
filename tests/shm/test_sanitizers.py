"""The ring's C tests again, against a build with -fsanitize=address,undefined.

The ring is compiled through the same cffi builder (meshproxy/_shm_build.py)
with the sanitizers on, and tests/shm/test_ring.py runs in a subprocess with
libasan preloaded (Python itself is not instrumented) and every UBSan finding
made fatal. Any out-of-bounds access or undefined behaviour fails this test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")


def _libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.fail(f"gcc has no libasan ({path!r}): install gcc's sanitizer runtime (libasan8)")
    return path


@pytest.mark.needs("gcc")
def test_ring_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    from meshproxy._shm_build import make

    make("_shm_ring_sanitized", SANITIZE, absolute=True).compile(tmpdir=str(tmp_path), verbose=False)
    env = dict(
        os.environ,
        MESHPROXY_RING_MODULE="_shm_ring_sanitized",
        MESHPROXY_RING_DIR=str(tmp_path),
        LD_PRELOAD=_libasan(),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",  # CPython's own allocations are not ours to judge
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/shm/test_ring.py")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr
