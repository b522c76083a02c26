"""The sans-IO core stays sans-IO: natd.wire and natd.stack never import the shell's world.

Walks the AST of every module (including imports inside functions and ``TYPE_CHECKING``
blocks) and fails on any forbidden import, so the rule holds without running the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import natd

PACKAGE = Path(natd.__file__).resolve().parent
FORBIDDEN = (
    "asyncio",
    "socket",
    "os",
    "time",
    "select",
    "selectors",
    "subprocess",
    "threading",
    "structlog",
    "uvloop",
    "pytun",
    "natd.io",
    "natd.config",
    "natd.daemon",
)
ALLOWED_INTERNAL = {"wire": ("natd.wire",), "stack": ("natd.wire", "natd.stack")}


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def imported_names(source: str, module: str) -> set[str]:
    """Every absolute module name a source file imports (relative imports resolved)."""
    names: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("__import__")
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts)


@pytest.mark.parametrize("layer", ["wire", "stack"])
def test_layer_has_modules(layer: str) -> None:
    assert len(_modules(layer)) >= 3


@pytest.mark.parametrize(
    "path", _modules("wire") + _modules("stack"), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_core_imports_nothing_from_the_shell(path: Path) -> None:
    module = _module_name(path)
    layer = module.split(".")[1]
    names = imported_names(path.read_text(), module)
    bad = sorted(n for n in names for f in FORBIDDEN if _matches(n, f))
    assert not bad, f"{module} imports {bad}"
    assert "__import__" not in names, f"{module} imports dynamically"
    internal = {n for n in names if _matches(n, "natd")}
    stray = sorted(
        n
        for n in internal
        if not any(_matches(n, ok) for ok in ALLOWED_INTERNAL[layer]) and n != "natd"
    )
    assert not stray, f"{module} reaches outside its layer: {stray}"


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "from time import monotonic",
        "import asyncio.events as ev",
        "def f():\n    import socket",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import structlog",
        "from natd.io import shell",
        "from natd import config",
        "from .. import daemon",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    names = imported_names(source, "natd.stack.example")
    assert any(_matches(n, f) for n in names for f in FORBIDDEN), names


def test_checker_allows_pure_modules() -> None:
    source = "import struct, ipaddress\nfrom collections import Counter\nfrom natd.wire import x"
    names = imported_names(source, "natd.stack.example")
    assert not any(_matches(n, f) for n in names for f in FORBIDDEN)
    assert not any(_matches("ostrich", f) for f in FORBIDDEN)
