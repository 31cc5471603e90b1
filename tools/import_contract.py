"""The import contract of functrain: layers, no cycles, no private names across modules.

Run by ``make lint`` (``python tools/import_contract.py``); exits 1 listing every problem. Three
rules, read from the source with `ast` (nothing is imported):

- **Layers.** `LAYERS` lists the package's layers from the top down, as `docs/architecture.md`
  draws them; a module may import its own layer and the layers below it, never one above. Inside
  a folder that outgrew one layer, `INNER` orders its modules the same way. Every module is in a
  layer of `LAYERS`, and every module of an `INNER` folder in one of that folder's layers.
- **No cycles.** Every import counts: at the top of a module, inside a function (a deferred import
  closes a cycle, it does not remove it), under ``if TYPE_CHECKING:``, and
  ``importlib.import_module("functrain...")`` with a literal name.
- **No private names across modules.** ``from functrain.x import _name`` (or a relative form), and
  ``x._name`` (or ``functrain.x._name``) on a functrain module bound by an import, are refused
  outside the module that defines ``_name``: a name another module uses is public in its home
  module.

Importing ``functrain.a.b`` also imports the package ``functrain.a`` (its ``__init__``); that
implicit edge is not counted, an explicit ``from functrain.a import name`` is.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "functrain"

# top-down: a module may import its own layer and the ones below it
LAYERS: list[list[str]] = [
    ["functrain", "functrain.__main__", "functrain.schedules"],
    ["functrain.config"],
    [
        "functrain.demo",
        "functrain.generation",
        "functrain.testing",
        "functrain.integrations",
    ],
    ["functrain.driver"],
    ["functrain.checkpoint"],
    ["functrain.interop"],
    ["functrain.core"],
    ["functrain.optim", "functrain.distributed"],
    [
        "functrain.errors",
        "functrain.tree",
        "functrain.layout",
        "functrain.devices",
        "functrain.version",
    ],
]

# the same order inside the folders whose modules form layers of their own
INNER: dict[str, list[list[str]]] = {
    "functrain.optim": [
        ["functrain.optim"],
        ["functrain.optim.presets"],
        [
            "functrain.optim.wrappers",
            "functrain.optim.plateau",
            "functrain.optim.averaging",
            "functrain.optim.swa",
            "functrain.optim.schedules",
            "functrain.optim.differentiable",
        ],
        ["functrain.optim.rules"],
        [
            "functrain.optim.combine",
            "functrain.optim.metrics",
            "functrain.optim.sweep",
            "functrain.optim.checks",
            "functrain.optim.masks",
            "functrain.optim.naming",
        ],
        ["functrain.optim.rates"],
        ["functrain.optim.base"],
        ["functrain.optim.updates", "functrain.optim.planned"],
        [
            "functrain.optim.zeros",
            "functrain.optim.batching",
            "functrain.optim.porting",
            "functrain.optim.choices",
        ],
    ],
    "functrain.core": [
        ["functrain.core"],
        ["functrain.core.unroll", "functrain.core.compare"],
        ["functrain.core.compiled", "functrain.core.step"],
        [
            "functrain.core.stacked_step",
            "functrain.core.capture",
            "functrain.core.guards",
            "functrain.core.program",
            "functrain.core.straight",
        ],
        ["functrain.core.stacked"],
        ["functrain.core.body", "functrain.core.donation"],
        ["functrain.core.gradient"],
        [
            "functrain.core.scope",
            "functrain.core.view",
            "functrain.core.statistics",
            "functrain.core.loss",
        ],
        ["functrain.core.state"],
        ["functrain.core.create", "functrain.core.replacement"],
        [
            "functrain.core.options",
            "functrain.core.binding",
            "functrain.core.failures",
            "functrain.core.structure",
        ],
    ],
    "functrain.checkpoint": [
        ["functrain.checkpoint"],
        ["functrain.checkpoint.manager"],
        ["functrain.checkpoint.state_io"],
        [
            "functrain.checkpoint.directory",
            "functrain.checkpoint.lock",
            "functrain.checkpoint.counters",
            "functrain.checkpoint.bests",
        ],
        ["functrain.checkpoint.snapshot", "functrain.checkpoint.sharded"],
        ["functrain.checkpoint.format"],
        ["functrain.checkpoint.reading", "functrain.checkpoint.commit"],
        ["functrain.checkpoint.tensorfile", "functrain.checkpoint.files"],
    ],
}


@dataclass
class Module:
    """One source file: its dotted name, whether it is a package's ``__init__``, its tree."""

    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: list[tuple[str, int]] = field(default_factory=list)  # (module imported, line)


def modules_of(root: Path) -> dict[str, Module]:
    """Every ``.py`` file under the package directory `root`, by dotted name."""
    found: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return found


def absolute(module: Module, level: int, target: str | None) -> str:
    """The dotted name a relative import (``from ..x import y``) in `module` refers to."""
    if level == 0:
        return target or ""
    package = module.name.split(".")
    if not module.is_package:
        package.pop()
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def resolve(name: str, known: dict[str, Module]) -> str | None:
    """The known module `name` names, or the closest package above it (``pkg.attr`` -> ``pkg``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """Each functrain module `module` imports, anywhere in its source, with the line."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name, known)) is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node.level, node.module)
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}", known)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.Call) and is_import_module(node):
            target = resolve(node.args[0].value, known)  # type: ignore[attr-defined]
            if target is not None:
                yield target, node.lineno


