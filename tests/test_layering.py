"""Layers only look down: models < util < lazymar < demo < evaluation < benchmarks < scripts (train.py,
eval.py, sample.py).

Every ``import`` in every module of the packages counts, including the ones inside functions, so a lower
layer cannot reach a higher one lazily either. ``evaluation`` (eval.py's run records, metrics and report)
and ``benchmarks`` (the measuring command lines) sit above ``demo`` because they use the demo model's
pieces; nothing below imports them, so they stay out of the sampler and of eval.py's code digest.
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
