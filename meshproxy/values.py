"""Parsers for the scalar values a config holds: durations, sizes, addresses.

Each raises ValueError with a message fit to follow a key path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s|m|h)$")
_DURATION_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^(\d+)(B|KiB|MiB|GiB)?$")
_SIZE_SCALE = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_duration(value: object) -> float:
    """'250ms', '5s', '1.5m', '0s' -> seconds."""
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _DURATION_SCALE[m.group(2)]
    raise ValueError(f"expected a duration like 250ms, 5s or 1m, got {value!r}")


def parse_positive_duration(value: object) -> float:
    """A duration above zero (timeouts, intervals, windows)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """65536, '64KiB', '4MiB' -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_SCALE[m.group(2)]
    raise ValueError(f"expected a size like 65536, 64KiB or 4MiB, got {value!r}")


def parse_percent(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
        return float(value)
    raise ValueError(f"expected a percentage from 0 to 100, got {value!r}")


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen or connect: TCP host:port, a unix socket path, or shm:NAME."""

    kind: str  # "tcp" | "unix" | "shm" (path holds the name)
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "shm":
            return f"shm:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_SHM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def parse_address(value: object, *, allow_port_zero: bool = False) -> Address:
    """'127.0.0.1:15001', '[::1]:80', 'localhost:80', 'unix:/run/x.sock'."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an address like 127.0.0.1:15001 or unix:/path, got {value!r}")
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        return Address("unix", path=path)
    if value.startswith("shm:"):
        name = value[4:]
        if not _SHM_NAME.fullmatch(name):
            raise ValueError(f"shm: names are letters, digits, '.', '_' and '-', got {name!r}")
        return Address("shm", path=name)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return Address("tcp", host=host, port=port)
