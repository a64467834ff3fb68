"""The package's layers point one way: inference (load, predict, export, serve) never imports training
code, and no import inside a function hides a cycle (each one states the start-up reason it is lazy)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adaptext"
TRAINING = (
    "adaptext.train", "adaptext.train_state", "adaptext.api", "adaptext.checkpoint", "adaptext.dropout", "adaptext.distributed",
    "adaptext.cache", "adaptext.probe", "adaptext.contrastive", "adaptext.compare", "adaptext.tune",
    "adaptext.data", "adaptext.reporting", "adaptext.setfit_arm", "adaptext.policy", "adaptext.evaluation",
    "adaptext.token_store",
)  # fmt: skip
INFERENCE = (
    "adaptext.predict",
    "adaptext.bulk",
    "adaptext.ray_data",
    "adaptext.export",
    "adaptext.serve.app",
    "adaptext.serve.server",
    "adaptext.artifacts",
)


@pytest.mark.processes
@pytest.mark.parametrize("module", INFERENCE)
def test_inference_modules_import_no_training_code(module):
    # A fresh interpreter: this test process has imported everything already.
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps(sorted(m for m in {TRAINING!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], f"{module} pulls in training modules"


@pytest.mark.processes
def test_load_and_predict_run_without_training_code(tiny_models, topic_dir, tmp_path):
    """Not just the import: adaptext.load + predict on a saved LoRA model touch no training module."""
    from adaptext import api

    saved = tmp_path / "model"
    api.train(data=str(topic_dir), model=str(tiny_models["bert"]), output=str(saved), epochs=1, batch_size=8,
              max_length=32, seed=7, progress=False, echo=lambda line: None)  # fmt: skip
    code = (
        "import json, sys, adaptext; "
        f"clf = adaptext.load({str(saved)!r}); clf.predict(['a short text', 'another one']); "
        f"print(json.dumps(sorted(m for m in {TRAINING!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adaptext"):
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.Import) and any(a.name.startswith("adaptext") for a in node.names):
                found.append((node.lineno, node.names[0].name))
    return found


def test_every_function_level_import_says_why_it_is_lazy():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":  # its docstring: every command imports what it runs, for start-up time
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, module in _function_level_imports(path):
            above = lines[lineno - 2].strip() if lineno >= 2 else ""
            if not above.startswith("# lazy:"):
                unexplained.append(f"{path.relative_to(PACKAGE)}:{lineno} imports {module}")
    assert not unexplained, "function-level imports without a '# lazy: <reason>' line above: " + "; ".join(unexplained)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions (lazy ones count)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adaptext"):
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from adaptext import api`
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d not in (name, "adaptext")}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert graph["adaptext.predict"] >= {"adaptext.batching", "adaptext.artifacts"}  # the walk sees imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
