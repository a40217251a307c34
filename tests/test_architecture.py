"""The layers of docs/architecture.md: imports only go down, and every module imports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lit_rlhf

PACKAGE = Path(lit_rlhf.__file__).parent
LAYERS = [
    ("lit_rlhf", "lit_rlhf.errors", "lit_rlhf.losses", "lit_rlhf.advantages", "lit_rlhf.kl_control",
     "lit_rlhf.uncertainty", "lit_rlhf.run_folder"),
    ("lit_rlhf.models", "lit_rlhf.data", "lit_rlhf.world", "lit_rlhf.diagnostics"),
    ("lit_rlhf.generation", "lit_rlhf.evaluation", "lit_rlhf.scoring", "lit_rlhf.judges", "lit_rlhf.collect",
     "lit_rlhf.selection", "lit_rlhf.reward_models"),
    ("lit_rlhf.phases", "lit_rlhf.trainer_parts"),
    ("lit_rlhf.pipeline", "lit_rlhf.pipeline_spec", "lit_rlhf.pipeline_run", "lit_rlhf.held_out",
     "lit_rlhf.stage_runners", "lit_rlhf.sweep", "lit_rlhf.report"),
    ("lit_rlhf.cli", "lit_rlhf.__main__"),
]
"""From the ground up; a module belongs to the layer of the longest entry it starts with."""
MODULES = sorted(name for _, name, _ in pkgutil.walk_packages([str(PACKAGE)], "lit_rlhf."))


def layer(module: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def module_source(module: str) -> ast.Module:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    return ast.parse(path.read_text())


def imported_names(module: str) -> set[tuple[str, str | None]]:
    """``(module, name)`` for every ``from module import name`` of the package anywhere in the file (inside functions
    too), ``(module, None)`` for every ``import module``."""
    found = set()
    for node in ast.walk(module_source(module)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, None) for alias in node.names}
    return {(name, alias) for name, alias in found if name == "lit_rlhf" or name.startswith("lit_rlhf.")}


def imported(module: str) -> set[str]:
    return {name for name, _ in imported_names(module)}


def import_graph() -> dict[str, set[str]]:
    """Each module → the package's modules it imports; ``from a import b`` counts as importing ``a.b`` where that is
    a module."""
    graph = {}
    for module in [*MODULES, "lit_rlhf"]:
        targets = {f"{name}.{alias}" if f"{name}.{alias}" in MODULES else name
                   for name, alias in imported_names(module)}
        graph[module] = targets - {module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): every circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle_anywhere():
    """Not even through an import inside a function, which the layering test cannot see between modules of one
    layer (pipeline, sweep and report once imported each other)."""
    assert import_circles(import_graph()) == []
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    assert MODULES and all(layer(module) >= 0 for module in MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_go_down(module):
    upward = sorted(name for name in imported(module) if layer(name) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports from above: {upward}"


@pytest.mark.parametrize("module", ["lit_rlhf.losses", "lit_rlhf.advantages", "lit_rlhf.kl_control",
                                    "lit_rlhf.uncertainty"])
def test_the_math_imports_only_torch(module):
    assert imported(module) <= {"lit_rlhf.losses"}


def test_every_module_imports():
    for module in MODULES:
        if module != "lit_rlhf.__main__":  # importing it runs the command line
            importlib.import_module(module)


WORLD_PLUGS_IN = {
    "lit_rlhf.scoring": "the gold reward as a scorer (gold_scorer)",
    "lit_rlhf.data.datamodules": "the default data",
    "lit_rlhf.models.loading": "the tokenizer preset",
    "lit_rlhf.judges": "the simulated raters",
    "lit_rlhf.diagnostics": "the exact features the hacking detectors read",
    "lit_rlhf.cli": "the `lit-rlhf world` command",
    "lit_rlhf.held_out": "the guard on world prompts",
}
"""The modules outside lit_rlhf.world that import it, and what of the world each plugs in."""


def imports_world(module: str) -> bool:
    return any(name == "lit_rlhf.world" or name.startswith("lit_rlhf.world.") or (name, alias) == ("lit_rlhf", "world")
               for name, alias in imported_names(module))


def test_the_world_plugs_in_only_where_named():
    """The machinery (evaluation, phases, collection) is world-free: the world reaches it as a scorer, a data source,
    a tokenizer preset or a judge."""
    outside = [module for module in MODULES if module != "lit_rlhf.world" and not module.startswith("lit_rlhf.world.")]
    assert {module for module in outside if imports_world(module)} == set(WORLD_PLUGS_IN)
