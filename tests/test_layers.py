"""The layers of ``engine`` and ``cli`` import only downward, without cycles or private names.

Every module of both packages is parsed with :mod:`ast`; every ``import`` anywhere in it
(module level, inside functions, ``TYPE_CHECKING`` blocks, ``try`` blocks) is an edge. Each
module gets its layer from :data:`LAYERS`, the one table of the layering (``shared/DESIGN.md``
describes it):

- a module imports only modules of lower rank, or of its own group;
- a feature package imports only the feature packages to its left (lower rank), and the
  modules of its own package;
- the modules form no import cycle (also not within a group);
- no module uses another module's private (``_name``) names, neither imported
  (``from engine.x import _y``) nor as an attribute of an imported module (``x._y``).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "cli")

# Lowest first. An entry names one module, or with ``.*`` a package and every module below it
# (a longer entry wins); a module that no entry names fails the test.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["engine", "engine.errors", "engine.events", "engine.startup"]),
    ("core", ["engine.runner", "engine.placement", "engine.stall", "engine.slurmjobs",
              "engine.cluster",
              "engine.runlock",
              "engine.blocks",
              "engine.labels", "engine.labelfiles", "engine.facegraph", "engine.ranks",
              "engine.objtables",
              "engine.stats", "engine.pyramid",
              "engine.output", "engine.workerpaths", "engine.io.*",
              "engine.volume", "engine.provenance", "engine.progress", "engine.security",
              "engine.names", "engine.yamlfile", "engine.phantoms"]),
    # the feature packages, each its own rank, in their order (one imports only those above)
    ("segment", ["engine.segment.*"]),
    ("patches", ["engine.patches.*"]),
    ("curate", ["engine.curate"]),
    ("dataset", ["engine.dataset"]),
    # the tiled, blended predictor: tiles through a network on a device, no feature of its
    # own; below learn, whose validation predicts as `voxelmill predict` does with it
    ("tiled predictor", ["engine.predict.tiling", "engine.predict.device",
                         "engine.predict.block", "engine.predict.downsample"]),
    ("learn", ["engine.learn.*"]),
    ("zoo", ["engine.zoo.*"]),
    ("predict", ["engine.predict.*"]),
    ("instances", ["engine.instances"]),
    ("cutter", ["engine.cutter.*"]),
    ("report", ["engine.report"]),
    ("pipelines", ["engine.pipelines.*"]),
    ("cli", ["cli.*"]),
]


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from ``module`` (at ``line``)."""

    module: str
    target: str
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` names, with a relative one resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def scan(module: str, source: str, known: set[str], is_package: bool = False
         ) -> tuple[list[Import], list[str]]:
    """The imports of ``module`` that reach ``known`` modules, and its uses of their
    private names (as messages)."""
    tree = ast.parse(source)
    imports: list[Import] = []
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> the known module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known or alias.name.split(".")[0] in known:
                    target = alias.name
                    while target not in known:
                        target = target.rpartition(".")[0]
                    imports.append(Import(module, target, node.lineno))
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base not in known:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    imports.append(Import(module, sub, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    imports.append(Import(module, base, node.lineno))
                    if _is_private(alias.name):
                        private.append(f"{module}:{node.lineno} imports {base}.{alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != module):
            private.append(f"{module}:{node.lineno} uses "
                           f"{aliases[node.value.id]}.{node.attr}")
    return imports, private


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> tuple[int, str] | None:
    """``(rank, group)`` of the longest table entry holding ``module``; None when none does."""
    best: tuple[int, int, str] | None = None
    for rank, (group, entries) in enumerate(layers):
        for entry in entries:
            package = entry.removesuffix(".*")
            held = module == package or (entry.endswith(".*") and module.startswith(package + "."))
            if held and (best is None or len(package) > best[0]):
                best = (len(package), rank, group)
    return None if best is None else (best[1], best[2])


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def check(sources: dict[str, tuple[str, bool]],
          layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    """Every breach of the layering in ``sources`` (module -> (source, is_package))."""
    known = set(sources)
    problems: list[str] = []
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, (source, is_package) in sorted(sources.items()):
        imports, private = scan(module, source, known, is_package)
        problems += private
        here = layer_of(module, layers)
        if here is None:
            problems.append(f"{module}: in no layer of the table")
            continue
        for imp in imports:
            if imp.target == module:
                continue
            edges[module].add(imp.target)
            there = layer_of(imp.target, layers)
            if there is None:
                continue  # reported as a module of its own
            if there[0] > here[0]:
                problems.append(f"{module}:{imp.line} ({here[1]}) imports {imp.target} "
                                f"({there[1]}): upward")
    problems += [f"import cycle: {' -> '.join(c)}" for c in find_cycles(edges)]
    return list(dict.fromkeys(problems))  # one message per line, however many names


def read_sources(root: Path, packages: Iterable[str]) -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for name, path in find_modules(root, packages).items()}


def test_layers_import_only_downward() -> None:
    sources = read_sources(ROOT, PACKAGES)
    assert len(sources) > 90  # the packages were found
    assert check(sources) == []


def test_every_table_entry_names_a_module() -> None:
    """A stale entry (a module moved or removed) would hide a missing one."""
    known = set(read_sources(ROOT, PACKAGES))
    stale = [e for _, entries in LAYERS for e in entries if e.removesuffix(".*") not in known]
    assert stale == []


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[str, bool]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return read_sources(tmp_path, ["engine", "cli"])


PLANTED_BASE = {
    "engine/__init__.py": "",
    "engine/errors.py": "",
    "engine/blocks.py": "from engine.errors import OptionError\n",
    "engine/segment/__init__.py": "",
    "engine/pipelines/__init__.py": "",
    "engine/pipelines/segment.py": "from engine.blocks import Block\n",
    "cli/__init__.py": "",
}
PLANTED_LAYERS = [("base", ["engine", "engine.errors"]), ("core", ["engine.blocks"]),
                  ("segment", ["engine.segment.*"]), ("pipelines", ["engine.pipelines.*"]),
                  ("cli", ["cli.*"])]


def test_planted_tree_is_clean(tmp_path: Path) -> None:
    assert check(_tree(tmp_path, PLANTED_BASE), PLANTED_LAYERS) == []


@pytest.mark.parametrize("rel, text, expected", [
    # a lazy upward import inside a function
    ("engine/segment/execute.py", """
        def run():
            from engine.pipelines.segment import check_block
     """, "engine.segment.execute:3 (segment) imports engine.pipelines.segment (pipelines): "
          "upward"),
    # a relative import under TYPE_CHECKING reaching up from core
    ("engine/blocks.py", """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from .segment import threshold
     """, "engine.blocks:4 (core) imports engine.segment (segment): upward"),
    # a plain import statement inside a try block
    ("engine/errors2.py", """
        try:
            import engine.segment
        except ImportError:
            pass
     """, "engine.errors2: in no layer of the table"),
    # a private name of another module
    ("engine/segment/filters.py", "from engine.blocks import _pad\n",
     "engine.segment.filters:1 imports engine.blocks._pad"),
    ("engine/segment/filters.py", "from engine import blocks\nx = blocks._pad\n",
     "engine.segment.filters:2 uses engine.blocks._pad"),
])
def test_planted_violation_fails(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    assert check(_tree(tmp_path, {**PLANTED_BASE, rel: text}), PLANTED_LAYERS) == [expected]


def test_planted_cycle_fails(tmp_path: Path) -> None:
    # sideways within one group is allowed, but not round in a circle
    files = {**PLANTED_BASE,
             "cli/main.py": "def app():\n    from cli.common import out\n",
             "cli/common.py": "def out():\n    from cli import main\n"}
    assert check(_tree(tmp_path, files), PLANTED_LAYERS) == [
        "import cycle: cli.common -> cli.main"]


def test_planted_sideways_feature_fails(tmp_path: Path) -> None:
    # a feature package imports only the features to its left
    files = {**PLANTED_BASE, "engine/patches/__init__.py": "",
             "engine/segment/steps.py": "import engine.patches as p\n"}
    layers = [*PLANTED_LAYERS[:3], ("patches", ["engine.patches.*"]), *PLANTED_LAYERS[3:]]
    assert check(_tree(tmp_path, files), layers) == [
        "engine.segment.steps:1 (segment) imports engine.patches (patches): upward"]
