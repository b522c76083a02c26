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


def _imports_of(path: Path) -> set[str]:
    return imported_names(path.read_text(), _module_name(path))


CONFIG_FORBIDDEN = ("asyncio", "natd.io", "natd.daemon")


@pytest.mark.parametrize("path", _modules("config"), ids=lambda p: f"config/{p.name}")
def test_config_imports_neither_the_shell_nor_the_daemon(path: Path) -> None:
    names = _imports_of(path)
    bad = sorted(n for n in names for f in CONFIG_FORBIDDEN if _matches(n, f))
    assert not bad, f"{_module_name(path)} imports {bad}"


def test_config_is_a_package_by_job() -> None:
    jobs = {p.stem for p in _modules("config")}
    assert {"model", "values", "tomlfile", "load", "render"} <= jobs


def test_forwards_shell_does_not_import_the_config() -> None:
    names = _imports_of(PACKAGE / "io" / "forwards.py")
    assert not [n for n in names if _matches(n, "natd.config")], names


def test_limits_is_a_leaf() -> None:
    """Config and core share ``Limits``; it must import nothing from natd to stay shareable."""
    names = _imports_of(PACKAGE / "stack" / "limits.py")
    assert not [n for n in names if _matches(n, "natd")], names


def _runtime_source(path: Path) -> str:
    """The module without its ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for name in ("body", "orelse"):
            block = getattr(node, name, None)
            if isinstance(block, list):
                kept = [
                    s
                    for s in block
                    if not (isinstance(s, ast.If) and getattr(s.test, "id", "") == "TYPE_CHECKING")
                ]
                if len(kept) != len(block):
                    setattr(node, name, kept or [ast.Pass()])
    return ast.unparse(tree)


def _import_graph() -> dict[str, set[str]]:
    """natd module → the natd modules it imports at run time (``from m import x`` counts as m)."""
    paths = {_module_name(p).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        names = imported_names(_runtime_source(path), _module_name(path))
        graph[module] = {n for n in names if n in paths and n != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    assert _cycle(_import_graph()) is None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
