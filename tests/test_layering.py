"""Layers only look down: models < util < lazymar < demo < evaluation < benchmarks < scripts (train.py,
eval.py, sample.py).

Every ``import`` in every module of the packages counts, including the ones inside functions, so a lower
layer cannot reach a higher one lazily either. ``evaluation`` (eval.py's run records, metrics and report)
and ``benchmarks`` (the measuring command lines) sit above ``demo`` because they use the demo model's
pieces; nothing below imports them, so they stay out of the sampler and of eval.py's code digest.

Inside ``lazymar/`` the modules form no circle either, and import each other at module level only: one that
needs another lazily to load is a circle held apart, and its behaviour depends on what was imported first.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["models", "util", "lazymar", "demo", "evaluation", "benchmarks"]  # bottom first
SCRIPTS = {"train", "eval", "sample"}  # above every layer


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports anywhere in its body (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):  # relative: stays inside the module's own package
            names.add(path.parent.name)
    return names


def violations() -> list[str]:
    out = []
    for rank, layer in enumerate(LAYERS):
        higher = set(LAYERS[rank + 1:]) | SCRIPTS
        for path in sorted((ROOT / layer).rglob("*.py")):
            for name in sorted(imported_modules(path) & higher):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_imports_only_look_down():
    assert violations() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch\n\ndef f():\n    from demo.registry import load_demo\n    import eval\n")
    assert imported_modules(module) == {"torch", "demo", "eval"}


# ------------------------------------------------------------------------------------------ within lazymar/
def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports(package: Path) -> list[tuple[str, str, int, bool]]:
    """Every import of a module of ``package`` by another of its modules: (importer, imported, line, inside a
    function). Module names are dotted (``lazymar.config``; the package's ``__init__`` is ``lazymar``); ``from
    lazymar import cspd`` imports the module ``lazymar.cspd``. Imports under ``if TYPE_CHECKING:`` never run
    and are left out (annotations only); every other one counts, wherever it is."""
    name = package.name
    modules = {f"{name}.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"} | {name}
    out = []

    class Walk(ast.NodeVisitor):
        def __init__(self, importer: str) -> None:
            self.importer, self.depth = importer, 0

        def add(self, target: str, node: ast.AST) -> None:
            if target in modules and target != self.importer:
                out.append((self.importer, target, node.lineno, self.depth > 0))

        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_FunctionDef(self, node: ast.AST) -> None:
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                parts = alias.name.split(".")
                self.add(".".join(parts[:2]), node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            module = node.module or ""
            if node.level:  # relative: from the package this module is in
                module = ".".join([name, *([module] if module else [])])
            parts = module.split(".")
            if parts[0] != name:
                return
            if len(parts) == 1:  # from lazymar import x: the module lazymar.x where there is one
                for alias in node.names:
                    self.add(f"{name}.{alias.name}" if f"{name}.{alias.name}" in modules else name, node)
            else:
                self.add(".".join(parts[:2]), node)

    for path in sorted(package.glob("*.py")):
        importer = name if path.stem == "__init__" else f"{name}.{path.stem}"
        Walk(importer).visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def find_cycle(edges: list[tuple[str, str, int, bool]]) -> list[str] | None:
    """A cycle of the graph of ``edges`` (importer -> imported) as the modules along it, first repeated at the
    end; None when there is none."""
    graph: dict[str, list[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(set(graph.get(node, ()))):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_lazymar_modules_import_in_one_direction():
    """No import circle inside ``lazymar/``: every module imports only modules below it, so no module needs
    to import another lazily to load, and importing any one of them first works."""
    edges = package_imports(ROOT / "lazymar")
    cycle = find_cycle(edges)
    lines = {(a, b): line for a, b, line, _ in edges}
    assert cycle is None, f"import cycle {' -> '.join(cycle)}: " + "; ".join(
        f"{a} imports {b} (line {lines[a, b]})" for a, b in zip(cycle, cycle[1:]))


def test_lazymar_modules_import_each_other_at_module_level():
    """An import of one of our modules inside a function hides a dependency (and usually a cycle)."""
    inside = [f"{a} imports {b} inside a function (line {line})"
              for a, b, line, in_function in package_imports(ROOT / "lazymar") if in_function]
    assert inside == [], "\n".join(inside)


def test_the_package_walk_finds_cycles_and_lazy_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nfrom pkg import b\n"
                                  "if TYPE_CHECKING:\n    from pkg.c import C\n")
    (package / "b.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    (package / "c.py").write_text("from pkg.b import g\n")
    edges = package_imports(package)
    assert sorted(edges) == [("pkg", "pkg.a", 1, False), ("pkg.a", "pkg.b", 2, False), ("pkg.b", "pkg.a", 4, True),
                             ("pkg.c", "pkg.b", 1, False)]
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle([e for e in edges if not e[3]]) is None
