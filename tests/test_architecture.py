"""The house rules of docs/architecture.md, read from the source: imports point down the
layers, no two modules import each other at load time (directly or round a loop), and no
source file is too long to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchnorm

PACKAGE = Path(batchnorm.__file__).resolve().parent

#: The layers, bottom first: a module may import its own layer and those below it. The
#: shared helpers and the math are at the bottom; the command line and the package's own
#: __init__ (which re-exports the public names) at the top.
LAYERS = [
    {"_progress", "_html", "_cache", "reference"},
    {"backends"},
    {"ops"},
    {"functional"},
    {"nn"},
    {"tools", "distributed", "example_models"},
    {"lab"},
    {"cli", "__init__", "__main__"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}

#: Upward imports made on purpose, inside a function (so not at load time), with why.
ALLOWED_UPWARD = {
    # torch.nn.SyncBatchNorm.convert_sync_batchnorm is a classmethod of the layer: ours
    # keeps it, calling the model tool that does the work.
    ("batchnorm.nn.sync", "batchnorm.tools.convert"),
}

#: Longest source file, in lines (the issue's "about 500").
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("batchnorm", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(path: Path, load_time_only: bool) -> set[str]:
    """The batchnorm modules ``path`` imports (``from batchnorm.x import y``: batchnorm.x.y
    when that is a module, else batchnorm.x); with ``load_time_only``, the imports at module
    level only (not those inside functions, nor under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if load_time_only:
        nodes = [
            n
            for n in tree.body
            if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
        ]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else "__init__"]


def test_every_module_is_in_a_layer():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops <= set(LAYER_OF), f"place these in LAYERS: {sorted(tops - set(LAYER_OF))}"


def test_imports_point_down():
    upward = sorted(
        (module, imported)
        for module, path in MODULES.items()
        for imported in _imports(path, load_time_only=False)
        if _layer(imported) > _layer(module) and (module, imported) not in ALLOWED_UPWARD
    )
    assert not upward, f"upward imports (module -> what it imports): {upward}"


def test_no_import_cycle_at_load_time():
    """Tarjan's strongly connected components of the load-time import graph: each must be
    one module. (A package importing its own submodules is no cycle: a submodule does not
    import its package's __init__ back.)"""
    graph = {m: _imports(p, load_time_only=True) - {m} for m, p in MODULES.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
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
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other at load time: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_source_files_are_short(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines: split it"
