"""The package's shape: imports point one way (core <- data <- training / infer <- insight <-
front doors), no import cycles, short modules and functions, and the old module paths still
resolve. Read from the source's AST, so function-local imports count too."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import googlenet

SRC = Path(googlenet.__file__).parent
FRONT = {"googlenet", "googlenet.cli", "googlenet.serve", "googlenet.__main__"}
# Layer -> the layers it may import. The front doors may import anything.
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "training": {"core", "data", "training"},
    "infer": {"core", "data", "infer"},
    "insight": {"core", "data", "infer", "insight"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) + is_pkg - node.level]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" for a in node.names] + [base]


def _owner(name: str) -> str | None:
    """The project module `name` refers to (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_edges() -> set[tuple[str, str]]:
    edges = set()
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in _targets(mod, node, path.name == "__init__.py"):
                    target = _owner(name)
                    if target is not None and target != mod and target != "googlenet":
                        edges.add((mod, target))
                    if target == "googlenet" and mod != "googlenet" and name != "googlenet":
                        raise AssertionError(f"{mod} imports {name} from the package root")
    return edges


def layer(module: str) -> str:
    if module in FRONT or module.startswith("googlenet.cli."):
        return "front"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in ALLOWED else "core"


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_point_one_way_with_no_cycles():
    edges = import_edges()
    assert len(edges) > 50  # the walk found the project's imports
    assert not _cycles(edges)
    against = {
        (a, b) for a, b in edges if layer(a) != "front" and layer(b) not in ALLOWED[layer(a)]
    }
    assert not against, f"imports against the layer order: {sorted(against)}"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a")})
    assert not _cycles({("a", "b"), ("b", "c"), ("a", "c")})
    assert layer("googlenet.data.loader") == "data" and layer("googlenet.model") == "core"
    assert "training" not in ALLOWED[layer("googlenet.insight.report")]


def test_modules_and_functions_are_short():
    long_modules, long_functions = set(), set()
    for mod, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.add(mod)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node  # type: ignore[attr-defined]
        for node in ast.walk(tree):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                owner = getattr(node, "parent", None)
                cls = f"{owner.name}." if isinstance(owner, ast.ClassDef) else ""
                long_functions.add(f"{mod}.{cls}{node.name}")
    assert not long_modules, sorted(long_modules)
    assert not long_functions, sorted(long_functions)


@pytest.mark.parametrize("old", sorted(googlenet.MOVED))
def test_old_module_paths_resolve_to_the_new_modules(old):
    new = importlib.import_module(googlenet.MOVED[old])
    assert importlib.import_module(f"googlenet.{old}") is new
    assert getattr(googlenet, old) is new
    assert new.__spec__.name == new.__name__ == googlenet.MOVED[old]


def test_public_api_names_resolve():
    for name in googlenet.__all__:
        assert getattr(googlenet, name) is not None
    assert callable(googlenet.train) and callable(googlenet.load) and callable(googlenet.summary)
    from googlenet.engine import train

    assert train is googlenet.train


def test_import_googlenet_does_not_load_the_engine():
    code = (
        "import sys, googlenet; googlenet.build('cifar', num_classes=10);"
        "print(sorted(m for m in sys.modules if m.startswith('googlenet.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "googlenet.model" in loaded
    assert not [m for m in loaded if m.split(".")[1] in ("training", "infer", "insight", "data")]


@pytest.mark.parametrize("package", ["data", "training", "infer", "insight"])
def test_each_package_lists_its_public_face_and_every_name_resolves(package):
    pkg = importlib.import_module(f"googlenet.{package}")
    assert len(pkg.__all__) >= 5
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert getattr(value, "__module__", pkg.__name__).startswith(f"googlenet.{package}")
    assert set(pkg.__all__) <= set(dir(pkg))


def test_the_old_paths_the_docs_name_still_work():
    # README.md and docs/results.md name these; user scripts may too
    import googlenet.engine
    import googlenet.listing
    import googlenet.report
    from googlenet.datasets import load_cifar, resolve_data_root
    from googlenet.evaluate import evaluate, load_members
    from googlenet.explain import ablate, branch_energy, filters_grid, gradcam, visualise_feature

    assert googlenet.engine.train is googlenet.train
    assert callable(googlenet.listing.list_folder)
    assert callable(googlenet.report.report_after_training)
    for f in (load_cifar, resolve_data_root, evaluate, load_members, ablate, branch_energy,
              filters_grid, gradcam, visualise_feature):  # fmt: skip
        assert callable(f)
