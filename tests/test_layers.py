"""The layering rule, checked on the source with `ast` (STYLE.md, "Shape").

    codec/    sans-IO: no trio, no sockets, no clock reads; imports only codec/
    drivers/  trio; never the layers above it
    filters/  Call/Response only: never codec/ or drivers/

Every import counts, wherever it sits (function bodies, TYPE_CHECKING
blocks): a layer's dependencies are what its source names. One test per
module, so a failure names the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meshproxy

PACKAGE = Path(meshproxy.__file__).resolve().parent

# Modules above the drivers: the wiring, and the layers that use drivers.
ABOVE_DRIVERS = (
    "meshproxy.filters",
    "meshproxy.upstream",
    "meshproxy.mirror",
    "meshproxy.ingress",
    "meshproxy.egress",
    "meshproxy.admin",
    "meshproxy.app",
    "meshproxy.proxy",
    "meshproxy.thrift_proxy",
    "meshproxy.listener",
    "meshproxy.cli",
    "meshproxy.demo",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) for everything `source` imports; `from a import b` gives a and a.b."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imported_names(
        path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py"
    )


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(path: Path, banned: tuple[str, ...], allowed_own: str | None = None) -> list[str]:
    """Imports of `path` under `banned`, or (if `allowed_own`) of meshproxy outside it."""
    worst: dict[int, str] = {}  # line -> the most specific offending name on it
    for line, name in imports_of(path):
        bad = under(name, banned)
        if allowed_own is not None and under(name, ("meshproxy",)) and name != "meshproxy":
            bad = bad or not under(name, (allowed_own,))
        if bad and len(name) > len(worst.get(line, "")):
            worst[line] = name
    return [f"{rel(path)}:{line}: imports {name}" for line, name in sorted(worst.items())]


def layer(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_layers_exist() -> None:
    for folder in ("codec", "drivers", "filters"):
        assert layer(folder), f"meshproxy/{folder}/ has no modules"


@pytest.mark.parametrize("path", layer("codec"), ids=rel)
def test_codec_is_sans_io(path: Path) -> None:
    """No event loop, no sockets, no clock; and nothing of meshproxy but codec/ and the
    pure leaf modules every layer shares (HTTP field rules, gRPC status codes)."""
    found = [
        f"{rel(path)}:{line}: imports {name}"
        for line, name in imports_of(path)
        if under(name, ("trio", "socket", "time", "meshproxy.drivers"))
        or (under(name, ("meshproxy",)) and not under(name, ("meshproxy.codec", *PURE_LEAVES)))
    ]
    assert not found, "\n".join(found)


PURE_LEAVES = ("meshproxy.fields", "meshproxy.status")


@pytest.mark.parametrize("leaf", ["fields", "status"])
def test_shared_leaves_import_nothing_of_meshproxy(leaf: str) -> None:
    path = Path(__file__).parent.parent / "meshproxy" / f"{leaf}.py"
    assert not [name for _, name in imports_of(path) if under(name, ("meshproxy", "trio", "socket"))]


@pytest.mark.parametrize("path", layer("filters"), ids=rel)
def test_filters_do_not_import_codec_or_drivers(path: Path) -> None:
    """Filters see Call/Response only (STYLE.md: a test "fails if filters/ imports codec/drivers")."""
    found = violations(path, ("meshproxy.codec", "meshproxy.drivers"))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", layer("drivers"), ids=rel)
def test_drivers_do_not_import_the_layers_above(path: Path) -> None:
    found = violations(path, ABOVE_DRIVERS)
    assert not found, "\n".join(found)


# The scanner itself: a rule that sees no imports would pass vacuously.


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("import trio", "trio"),
        ("import time as t", "time"),
        ("from time import monotonic", "time.monotonic"),
        ("def f():\n    import socket\n", "socket"),
        ("if TYPE_CHECKING:\n    from meshproxy.drivers.h2 import Stream\n", "meshproxy.drivers.h2"),
        ("from meshproxy import drivers", "meshproxy.drivers"),
        ("from ..drivers import h2", "meshproxy.drivers.h2"),
        ("from .. import drivers", "meshproxy.drivers"),
        ("from .h2 import CONNECTION_SPECIFIC", "meshproxy.codec.h2"),
    ],
)
def test_scanner_sees_every_import_form(source: str, name: str) -> None:
    names = [n for _, n in imported_names(source, "meshproxy.codec.example")]
    assert name in names


def test_scanner_finds_a_known_import() -> None:
    names = [n for _, n in imports_of(PACKAGE / "drivers" / "h2.py")]
    assert "meshproxy.codec.h2" in names
    assert "trio" in names
