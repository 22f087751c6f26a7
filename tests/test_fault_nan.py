"""A NaN/inf loss, injected from the test (a callback that poisons the weights), never through
anything production code reads.

- pretraining (through the stage's process): stops, exit status 2 with a one-line error, the last
  good checkpoint kept (the diverged state is never written), the MLflow run FAILED, nothing
  exported;
- fine-tuning: stops at the step whose loss was NaN, nothing exported, logged as a model or
  registered, the MLflow run FAILED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.errors import TrainingDiverged
from bigmodel_ops.pipeline.finetune import run as run_finetune
from bigmodel_ops.pretraining.checkpoints import find_resume_point
from tests import helpers_finetune, helpers_pretrain
from tests.faults import PoisonAtStep, run_stage_process

pytestmark = pytest.mark.fault


def _runs(store: str, stage: str):
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`bigmodel_ops.stage` = '{stage}'")


class _LastStep(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_nan_in_pretraining_stops_the_stage_process_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, mlflow_store: str
):
    _, paths, _ = helpers_pretrain.make_project(
        tmp_path, pretrain={"checkpoint_every_n_steps": 4, "register_model": True}
    )
    result = run_stage_process(tmp_path, "pretrain", "--nan-at-step", "5")  # step 6's loss is NaN
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bigmodel-ops pretrain: error:" in result.stderr and "NaN/inf" in result.stderr
    assert "last good checkpoint is kept" in result.stderr and "Traceback" not in result.stderr
    folder = helpers_pretrain.ckpt_dir(paths)
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step-00000004.ckpt"]
    point = find_resume_point(folder)
    assert point.global_step == 4
    state = torch.load(point.path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    (run,) = _runs(mlflow_store, "pretrain")
    assert run.info.status == "FAILED"
    assert not paths.pretrained_model.exists() and not paths.pretrain_report.exists()
    assert MlflowClient(mlflow_store).search_registered_models() == []


class _PoisonSecondFit(PoisonAtStep):
    """PoisonAtStep in the second fit of the stage only (restart 1 of finetune.restarts)."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.fits = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fits += 1

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.fits == 2:
            super().on_train_batch_start(trainer, *args)


def test_nan_in_a_finetuning_restart_fails_the_stage_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths, _ = helpers_finetune.make_project(
        tmp_path, finetune={"max_epochs": 2, "restarts": 2, "control": "scratch"}
    )
    monkeypatch.chdir(tmp_path)
    poison = _PoisonSecondFit(2)
    with pytest.raises(
        TrainingDiverged,
        match=r"finetune \(restart 1, seed 1007\): the train loss became NaN/inf at step 3; training",
    ):
        run_finetune(params, paths=paths, quiet=True, callbacks=[poison])
    assert poison.fired
    assert not paths.classifier.exists() and not paths.finetune_report.exists()
    assert not paths.control_classifier.exists()
    runs = {run.info.run_name: run for run in _runs(mlflow_store, "finetune")}
    assert runs["finetune"].info.status == "FAILED"
    assert runs["finetune/restart-0"].info.status == "FINISHED"
    assert runs["finetune/restart-1"].info.status == "FAILED"
    assert MlflowClient(mlflow_store).search_registered_models() == []


def test_nan_in_finetuning_stops_at_that_step_and_registers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths, _ = helpers_finetune.make_project(tmp_path, finetune={"max_epochs": 3})
    monkeypatch.chdir(tmp_path)
    poison, steps = PoisonAtStep(2), _LastStep()  # the loss of optimizer step 3 is NaN
    with pytest.raises(
        TrainingDiverged, match=r"finetune: the train loss became NaN/inf at step 3; training stopped"
    ):
        run_finetune(params, paths=paths, quiet=True, callbacks=[poison, steps])
    assert poison.fired
    assert max(steps.steps) == 3  # 64 examples / batch 16 x 3 epochs = 12 steps unless stopped
    assert not paths.classifier.exists() and not paths.finetune_report.exists()
    assert not paths.control_classifier.exists()
    (run,) = _runs(mlflow_store, "finetune")
    assert run.info.status == "FAILED"
    assert "bigmodel_ops.model_uri" not in run.data.tags
    client = MlflowClient(mlflow_store)
    assert client.search_registered_models() == []
    assert client.search_logged_models([run.info.experiment_id]) == []
