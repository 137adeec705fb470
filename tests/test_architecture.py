"""The architecture, checked from the code's own imports.

run_*.py -> pipeline/ (its top-level modules compose the stages) -> one stage (data/, extract/, heads/, live/)
-> the shared packages, in one order: pipeline/backbones/ -> pipeline/datasets/ -> pipeline/common/ -> features/,
models/. No stage imports another stage, and no shared package imports one above it.

Imports are read with ``ast``, including those inside functions and under ``if TYPE_CHECKING:``, so a lazy
or type-only import counts as an arrow too.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tests.helpers import ROOT

PACKAGES = ("pipeline", "features", "models")
STAGES = ("pipeline.data", "pipeline.extract", "pipeline.heads", "pipeline.live")
SHARED = ("pipeline.backbones", "pipeline.datasets", "pipeline.common")  # top to bottom: common <- datasets <- backbones
BELOW_STAGES = {*SHARED, "features", "models"}
# who may import whom (besides itself): the one-way rule
ALLOWED = {
    "run": {"pipeline", *STAGES, *SHARED},
    "pipeline": {*STAGES, *BELOW_STAGES},  # the top-level modules: the commands that compose the stages
    **{stage: BELOW_STAGES for stage in STAGES},  # never another stage
    # each shared package imports only those below it
    **{package: {*SHARED[i + 1:], "features", "models"} for i, package in enumerate(SHARED)},
    "features": set(),
    "models": set(),
    "benchmarks": {"pipeline", *STAGES, *BELOW_STAGES},
    "pipeline.app": {"pipeline", *STAGES, *BELOW_STAGES},  # the web app composes stages, as the commands do
}
ALLOWED["run"] = {*ALLOWED["run"], "pipeline.app"}  # only an entry script starts the app: nothing else imports it
# facts that must be defined in exactly one module
SHARED_CONSTANTS = ("PRECISIONS", "DTYPES", "IMAGE_SUFFIXES", "CHECKPOINT_FORMAT", "DEFAULT_DATA", "DEFAULT_FEATURES",
                    "DEFAULT_HEAD", "DEFAULT_CHECKPOINT", "TINY_IMAGENET_URL", "TINY_IMAGENET_MD5", "MIN_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "FORMAT_VERSION", "REQUIRED_KEYS")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the packages, the entry scripts and the benchmarks."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted(ROOT.glob("run_*.py")):
        modules[path.stem] = path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        modules[f"benchmarks.{path.stem}"] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (``from pkg import mod`` names the module).

    Imports inside functions count, and so do those under ``if TYPE_CHECKING:``: a type-only import is an
    arrow too (a cycle through one still ties the two modules together).
    """
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
            elif name.split(".")[0] in PACKAGES or name.startswith("run_"):
                found.add(name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in modules else name)
    return found


def layer(module: str) -> str:
    """run, pipeline (its top-level modules), pipeline.<stage or common>, features, models or benchmarks."""
    parts = module.split(".")
    if parts[0].startswith("run_"):
        return "run"
    if parts[0] == "pipeline" and len(parts) > 1 and f"pipeline.{parts[1]}" in ALLOWED:
        return f"pipeline.{parts[1]}"
    return parts[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_no_arrow_runs_back_up(graph):
    wrong = [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets)
             if layer(b) != layer(a) and layer(b) not in ALLOWED[layer(a)]]
    assert not wrong, ("imports against the one-way rule run_*.py -> pipeline/ -> a stage -> backbones/ -> datasets/ -> "
                       "common/ -> features/, models/: " + ", ".join(wrong))


def test_the_shared_packages_form_one_order(graph):
    """common <- datasets <- backbones: a shared package imports only the ones below it, never one above."""
    order = {package: rank for rank, package in enumerate(SHARED)}
    wrong = [f"{a} -> {b}" for a, targets in graph.items() if layer(a) in order for b in targets
             if layer(b) in order and order[layer(b)] < order[layer(a)]]
    assert not wrong, "a shared package imports one above it (common <- datasets <- backbones): " + ", ".join(wrong)


