"""The package's import structure: layers that only import downwards, no cycles, light pure modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "knnlm"

# bottom-up; a module may import its own layer and those below, never one above
LAYERS = [
    {"knnlm", "knnlm.errors", "knnlm.io", "knnlm.scoring"},
    {"knnlm.models", "knnlm.data"},
    {"knnlm.datastore", "knnlm.criterions"},
    {
        "knnlm.evaluation",
        "knnlm.softmax_alternatives",
        "knnlm.tasks",
        "knnlm.analysis",
        "knnlm.report",
        "knnlm.generation",
    },
    {"knnlm.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def knnlm_imports(path: Path, top_level_only: bool) -> set[str]:
    """The knnlm modules ``path`` imports (``from knnlm.x import y`` counts as knnlm.x.y when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "knnlm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "knnlm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_layering.py; add it")


def test_every_import_points_down_or_sideways():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, path in MODULES.items()
        for target in knnlm_imports(path, top_level_only=False)
        if layer_of(target) > layer_of(name) and not (name == "knnlm" and target.startswith("knnlm."))
    ]
    assert not upward, "\n".join(upward)


def test_models_do_not_import_datastore_evaluation_or_cli():
    below = [n for n in MODULES if layer_of(n) <= layer_of("knnlm.models")]
    bad = [
        (n, t)
        for n in below
        for t in knnlm_imports(MODULES[n], top_level_only=False)
        if t.split(".")[:2] in (["knnlm", "datastore"], ["knnlm", "evaluation"], ["knnlm", "cli"])
    ]
    assert not bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_at_module_level():
    graph = {}
    for name, path in MODULES.items():
        targets = knnlm_imports(path, top_level_only=True)
        # importing knnlm.a.b runs knnlm/a/__init__ first: depend on every package on the way
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)}
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets | parents if t != name and t not in own_packages}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_pure_modules_load_neither_torch_nor_fairseq():
    code = (
        "import sys, knnlm, knnlm.scoring, knnlm.io, knnlm.errors\n"
        "print(','.join(m for m in ('torch', 'fairseq', 'faiss', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == ""
