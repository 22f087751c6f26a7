"""The tune stage: a real Optuna journal study of real tiny fine-tuning trials, nested MLflow runs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.cli import main
from bigmodel_ops.config import parse_params
from bigmodel_ops.pipeline.tune import name_of_study as study_name
from bigmodel_ops.pipeline.tune import run as run_tune
from bigmodel_ops.tuning.study import study_summary
from tests.helpers_finetune import make_project, tiny_params


def _journal_study(params, paths) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(paths.tune_journal)))
    return optuna.load_study(study_name=study_name(params, paths), storage=storage)


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ft-test")
    return client.search_runs([experiment.experiment_id], max_results=200)


def test_tune_study_nested_runs_resume_and_pruning(tmp_path: Path, monkeypatch, mlflow_store: str):
    monkeypatch.chdir(tmp_path)
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16)

    report = run_tune(params, paths=paths, quiet=True)

    # the study: two complete trials in the journal file
    study = _journal_study(params, paths)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    assert paths.tune_journal.is_file()
    best = yaml.safe_load(paths.best_params.read_text())
    assert set(best) == {"lr", "dropout", "weight_decay", "batch_size", "value", "trial"}
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["lr"] == study.best_trial.params["lr"] and best["batch_size"] == 16
    assert not (paths.tune_dir / "best_params.json").exists()  # one file, the one finetune reads
    steps = [t.user_attrs["optimizer_steps"] for t in study.trials]
    assert steps == [2, 2] and [t.user_attrs["budget_steps"] for t in study.trials] == [2, 2]  # 32 rows / 16
    # trial 0 is the baseline: the finetune settings themselves (tune.baseline_trial)
    assert study.trials[0].params == {"lr": 3e-3, "dropout": 0.1, "weight_decay": 0.01, "batch_size": 16}
    assert [t.user_attrs.get("baseline", False) for t in study.trials] == [True, False]
    assert report == {
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "baseline_value": study.trials[0].value,
        "baseline_trial": 0,
        "n_trials": 2,
        "n_complete": 2,
        "n_pruned": 0,
        "n_failed": 0,
        "total_trial_seconds": pytest.approx(sum(t.user_attrs["wall_seconds"] for t in study.trials)),
        "total_optimizer_steps": 4,
        "steps_saved_by_pruning": 0,
    }
    assert json.loads(paths.tune_report.read_text()) == report
    plots = ["intermediate_values", "optimization_history", "parallel_coordinate", "param_importances"]
    for plot in plots:
        assert (paths.tune_dir / f"{plot}.png").stat().st_size > 1000
    # every report step of each trial: the subset value Optuna saw
    assert sorted(study.trials[0].intermediate_values) == [1, 2]

    # MLflow: tune run with two nested trial runs carrying params and per-epoch metrics
    runs = _runs(mlflow_store)
    tune_runs = [r for r in runs if r.info.run_name == "tune"]
    assert len(tune_runs) == 1
    tune_run = tune_runs[0]
    trials = {r.info.run_name: r for r in runs if r.info.run_name.startswith("tune/trial-")}
    assert set(trials) == {"tune/trial-0", "tune/trial-1"}
    client = MlflowClient(mlflow_store)
    for number, run in ((0, trials["tune/trial-0"]), (1, trials["tune/trial-1"])):
        assert run.data.tags["mlflow.parentRunId"] == tune_run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags.get("tune.baseline") == ("true" if number == 0 else None)
        assert float(run.data.params["lr"]) == pytest.approx(study.trials[number].params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [0]  # one epoch, logged at the epoch number
        assert history[0].value == pytest.approx(study.trials[number].value)
        subset = client.get_metric_history(run.info.run_id, "tune/val_acc_subset")
        reports = study.trials[number].intermediate_values
        assert {m.step: m.value for m in subset} == pytest.approx(reports)
        assert run.data.metrics["tune/optimizer_steps"] == 2 and run.data.metrics["tune/wall_seconds"] > 0
    assert tune_run.data.metrics["n_complete"] == 2
    assert tune_run.data.metrics["baseline_value"] == pytest.approx(study.trials[0].value)
    assert tune_run.data.tags["tune.best_trial"] == str(study.best_trial.number)
    assert tune_run.data.tags["tune.best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    artifacts = [a.path for a in client.list_artifacts(tune_run.info.run_id, "plots")]
    assert artifacts == [f"plots/{plot}.png" for plot in plots]

    # resume with one more trial and a pruner that prunes everything: only trial 2 runs
    raw = tiny_params(tune={"n_trials": 3, "pruner": "threshold", "prune_threshold": 1.01})
    raw["model"] = {"objective": "masked"}
    more = parse_params(raw)
    assert study_name(more, paths) == study_name(params, paths)  # n_trials / pruner do not change the study
    report = run_tune(more, paths=paths, quiet=True)
    study = _journal_study(params, paths)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert "baseline" not in study.trials[2].user_attrs  # a continued study gets no second baseline
    assert report["n_pruned"] == 1 and report["n_complete"] == 2 and report["n_trials"] == 3
    assert yaml.safe_load(paths.best_params.read_text()) == best  # a pruned trial is never the best
    runs = _runs(mlflow_store)
    names = sorted(r.info.run_name for r in runs if r.info.run_name.startswith("tune/trial-"))
    assert names == ["tune/trial-0", "tune/trial-1", "tune/trial-2"]  # 0 and 1 were not re-run
    pruned = next(r for r in runs if r.info.run_name == "tune/trial-2")
    assert pruned.data.tags["optuna.state"] == "PRUNED"
    assert pruned.data.tags["optuna.reason"].startswith("pruned at step 1")
    assert (
        study.trials[2].user_attrs["optimizer_steps"] == 1 < study.trials[2].user_attrs["budget_steps"] == 2
    )
    assert report["steps_saved_by_pruning"] == 1
    second_tune = [r for r in runs if r.info.run_name == "tune" and r.info.run_id != tune_run.info.run_id]
    assert pruned.data.tags["mlflow.parentRunId"] == second_tune[0].info.run_id

    # a rerun of a finished study trains nothing and rewrites the same outputs
    assert run_tune(more, paths=paths, quiet=True) == report
    assert len([r for r in _runs(mlflow_store) if r.info.run_name.startswith("tune/trial-")]) == 3


def test_tune_with_no_completed_trial_fails_and_writes_nothing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(
        tmp_path, n_train=16, n_eval=8, tune={"n_trials": 1, "pruner": "threshold", "prune_threshold": 1.01}
    )
    code = main(["tune", "--params", str(params_file), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no trial of study" in err and "1 pruned" in err and "best_params.yaml was not written" in err
    assert not paths.best_params.exists() and not paths.tune_report.exists()
    assert paths.tune_journal.is_file()  # finished (pruned) trials are kept for the next run
    assert not [p for p in paths.tune_dir.iterdir() if p.name.startswith(".")]


def test_tune_missing_pretrained_model(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import shutil

    _, paths, params_file = make_project(tmp_path, n_train=8, n_eval=4)
    shutil.rmtree(paths.pretrained_model)
    assert main(["tune", "--params", str(params_file), "--quiet"]) == 2
    assert "outputs/pretrain/model: pretrained model not found" in capsys.readouterr().err
    assert not paths.tune_dir.exists() and not paths.tune_report.exists()


def test_summary_counts_nan_and_failed_trials(tmp_path: Path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            trial.set_user_attr("fail_reason", "diverged: val_loss=nan")
            return math.nan
        if trial.number == 2:
            raise optuna.TrialPruned()
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=3)
    summary = study_summary(study)
    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"]) == (1, 1, 1)
    assert summary["failures"] == {1: "diverged: val_loss=nan"}
    assert summary["best"]["trial"] == 0 and summary["best"]["x"] == study.trials[0].params["x"]


def test_tune_without_baseline_trial_draws_every_trial(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, paths, _ = make_project(
        tmp_path, n_train=16, n_eval=8, tune={"n_trials": 1, "baseline_trial": False}
    )
    with_baseline = parse_params(tiny_params(tune={"n_trials": 1}))
    assert study_name(params, paths) != study_name(with_baseline, paths)  # not the same study

    report = run_tune(params, paths=paths, quiet=True)

    trial = _journal_study(params, paths).trials[0]
    assert "baseline" not in trial.user_attrs and trial.params["lr"] != 3e-3  # drawn, not finetune.lr
    assert "baseline_value" not in report and "baseline_trial" not in report
    assert report["best_trial"] == 0


def test_baseline_values_keep_only_what_the_space_can_draw():
    from bigmodel_ops.classification.training import HyperParams
    from bigmodel_ops.config import SearchSpace
    from bigmodel_ops.tuning.study import baseline_values

    space = SearchSpace.model_validate(
        {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},  # finetune.lr 2e-3 is above
            "dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
            "weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.04},  # 0.01 is off the step
            "batch_size": {"type": "categorical", "choices": [16, 32]},
            "lora.rank": {"type": "int", "low": 4, "high": 16, "step": 4},
            "freeze_backbone": {"type": "categorical", "choices": [False]},
        }
    )
    base = HyperParams(
        lr=2e-3, dropout=0.1, weight_decay=0.01, batch_size=32, lora_rank=8, freeze_backbone=True
    )
    assert baseline_values(space, base) == {"dropout": 0.1, "batch_size": 32, "lora.rank": 8}


def test_fill_queue_enqueues_the_baseline_only_into_an_empty_study(tmp_path: Path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from bigmodel_ops.tuning.workers import fill_queue, run_worker

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    study = optuna.create_study(
        storage=storage, study_name="s", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1)

    assert fill_queue(study, n_trials=2, first={"x": 0.25})["enqueued"] == 2
    run_worker(study, objective)
    first, second = study.trials
    assert first.params["x"] == 0.25 and first.user_attrs == {"baseline": True}
    assert 0 <= first.params["y"] <= 1  # a setting the baseline leaves out is drawn
    assert second.params["x"] != 0.25 and "baseline" not in second.user_attrs
    assert study_summary(study)["baseline"] == {"value": first.value, "trial": 0}

    assert fill_queue(study, n_trials=3, first={"x": 0.25})["enqueued"] == 1  # not empty: no second baseline
    run_worker(study, objective)
    assert study.trials[2].params["x"] != 0.25 and "baseline" not in study.trials[2].user_attrs


@pytest.mark.parametrize(
    ("status", "tags", "resumed"),
    [
        ("RUNNING", {}, True),  # its process was SIGKILLed
        ("KILLED", {}, True),  # stopped by SIGTERM / Ctrl-C
        ("FAILED", {"bigmodel_ops.reap_reason": "process gone"}, True),  # ended by the reaper of dead runs
        ("FAILED", {}, False),  # the stage failed by itself: a new run
        ("FINISHED", {}, False),
    ],
)
def test_which_tune_run_a_rerun_continues(mlflow_store: str, status: str, tags: dict, resumed: bool):
    from bigmodel_ops.pipeline.tune import _resumable_run

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("resume-rule")
    run_id = client.create_run(experiment, run_name="tune", tags=tags).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    study = optuna.create_study()
    assert _resumable_run(study, client) is None  # a study that never had a tune run
    study.set_user_attr("mlflow_run_id", run_id)
    assert _resumable_run(study, client) == (run_id if resumed else None)
    study.set_user_attr("mlflow_run_id", "0" * 32)  # a run deleted from the store
    assert _resumable_run(study, client) is None
