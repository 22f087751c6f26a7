"""Step-level pruning through the tune stage: a diverging trial is stopped long before its budget."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from bigmodel_ops.pipeline.tune import name_of_study
from bigmodel_ops.pipeline.tune import run as run_tune
from tests.helpers_finetune import make_project


def _project(tmp_path: Path, monkeypatch, **tune):
    """(params, paths) of a project of 48 train / 16 eval rows with these tune settings, made
    the working directory."""
    monkeypatch.chdir(tmp_path)
    params, paths, _ = make_project(tmp_path, n_train=48, n_eval=16, tune=tune)
    return params, paths


def _journal(paths):
    """The stage's journal storage of the study."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(paths.tune_journal)))


def test_pruner_stops_a_diverging_trial_before_its_budget(tmp_path: Path, monkeypatch, mlflow_store: str):
    params, paths = _project(
        tmp_path,
        monkeypatch,
        n_trials=2,
        max_epochs=2,  # 48 rows / batch 8 = 6 steps an epoch: a budget of 12 optimizer steps
        metric="val_loss",
        pruner="threshold",
        prune_threshold=3.0,  # a val loss of 3 nats on a 2-class problem: diverged
        pruner_warmup_steps=2,
        report_every_n_steps=1,
        report_val_fraction=0.5,
        search_space={
            "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
            "batch_size": {"type": "categorical", "choices": [8]},
        },
    )
    paths.tune_dir.mkdir(parents=True)
    storage = _journal(paths)
    study = optuna.create_study(
        storage=storage, study_name=name_of_study(params, paths), direction="minimize"
    )
    study.enqueue_trial({"lr": 2e-3, "batch_size": 8})  # a sane trial
    study.enqueue_trial({"lr": 1.0, "batch_size": 8})  # an AdamW step of 1.0: the loss explodes

    report = run_tune(params, paths=paths, quiet=True)

    study = optuna.load_study(study_name=study.study_name, storage=storage)
    complete, pruned = study.trials
    assert complete.state == optuna.trial.TrialState.COMPLETE and complete.params["lr"] == 2e-3
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.params["lr"] == 1.0
    assert complete.user_attrs["optimizer_steps"] == complete.user_attrs["budget_steps"] == 12
    assert pruned.user_attrs["budget_steps"] == 12
    pruned_steps = pruned.user_attrs["optimizer_steps"]
    assert 2 <= pruned_steps <= 4 < 12  # stopped at the first report after the warmup (or soon after)
    assert max(pruned.intermediate_values) == pruned_steps  # it reported up to where it stopped
    assert report["n_complete"] == 1 and report["n_pruned"] == 1
    assert report["total_optimizer_steps"] == 12 + pruned_steps
    assert report["steps_saved_by_pruning"] == 12 - pruned_steps
    assert report["best_trial"] == 0

    client = MlflowClient(mlflow_store)
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["optuna.reason"].startswith(f"pruned at step {pruned_steps}")
    assert run.data.metrics["tune/optimizer_steps"] == pruned_steps
    losses = client.get_metric_history(run.info.run_id, "tune/val_loss_subset")
    assert [m.step for m in losses] == list(range(1, pruned_steps + 1))
    assert losses[-1].value > 3.0
    done = client.get_run(complete.user_attrs["mlflow_run_id"])
    assert done.data.tags["optuna.state"] == "COMPLETE"
    assert done.data.metrics["tune/optimizer_steps"] == 12
    assert done.data.metrics["tune/value"] == complete.value


def test_a_nan_trial_fails_and_the_study_goes_on(tmp_path: Path, monkeypatch, mlflow_store: str):
    from tests.faults import PoisonAtStep

    params, paths = _project(
        tmp_path,
        monkeypatch,
        n_trials=3,
        pruner="none",
        report_every_n_steps=1,
        max_epochs=1,  # 48 rows / batch 8: a budget of 6 optimizer steps
        search_space={"batch_size": {"type": "categorical", "choices": [8]}},
    )

    def poison_trial_1(trial: optuna.Trial) -> list:
        return [PoisonAtStep(2)] if trial.number == 1 else []  # NaN weights before step 3

    report = run_tune(params, paths=paths, quiet=True, extra_callbacks=poison_trial_1)

    study = optuna.load_study(study_name=name_of_study(params, paths), storage=_journal(paths))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]  # the study went on after the NaN
    diverged = study.trials[1]
    assert diverged.user_attrs["fail_reason"].startswith("diverged: at step 3 on the val subset")
    assert diverged.user_attrs["optimizer_steps"] == 3 < diverged.user_attrs["budget_steps"] == 6
    assert report["n_complete"] == 2 and report["n_failed"] == 1 and report["best_trial"] in (0, 2)

    run = MlflowClient(mlflow_store).get_run(diverged.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.state"] == "FAIL" and run.data.tags["optuna.reason"].startswith("diverged")