def test_no_stage_imports_another_stage(graph):
    wrong = [f"{a} -> {b}" for a, targets in graph.items() if layer(a) in STAGES for b in targets
             if layer(b) in STAGES and layer(b) != layer(a)]
    assert not wrong, "a stage imports another stage: " + ", ".join(wrong)


def test_entry_scripts_reach_only_pipeline(graph):
    wrong = [f"{a} -> {b}" for a, targets in graph.items() if layer(a) == "run" for b in targets
             if not b.startswith("pipeline")]
    assert not wrong, ", ".join(wrong)


def test_features_and_models_import_nothing_from_the_project(graph):
    for name, targets in graph.items():
        if layer(name) in ("features", "models"):
            assert all(layer(t) == layer(name) for t in targets), (name, targets)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_shared_constants_are_defined_once():
    where: dict[str, list[str]] = {name: [] for name in SHARED_CONSTANTS}
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id in where:
                    where[target.id].append(module)
    twice = {name: modules for name, modules in where.items() if len(modules) > 1}
    assert not twice, f"defined in more than one module: {twice}"
    missing = [name for name, modules in where.items() if not modules]
    assert not missing, f"no longer defined anywhere (update SHARED_CONSTANTS): {missing}"


def test_the_checker_sees_a_back_arrow(tmp_path):
    """The import reader itself: a lazy import inside a function counts."""
    modules = {"features.cache": tmp_path / "cache.py", "pipeline.common.errors": tmp_path / "errors.py"}
    modules["features.cache"].write_text("def f():\n    from pipeline.common.errors import UserError\n")
    assert imports_of(modules["features.cache"], modules) == {"pipeline.common.errors"}


def test_the_checker_sees_a_type_only_import(tmp_path):
    """An import under ``if TYPE_CHECKING:`` is an arrow too, so a type-only cycle is caught."""
    modules = {"features.shards": tmp_path / "shards.py", "features.cache": tmp_path / "cache.py"}
    modules["features.shards"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from features.cache import CacheSettings\n")
    assert imports_of(modules["features.shards"], modules) == {"features.cache"}


def test_common_holds_only_what_every_stage_shares():
    """pipeline/common/ is no catch-all: what one stage owns lives in that stage, the dataset concept in
    pipeline/datasets/, the backbone's in pipeline/backbones/ (at most 12 modules, __init__ aside)."""
    modules = [p for p in (ROOT / "pipeline" / "common").rglob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(modules) <= 12, sorted(p.name for p in modules)


def test_no_source_file_or_function_is_too_long():
    """A file of over 400 lines, or a function of over 60, has more than one job: split it (benchmarks included)."""
    long_files, long_functions = [], []
    for module, path in project_modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            long_files.append(f"{module} ({len(lines)} lines)")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_files and not long_functions, f"too long: {long_files + long_functions}"


def test_the_tests_mirror_the_tree():
    """tests/<package>/ per stage and shared package (a module's fault tests beside its behaviour tests); at the top
    only the architecture, the compatibility fixtures, the integration run and the GPU check; ROOT defined once."""
    top = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert len(top) <= 4, top
    folders = [p for p in (ROOT / "tests").iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    assert len(folders) >= 5, folders
    defined = [p for p in (ROOT / "tests").rglob("*.py") if re.search(r"^ROOT = ", p.read_text(), re.M)]
    assert [p.name for p in defined] == ["helpers.py"], defined


def test_nothing_but_an_entry_script_imports_the_app(graph):
    """pipeline/app/ composes stages (and may import them); no stage, shared package or command imports it."""
    wrong = [f"{a} -> {b}" for a, targets in graph.items() if layer(a) not in ("run", "pipeline.app")
             for b in targets if layer(b) == "pipeline.app"]
    assert not wrong, "only run_*.py may import pipeline.app: " + ", ".join(wrong)