def is_import_module(node: ast.Call) -> bool:
    """``importlib.import_module("...")`` or ``import_module("...")`` with a literal name."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (
        called in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def is_private(name: str) -> bool:
    """``_name``, not ``__dunder__``."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def private_uses(module: Module, known: dict[str, Module]) -> Iterator[str]:
    """``from other import _name`` and ``other._name`` where `other` is another module.

    ``other`` is a name an import binds to a module (``import pkg.low as low``, ``from pkg import
    low``) or a dotted path from one (``import pkg.low`` binds ``pkg``; then ``pkg.low._x``).
    """
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            base = absolute(module, node.level, node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:  # a submodule imported by name: bound, not a private name
                    bound[alias.asname or alias.name] = full
                elif is_private(alias.name) and base in known and base != module.name:
                    yield f"{module.path}:{node.lineno}: imports {alias.name} from {base}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    bound[alias.asname] = alias.name
                elif alias.asname is None and (top := alias.name.partition(".")[0]) in known:
                    bound[top] = top
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        head, _, rest = (dotted(node.value) or "").partition(".")
        if head not in bound:
            continue
        owner = ".".join(filter(None, (bound[head], rest)))
        if owner in known and owner != module.name:
            yield f"{module.path}:{node.lineno}: uses {node.attr} of {owner}"


def layer_of(name: str, layers: Sequence[Sequence[str]], exact: str) -> int | None:
    """The index of the layer whose most specific entry matches `name` (None: no layer).

    An entry names a module or a folder (matching every module in it), except `exact`, the
    contract's own package, which stands for its ``__init__`` alone.
    """
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            inside = prefix != exact and name.startswith(prefix + ".")
            if name == prefix or inside:
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def layer_problems(
    edges: dict[str, list[tuple[str, int]]],
    modules: dict[str, Module],
    layers: Sequence[Sequence[str]],
    inner: dict[str, list[list[str]]],
    root: str = ROOT,
) -> Iterator[str]:
    """Modules in no layer, and imports from a layer up to a layer above it.

    Checked at the top (`layers`, for the package named `root`) and inside each `inner` folder,
    where every module of the folder must be in one of its layers too.
    """
    contracts: list[tuple[str, Sequence[Sequence[str]]]] = [(root, layers), *inner.items()]
    for source in sorted(modules):
        if layer_of(source, layers, root) is None:
            yield f"{modules[source].path}: {source} is in no layer: add it to LAYERS"
        for folder, folder_layers in inner.items():
            inside = source == folder or source.startswith(folder + ".")
            if inside and layer_of(source, folder_layers, folder) is None:
                where = f"{modules[source].path}: {source}"
                yield f"{where} is in no layer: add it to INNER[{folder!r}]"
    for source, targets in sorted(edges.items()):
        for target, line in targets:
            for title, order in contracts:
                here, there = layer_of(source, order, title), layer_of(target, order, title)
                if here is None or there is None or here <= there:
                    continue
                yield (
                    f"{modules[source].path}:{line}: {source} imports {target}, a layer above it "
                    f"in {title} (layers, top down: {describe(order)})"
                )


def describe(order: Sequence[Sequence[str]]) -> str:
    """The layers as their last name parts, top down: ``optim > presets/sweep > ...``."""
    return " > ".join("/".join(p.rpartition(".")[2] or p for p in layer) for layer in order)


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or a module importing itself."""
    graph = {source: sorted({t for t, _ in targets}) for source, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
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
            if len(component) > 1 or node in graph.get(node, []):
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check(
    root: Path,
    layers: Sequence[Sequence[str]] = LAYERS,
    inner: dict[str, list[list[str]]] | None = None,
) -> list[str]:
    """Every problem of the package at `root` (a directory holding ``__init__.py``)."""
    inner = INNER if inner is None else inner
    modules = modules_of(root)
    edges = {
        name: sorted({(t, line) for t, line in import_edges(m, modules) if t != name})
        for name, m in modules.items()
    }
    problems = [p for m in modules.values() for p in private_uses(m, modules)]
    problems += layer_problems(edges, modules, layers, inner, root.name)
    for component in cycles(edges):
        loop = shortest_loop(component, edges)
        links = " -> ".join(f"{source} (line {line})" for source, line in loop)
        problems.append(
            f"import cycle among {len(component)} modules, the shortest: {links} -> {loop[0][0]}"
        )
    return problems


def shortest_loop(
    component: list[str], edges: dict[str, list[tuple[str, int]]]
) -> list[tuple[str, int]]:
    """The shortest import loop inside a cycle's `component`: each module with the line of its
    import of the next one (breadth first from each member; the first shortest is kept)."""
    best: list[tuple[str, int]] | None = None
    for start in component:
        found = loop_from(start, set(component), edges)
        if found is not None and (best is None or len(found) < len(best)):
            best = found
    assert best is not None  # every member of a cycle's component lies on a loop
    return best


def loop_from(
    start: str, members: set[str], edges: dict[str, list[tuple[str, int]]]
) -> list[tuple[str, int]] | None:
    """The shortest path of imports from `start` back to `start` through `members`."""
    paths: dict[str, list[tuple[str, int]]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for source in frontier:
            for target, line in edges[source]:
                path = paths[source] + [(source, line)]
                if target == start:
                    return path
                if target in members and target not in paths:
                    paths[target] = path
                    following.append(target)
        frontier = following
    return None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="functrain", type=Path)
    args = parser.parse_args(list(argv) if argv is not None else None)
    problems = check(args.package)
    for problem in problems:
        print(problem)
    if problems:
        print(f"import contract: {len(problems)} problems", file=sys.stderr)
        return 1
    print("import contract: layers kept, no cycles, no private names across modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
