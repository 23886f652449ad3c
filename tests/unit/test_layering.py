"""The package's layers: no import cycles, and no module imports a layer above its own.

Layers, lowest first (a module may import its own layer and the ones below):

    errors, paths, compat         leaves (compat: every hook into a dependency's internals)
    config, stages, cli,          run configuration, the stage table, the CLI wrapper, the launch
    topology, supervision         topology, the launcher <-> rank channel
    data, modeling, finetuning,   data and model code: never run/ or tools/
    loss, metrics, tiny_default,
    demo_conversations, stdlib_docs
    run                           the training run around the Trainer
    tools                         chat, merge, compare, doctor, verify_resume
    launch                        the launcher (runs the doctor in process)

Imports made only for type checking (``if TYPE_CHECKING:``) are not counted; imports inside
functions are (they still run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llmtrain.paths import PROJECT_ROOT

PACKAGE_DIR = PROJECT_ROOT / "llmtrain"
LAYERS = {
    "errors": 0, "paths": 0, "compat": 0,
    "config": 1, "stages": 1, "cli": 1, "topology": 1, "supervision": 1,
    "data": 2, "modeling": 2, "finetuning": 2, "loss": 2, "metrics": 2,
    "tiny_default": 2, "demo_conversations": 2, "stdlib_docs": 2, "mixers": 2, "multimodal": 2,
    "run": 3,
    "tools": 4,
    "launch": 5,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """``llmtrain.*`` modules imported by ``path`` at run time (``TYPE_CHECKING`` blocks skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmtrain")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmtrain"):
            found.add(node.module)
            # `from llmtrain.config import arguments` imports the submodule
            found |= {f"{node.module}.{alias.name}" for alias in node.names if is_module(f"{node.module}.{alias.name}")}
    return found


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PROJECT_ROOT / relative).with_suffix(".py").is_file() or (PROJECT_ROOT / relative / "__init__.py").is_file()


def layer(name: str) -> int:
    return LAYERS[name.split(".")[1]]


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def test_every_module_has_a_layer_and_a_docstring() -> None:
    for name, path in MODULES.items():
        if name == "llmtrain":
            continue
        assert name.split(".")[1] in LAYERS, f"{name}: add it to a layer in this test's LAYERS"
        assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{name} has no module docstring"


@pytest.mark.parametrize("name", [name for name in MODULES if name != "llmtrain"])
def test_no_module_imports_a_layer_above_its_own(name: str) -> None:
    upward = sorted(imported for imported in runtime_imports(MODULES[name]) if layer(imported) > layer(name))
    assert upward == [], f"{name} (layer {layer(name)}) imports {upward}"


def test_no_import_cycles() -> None:
    graph = {
        name: {imported for imported in runtime_imports(path) if imported in MODULES} for name, path in MODULES.items()
    }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
