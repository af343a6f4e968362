"""The layering is visible in folders, and imports point down only: app → services → serving → engine."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each layer may import the layers after it in this list, and the shared leaves (protos, models, metrics, errors).
LAYERS = ["minedraft.app", "services", "minedraft.serving", "minedraft.engine"]
LEAVES = ("minedraft.protos", "minedraft.models", "minedraft.metrics", "minedraft.errors")


def layer_of(module: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")), None)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_point_down() -> None:
    wrong = []
    for path in [*ROOT.glob("minedraft/**/*.py"), *ROOT.glob("services/**/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer_of(module)
        if own is None:  # the command line and the shared leaves
            continue
        for imported in imports_of(path):
            target = layer_of(imported)
            if target is not None and target < own:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_shared_leaves_import_no_layer() -> None:
    for leaf in ("minedraft/metrics.py", "minedraft/errors.py", *map(str, ROOT.glob("minedraft/models/*.py"))):
        path = ROOT / leaf
        assert not [m for m in imports_of(path) if layer_of(m) is not None and "models" not in m], path
