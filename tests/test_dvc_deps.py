"""dvc.yaml lists, for every stage, exactly the package code the stage imports.

A stage's code is everything ``stages/<stage>.py`` imports from ``bigmodel_ops``, followed
through every import statement (module level and inside functions). The tracking layer is
left out on purpose, as the file's header says: where and how runs are logged does not change
what a stage produces, so editing it must not re-run the pipeline. Directory deps count for every
file under them, and each one must hold at least one file the stage imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "bigmodel_ops"
NOT_A_DEP = ("bigmodel_ops.tracking",)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _excluded(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_A_DEP)


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from package import module` imports the module too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def stage_code(entry: Path) -> set[Path]:
    """Files of bigmodel_ops that running ``entry`` can import (tracking excluded), plus entry."""
    seen: set[Path] = {entry}
    todo = [entry]
    while todo:
        for name in _imported_names(todo.pop()):
            if _excluded(name):
                continue
            parts = name.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            for i in range(1, len(parts) + 1):
                file = _module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _dep_paths(stage: dict) -> list[str]:
    return [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]


@pytest.mark.parametrize("name", list(_stages()))
def test_stage_deps_match_the_code_it_imports(name: str) -> None:
    stage = _stages()[name]
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    entry = ROOT / (module.replace(".", "/") + ".py")
    needed = {path.relative_to(ROOT).as_posix() for path in stage_code(entry)}
    code_deps = [d for d in _dep_paths(stage) if d.startswith((PACKAGE + "/", "stages/"))]

    def covered(file: str) -> bool:
        return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in code_deps)

    missing = sorted(file for file in needed if not covered(file))
    unused = sorted(
        dep for dep in code_deps if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for f in needed)
    )
    assert not missing, f"dvc.yaml stage {name!r} imports but does not list: {missing}"
    assert not unused, f"dvc.yaml stage {name!r} lists code it never imports: {unused}"


def test_no_dep_is_an_empty_file() -> None:
    """DVC warns "'<file>' is empty" for an empty dep on every stage that lists it."""
    empty = {
        dep
        for stage in _stages().values()
        for dep in _dep_paths(stage)
        if (ROOT / dep).is_file() and (ROOT / dep).stat().st_size == 0
    }
    assert not empty, f"empty files listed as dvc.yaml deps: {sorted(empty)}"


def test_tracking_is_never_a_dep() -> None:
    for name, stage in _stages().items():
        assert not [d for d in _dep_paths(stage) if d.startswith("bigmodel_ops/tracking")], name


def test_the_import_walk_sees_function_level_imports() -> None:
    """The checker itself: a lazy import inside a function counts (evaluate imports torch lazily
    through the library; the tune stage reaches classification through a function body)."""
    files = {p.relative_to(ROOT).as_posix() for p in stage_code(ROOT / "stages" / "tune.py")}
    assert "bigmodel_ops/classification/training.py" in files
    assert "bigmodel_ops/pipeline/prepare.py" not in files
    assert not any(f.startswith("bigmodel_ops/tracking/") for f in files)


def test_every_output_path_in_code_is_declared_in_dvc_yaml() -> None:
    from bigmodel_ops.paths import ProjectPaths

    paths = ProjectPaths(Path("."))
    # A parent folder, or files inside the stages' declared output folders.
    derived = {"outputs", "tokenizer_file", "best_params", "tune_journal"}
    in_code = {
        getattr(paths, name).as_posix()
        for name, value in vars(ProjectPaths).items()
        if isinstance(value, property) and name not in derived
    }
    declared = set()
    for stage in _stages().values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                declared.add(entry if isinstance(entry, str) else next(iter(entry)))
    assert in_code == declared
