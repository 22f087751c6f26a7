"""benchmarks/hpo_pruning.py: what keys the saved unpruned study (``--reuse-unpruned``)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from tests.helpers_benchmarks import run_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "hpo_pruning.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("hpo_pruning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unpruned_key_ignores_pruner_settings_and_follows_everything_else() -> None:
    bench = _load_script()
    raw = bench.repo_params()
    key = bench.unpruned_key(raw, threads=1)

    pruner_only = copy.deepcopy(raw)
    pruner_only["tune"].update({"pruner": "successive_halving", "min_resource": 640, "reduction_factor": 4})
    pruner_only["tune"]["report_every_n_examples"] = 320  # the report axis: what is recorded, not trained
    pruner_only["tracking"]["uri"] = "sqlite:///elsewhere.db"
    assert bench.unpruned_key(pruner_only, threads=1) == key

    for section, name, value in (
        ("tune", "max_epochs", 7),
        ("tune", "n_trials", 99),
        ("project", "seed", 4242),
        ("finetune", "max_length", 32),
    ):
        changed = copy.deepcopy(raw)
        changed[section][name] = value
        assert bench.unpruned_key(changed, threads=1) != key, f"{section}.{name} must change the key"
    assert bench.unpruned_key(raw, threads=2) != key


def test_reuse_unpruned_needs_keep() -> None:
    result = run_benchmark(SCRIPT, "--quick", "--reuse-unpruned", cwd=Path.cwd(), timeout=120)
    assert result.returncode == 2
    assert "--reuse-unpruned needs --keep" in result.stderr


def test_study_names_are_the_tune_stages_on_each_axis(tmp_path: Path) -> None:
    import json

    from bigmodel_ops.config import parse_params
    from bigmodel_ops.contract import MODEL_FILES
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline.tune import name_of_study

    bench = _load_script()
    paths = ProjectPaths(tmp_path)
    for folder, names in (
        (paths.pretrained_model, MODEL_FILES),
        (paths.prepared, ("train.parquet", "val.parquet")),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_text(f"contents of {name}")  # the name hashes contents only
    raw = bench.repo_params()
    raw["tune"]["report_every_n_steps"] = 20  # refused beside report_every_n_examples: must be dropped
    bench.write_study_names(tmp_path / "names.json", raw, paths=paths)
    names = json.loads((tmp_path / "names.json").read_text())

    assert names["steps"] == name_of_study(parse_params(raw), paths)
    examples = copy.deepcopy(raw)
    # min_resource counts examples there: the repo's 20 would be refused (the name does not hold it).
    examples["tune"].update(report_every_n_steps=10, report_every_n_examples=640, min_resource=640)
    assert names["examples"] == name_of_study(parse_params(examples), paths)
    assert names["examples"] != names["steps"]
