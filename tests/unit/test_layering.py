"""The package's shape: pure logic stays free of Ray, imports point down a fixed layer order,
and no two modules import each other, directly or around a loop.

Imports are read with ``ast`` from every module under ``orch/``: those at module level and
those inside functions alike (an import deferred into a function is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orch"

#: Pure logic beyond orch/api, orch/core and orch/config (which are pure as a whole): importing
#: these must not import Ray. Each imports its own helpers, which the check covers too.
PURE_MODULES = [
    "orch.engines",
    "orch.engines.llamacpp",
    "orch.engines.external",
    "orch.engines.mock",
    "orch.catalog.store",
    "orch.catalog.binding",
    "orch.catalog.handoff_files",
    "orch.provision.gguf",
    "orch.provision.models",
    "orch.provision.policy",
    "orch.provision.errors",
    "orch.provision.engines",
    "orch.artifacts.store",
    "orch.artifacts.transcript",
    "orch.observability.names",
    "orch.observability.pool_metrics",
    "orch.observability.logs",
    "orch.pools.manager",
    "orch.pools.task_record",
    "orch.tenants.keyhash",
    "orch.tenants.store",
    "orch.tenants.cache",
    "orch.tenants.access",
]
#: Packages that are pure as a whole: every module in them is checked.
PURE_PACKAGES = ("orch.api", "orch.core", "orch.config")

#: The layer order, lowest first: a module may import from its own layer or a lower one.
#: ``orch.actors`` is the Ray plumbing every actor-owning package shares. ``orch.sessions`` is
#: the sessions actor (the session book is pure, in ``orch.core``; the ingress's side lives in
#: ``orch.serve``): pools report usage to it, so it sits below the pools, with the other
#: singleton actors.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("api", ("orch.api",)),
    ("core", ("orch.core",)),
    ("config", ("orch.config",)),
    ("actors", ("orch.actors",)),
    ("components", ("orch.engines", "orch.catalog", "orch.provision", "orch.artifacts", "orch.observability",
                    "orch.sessions", "orch.tenants")),
    ("pools", ("orch.pools",)),
    ("serve", ("orch.serve",)),
    ("cli", ("orch.cli",)),
]
#: Within one layer, packages are independent except for these (importer, imported) pairs:
#: provisioning writes the catalog's records, so it sits above the catalog.
WITHIN_LAYER = {("orch.provision", "orch.catalog")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} imports {self.imported} ({where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(name: str, path: Path, source: str, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(source, filename=str(path))
    found: list[Import] = []

    def add(target: str, node: ast.AST, in_function: bool) -> None:
        while target and target not in modules:  # ``from orch.x import name``: the module orch.x
            target = target.rpartition(".")[0]
        if target.startswith("orch.") and target != name:
            found.append(Import(name, target, path, node.lineno, in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, name, path.name == "__init__.py")
                for alias in child.names:  # ``from orch.catalog import binding``: the submodule
                    submodule = f"{base}.{alias.name}"
                    add(submodule if submodule in modules else base, child, in_function)
            visit(child, inner)

    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    found = [item for name, path in modules.items() for item in imports_in(name, path, path.read_text(), modules)]
    return list(dict.fromkeys(found))  # one entry per import line and target


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _layer(module: str) -> tuple[int, str]:
    for index, (layer, prefixes) in enumerate(LAYERS):
        if _package(module) in prefixes:
            return index, layer
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {Path(__file__).name}")


def order_violations(imports: list[Import]) -> list[str]:
    found = []
    for item in imports:
        (low, low_name), (high, high_name) = _layer(item.importer), _layer(item.imported)
        upward = high > low
        sideways = high == low and _package(item.importer) != _package(item.imported) \
            and (_package(item.importer), _package(item.imported)) not in WITHIN_LAYER
        if upward:
            found.append(f"{item}: layer '{low_name}' may not import the higher layer '{high_name}'")
        elif sideways:
            found.append(f"{item}: {_package(item.importer)} and {_package(item.imported)} are independent "
                         f"packages of layer '{low_name}'")
    return found


def cycles(imports: list[Import]) -> list[list[str]]:
    """Every set of modules that import each other around a loop (Tarjan's strongly
    connected components with more than one member), each sorted."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        graph.setdefault(item.importer, set()).add(item.imported)
        graph.setdefault(item.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the package's module count
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_pure_modules_do_not_import_ray():
    pure = [name for name in all_modules() if _package(name) in PURE_PACKAGES] + PURE_MODULES
    code = "import sys\n" + "".join(f"import {m}\n" for m in pure) + "print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_every_module_has_a_layer():
    for name in all_modules():
        if name != "orch":
            _layer(name)


def test_imports_point_down_the_layer_order():
    found = order_violations(all_imports())
    order = " -> ".join(layer for layer, _ in LAYERS)
    assert not found, f"imports against the layer order ({order}):\n" + "\n".join(found)


def test_no_import_cycles():
    imports = all_imports()
    found = cycles(imports)
    lines = []
    for component in found:
        members = set(component)
        lines.append("cycle among " + ", ".join(component) + ":")
        lines += [f"  {item}" for item in imports if item.importer in members and item.imported in members]
    assert not found, "modules that import each other:\n" + "\n".join(lines)


def test_the_checks_see_function_level_imports_and_cycles():
    """The reader itself: a deferred import counts, and a two-module loop is reported."""
    path = PACKAGE / "core" / "queue.py"
    modules = {"orch.core.queue": path, "orch.serve": PACKAGE / "serve" / "__init__.py",
               "orch.serve.app": PACKAGE / "serve" / "app.py"}
    found = imports_in("orch.core.queue", path, "def f():\n    from orch.serve import app\n", modules)
    assert [(item.imported, item.in_function) for item in found] == [("orch.serve.app", True)]
    assert order_violations(found)
    loop = [Import("orch.a.x", "orch.a.y", path, 1, False), Import("orch.a.y", "orch.a.x", path, 2, True)]
    assert cycles(loop) == [["orch.a.x", "orch.a.y"]]
