"""The layers hold: the core imports no orchestration library, the platform packages import downwards only,
and no module or function grows past what a reader can hold (docs/design.md §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "q2l"
CORE = ("models", "data", "engine", "losses.py", "metrics.py", "explain.py")
ORCHESTRATION = ("ray", "mlflow", "optuna")
# each platform layer and the layers it may import (besides the core, config and progress)
LAYERS = {
    "ray_runtime.py": set(),
    "tracking": set(),
    "packaging": {"tracking"},
    "train": {"tracking", "packaging", "ray_runtime.py"},
    "registry": {"tracking", "packaging"},
    "sweep": {"tracking", "packaging", "ray_runtime.py", "train", "registry"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size_and_function_length(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"


def test_the_core_imports_no_orchestration_library():
    for path in _modules():
        if _top(path) in CORE:
            bad = {m for m in _imports(path) if m.split(".")[0] in ORCHESTRATION}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_platform_layers_import_downwards_only():
    for path in _modules():
        layer = _top(path)
        if layer not in LAYERS:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "q2l" or len(parts) < 2:
                continue
            target = parts[1] + (".py" if parts[1] == "ray_runtime" else "")
            if target in LAYERS and target != layer:
                assert target in LAYERS[layer], f"{path.relative_to(PACKAGE)} imports {module} (up a layer)"
