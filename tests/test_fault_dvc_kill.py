"""Issue #13, scenario 1: SIGKILL of `pretrain` mid-run under `dvc repro`, then `dvc repro` again.

A real git + DVC project in a temp dir (the repo's files and bundled data, tiny params) with its
own sqlite MLflow store. `dvc repro pretrain` runs until the pretrain stage has written a
checkpoint; then the whole process group (dvc and the stage) is SIGKILLed, as a lost terminal or
an OOM killer would. The next `dvc repro pretrain` must resume from the last checkpoint, in the
same MLflow run (ending FINISHED), and end with the weights of an uninterrupted `dvc repro
pretrain` of a copy of the project made before the kill (CPU, within float noise:
``SAME_WEIGHTS_ATOL``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.model import load_pretrained
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pretraining.data import DataSpec, TokenStream, TrainBatches
from bigmodel_ops.shards import ShardIndex
from tests.dvc_project import SAME_WEIGHTS_ATOL, Project, project_env

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MAX_STEPS = 40


def _pretrain_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")
    return [r for r in runs if r.info.run_name == "pretrain"]


@pytest.fixture
def projects(tmp_path: Path) -> tuple[Project, Project]:
    """(to be killed, uninterrupted): both with prepare + tokenize already reproduced."""

    def edit(params: dict) -> None:
        params["profiles"]["cpu"].update(max_steps=MAX_STEPS, batch_size=4)
        params["model"]["dropout"] = 0.1  # the restored RNG state matters
        params["pretrain"].update(
            checkpoint_every_n_steps=5, val_every_n_steps=20, val_batches=1, register_model=False
        )

    killed = Project.create(tmp_path / "killed", edit=edit)
    root = killed.root
    killed.run("dvc", "repro", "tokenize")
    straight_root = tmp_path / "straight"
    shutil.copytree(root, straight_root, symlinks=True)
    return killed, Project(straight_root, project_env(straight_root))


def test_sigkill_of_pretrain_under_dvc_repro_resumes_same_run_same_weights(projects):
    killed, straight = projects
    root = killed.root
    paths = ProjectPaths(root=root)
    log_path = root.parent / "first-repro.log"
    first = killed.start("dvc", "repro", "pretrain", log=log_path)
    checkpoints: list[Path] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and first.poll() is None:
            checkpoints = sorted(paths.pretrain_checkpoints.glob("config-*/step-*.ckpt"))
            if checkpoints:
                break
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert checkpoints, f"no checkpoint before the stage ended:\n{log_path.read_text()[-4000:]}"
    assert first.returncode == -signal.SIGKILL
    # Killed mid-stage: no model, no pretrain entry in dvc.lock, the run left RUNNING.
    assert not (paths.pretrained_model / "model.safetensors").exists()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "pretrain" not in lock["stages"] and "tokenize" in lock["stages"]
    client = MlflowClient(killed.env["MLFLOW_TRACKING_URI"])
    (before,) = _pretrain_runs(client)
    assert before.info.status == "RUNNING"
    last_ckpt_step = max(
        int(p.stem.split("-")[1]) for p in paths.pretrain_checkpoints.glob("config-*/step-*.ckpt")
    )
    assert 0 < last_ckpt_step < MAX_STEPS
    # ...and mid-epoch: the checkpoint it resumes from is not at an epoch boundary.
    params = yaml.safe_load((root / "params.yaml").read_text())
    spec = DataSpec(
        objective=params["model"]["objective"],
        block_size=params["model"]["block_size"],
        batch_size=params["profiles"]["cpu"]["batch_size"],
        seed=params["project"]["seed"],
    )
    per_epoch = len(TrainBatches(TokenStream.from_index(ShardIndex.load(paths.shards), "train"), spec))
    assert last_ckpt_step % per_epoch != 0, (last_ckpt_step, per_epoch)

    second = killed.run("dvc", "repro", "pretrain").stdout
    assert "Running stage 'pretrain'" in second
    assert "Running stage 'prepare'" not in second and "Running stage 'tokenize'" not in second
    reference_out = straight.run("dvc", "repro", "pretrain").stdout
    assert "Running stage 'pretrain'" in reference_out

    report = json.loads(paths.pretrain_report.read_text())
    reference = json.loads(ProjectPaths(root=straight.root).pretrain_report.read_text())
    assert report["resumed_from_step"] == last_ckpt_step, report
    assert report["global_step"] == reference["global_step"] == MAX_STEPS
    assert not reference.get("resumed_from_step")

    # The same MLflow run, re-attached and finished.
    (after,) = _pretrain_runs(client)
    assert after.info.run_id == before.info.run_id == report["run_id"]
    assert after.info.status == "FINISHED"
    assert after.data.tags["bigmodel_ops.resumed_from_step"] == str(last_ckpt_step)

    # The same weights as the uninterrupted run.
    a = load_pretrained(ProjectPaths(root=straight.root).pretrained_model).state_dict()
    b = load_pretrained(paths.pretrained_model).state_dict()
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= SAME_WEIGHTS_ATOL, diff

    # The lock now records pretrain; a further repro has nothing to do.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "pretrain" in lock["stages"]
    assert "Running stage" not in killed.run("dvc", "repro", "pretrain").stdout
