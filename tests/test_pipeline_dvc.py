"""The whole pipeline under real git + DVC in a temp dir, with a real sqlite MLflow store.

One module-scoped project runs `dvc repro` once; the tests then check, in order:
a second repro skips every stage, a params change re-runs exactly the affected
stages, and `dvc exp run -S` records metrics that `dvc exp show` lists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenize", "pretrain", "tune", "finetune", "evaluate", "compress"]


def _project_files() -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a fresh clone would hold."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (REPO_ROOT / line).is_file()]


def _tiny(params: dict) -> dict:
    """The repo's params, shrunk so the whole pipeline takes about a minute on 2 cores."""
    params["tracking"]["system_metrics"] = False
    params["tokenizer"]["vocab_size"] = 1000
    cpu = params["profiles"]["cpu"]
    cpu.update(model_preset="tiny", max_steps=12, batch_size=8)
    params["model"]["block_size"] = 64
    params["pretrain"].update(val_every_n_steps=6, val_batches=2, checkpoint_every_n_steps=6, warmup_steps=2)
    params["tune"].update(n_trials=2, max_epochs=1)
    params["tune"]["search_space"]["batch_size"] = {"type": "categorical", "choices": [32]}
    params["finetune"].update(max_epochs=1, max_length=64)
    params["evaluate"]["min_accuracy"] = 0.0
    return params


class Project:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                f"stderr:\n{result.stderr[-6000:]}"
            )
        return result

    def repro(self) -> set[str]:
        """Run `dvc repro`; return the names of the stages that actually ran."""
        out = self.run("dvc", "repro").stdout
        return {stage for stage in STAGES if f"Running stage '{stage}'" in out}

    def set_param(self, dotted: str, value) -> None:
        path = self.root / "params.yaml"
        data = yaml.safe_load(path.read_text())
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("pipeline")
    for name in _project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    for stale in ("dvc.lock",):
        (root / stale).unlink(missing_ok=True)
    params = _tiny(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    env.update(
        # The copy's own package, so that what DVC hashes is what runs.
        PYTHONPATH=str(root),
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    proj = Project(root, env)
    proj.run("git", "init", "-q")
    proj.run("dvc", "init", "-q", "-f") if not (root / ".dvc").exists() else None
    proj.run("git", "add", "-A")
    proj.run("git", "commit", "-qm", "init")
    ran = proj.repro()
    assert ran == set(STAGES), f"first repro ran only {ran}"
    proj.run("git", "add", "-A")
    proj.run("git", "commit", "-qm", "first repro")
    return proj


def test_first_repro_produces_every_output(project: Project):
    root = project.root
    for rel in [
        "outputs/prepared/train.parquet",
        "outputs/prepared/pretrain.parquet",
        "outputs/tokenizer/tokenizer.json",
        "outputs/shards/index.json",
        "outputs/pretrain/model/model.safetensors",
        "outputs/tune/best_params.json",
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
    project.set_param("finetune.lr", 0.0007)
    assert project.repro() == {"finetune", "evaluate", "compress"}
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
