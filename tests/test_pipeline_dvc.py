"""The whole pipeline under real git + DVC in a temp dir, with a real sqlite MLflow store.

One module-scoped project runs `dvc repro` once; the tests then check, in order:
a second repro skips every stage, a params change re-runs exactly the affected
stages, and `dvc exp run -S` records metrics that `dvc exp show` lists.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.dvc_project import STAGES, Project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    proj = Project.create(tmp_path_factory.mktemp("pipeline"))
    ran = proj.repro()
    assert ran == set(STAGES), f"first repro ran only {ran}"
    proj.commit("first repro")
    return proj


def test_first_repro_produces_every_output(project: Project):
    root = project.root
    for rel in [
        "outputs/prepared/train.parquet",
        "outputs/prepared/pretrain.parquet",
        "outputs/tokenizer/tokenizer.json",
        "outputs/shards/index.json",
        "outputs/pretrain/model/model.safetensors",
        "outputs/tune/best_params.yaml",
        "outputs/finetune/model/model.safetensors",
        "outputs/metrics/evaluate.json",
    ]:
        assert (root / rel).is_file(), rel
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_second_repro_skips_every_stage(project: Project):
    assert project.repro() == set()
    status = project.run("dvc", "status").stdout
    assert "up to date" in status.lower()


def test_bytecode_does_not_invalidate_directory_deps(project: Project):
    # Importing a package writes __pycache__ into directories that are stage deps; .dvcignore
    # must keep them out of the hashes, or every repro after a stage's first import re-runs it.
    # Written by hand because PYTHONDONTWRITEBYTECODE may be set where the tests run.
    written = []
    for package in ("tracking", "data", "pretraining"):
        cache = project.root / "bigmodel_ops" / package / "__pycache__"
        cache.mkdir(exist_ok=True)
        written.append(cache / "__init__.cpython-311.pyc")
        written[-1].write_bytes(b"not really bytecode")
    stray = project.root / "bigmodel_ops" / "data" / "stray.pyc"
    stray.write_bytes(b"not really bytecode")
    written.append(stray)
    try:
        assert project.repro() == set()
    finally:
        for path in written:
            path.unlink()


def test_params_change_reruns_exactly_the_affected_stages(project: Project):
    project.set_param("finetune.max_epochs", 2)  # read by finetune alone
    assert project.repro() == {"finetune", "evaluate", "compress"}
    project.set_param("finetune.lr", 0.0007)  # also the tune stage's baseline trial
    assert project.repro() == {"tune", "finetune", "evaluate", "compress"}
    project.set_param("evaluate.gate.min", 0.05)
    assert project.repro() == {"evaluate", "compress"}
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "params change")


def test_library_change_reruns_its_stages(project: Project):
    evaluation = project.root / "bigmodel_ops" / "evaluation" / "metrics.py"
    evaluation.write_text(evaluation.read_text() + "\n# touched by the test\n")
    assert project.repro() == {"evaluate", "compress"}
    # The tracking layer is not a dep of any stage: editing it re-runs nothing.
    runs = project.root / "bigmodel_ops" / "tracking" / "runs.py"
    runs.write_text(runs.read_text() + "\n# touched by the test\n")
    assert project.repro() == set()
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "library change")


def test_exp_run_metrics_are_listed(project: Project):
    project.run("dvc", "exp", "run", "-S", "evaluate.gate.min=0.01", "-n", "gate-check")
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "gate-check" in text
    assert "outputs/metrics/evaluate.json" in text
    assert "test_acc" in text


def test_mlflow_holds_one_child_run_per_executed_stage(project: Project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("bigmodel-ops-demo")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    names = [run.info.run_name for run in runs]
    for stage in STAGES:
        assert stage in names, f"no MLflow run for stage {stage}: {names}"
    assert all(run.info.status != "RUNNING" for run in runs)
    assert sum(name.startswith("tune/trial-") for name in names) >= 2
    versions = client.search_model_versions("name='bigmodel-ops-demo-classifier'")
    assert versions, "the classifier was not registered"
