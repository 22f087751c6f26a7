"""SIGKILL `dvc repro` in the middle of a tune trial, run `dvc repro` again: the study continues.

A real git + DVC project in a temp dir (the repo's files and bundled data, shrunk params), a real
sqlite MLflow store and a real journal study; the kill takes the whole process group (dvc and
the stage), as a lost terminal or an OOM killer would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bigmodel_ops.tuning.storage import HEARTBEAT_ATTR, open_storage
from tests.dvc_project import Project

pytestmark = pytest.mark.slow


def _studies(journal: Path) -> list[optuna.Study]:
    storage = open_storage(None, journal=journal, heartbeat_interval=1, grace_period=3, max_retry=2)
    return [
        optuna.load_study(study_name=s.study_name, storage=storage)
        for s in optuna.get_all_study_summaries(storage)
    ]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    def edit(params: dict) -> None:
        params["tune"].update(
            n_trials=3, pruner="none", heartbeat_interval_s=1, grace_period_s=3, report_every_n_steps=5
        )

    return Project.create(tmp_path / "repo", edit=edit)


def test_sigkill_during_tune_then_dvc_repro_continues_the_same_study(project: Project):
    root = project.root
    journal = root / "outputs" / "tune" / "study.journal"
    first = project.start("dvc", "repro", "tune", log=root.parent / "first-repro.log")
    victim = None
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if journal.is_file():
                studies = _studies(journal)
                if studies:
                    trials = studies[0].get_trials()
                    done = [t for t in trials if t.state == TrialState.COMPLETE]
                    running = [
                        t
                        for t in trials
                        if t.state == TrialState.RUNNING
                        and t.intermediate_values
                        and HEARTBEAT_ATTR in t.system_attrs
                    ]
                    if done and running:
                        victim = running[0]
                        break
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert victim is not None, (root.parent / "first-repro.log").read_text()[-4000:]
    (study,) = _studies(journal)
    before = {t.number: t for t in study.get_trials() if t.state == TrialState.COMPLETE}
    assert study.get_trials()[victim.number].state == TrialState.RUNNING  # left behind by the kill
    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    tune_id = study.user_attrs["mlflow_run_id"]
    assert client.get_run(tune_id).info.status == "RUNNING"  # nobody could end it

    second = project.run("dvc", "repro", "tune").stdout
    assert "Running stage 'tune'" in second and "Running stage 'pretrain'" not in second

    (study,) = _studies(journal)  # the same study, continued
    trials = study.get_trials()
    for number, trial in before.items():  # finished trials kept, not re-run
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == trial.value
        assert trials[number].datetime_complete == trial.datetime_complete
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL and "no heartbeat" in killed.user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1 and len(trials) == 4

    # MLflow: one `tune` run, the one from before the kill, resumed and now finished
    experiment = client.get_run(tune_id).info.experiment_id
    runs = client.search_runs([experiment], max_results=200)
    tune_runs = [r for r in runs if r.info.run_name == "tune"]
    assert [r.info.run_id for r in tune_runs] == [tune_id]
    assert study.user_attrs["mlflow_run_id"] == tune_id
    assert tune_runs[0].info.status == "FINISHED" and "bigmodel_ops.resumed_at" in tune_runs[0].data.tags
    trial_runs = {r.info.run_id: r for r in runs if r.info.run_name.startswith("tune/trial-")}
    assert all(r.data.tags["mlflow.parentRunId"] == tune_id for r in trial_runs.values())
    killed_run = trial_runs[victim.user_attrs["mlflow_run_id"]]
    assert killed_run.info.status == "KILLED" and killed_run.data.tags["optuna.state"] == "FAIL"
    retry_run = trial_runs[retry.user_attrs["mlflow_run_id"]]
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["optuna.state"] == "COMPLETE"
    assert retry_run.info.run_name == f"tune/trial-{retry.number}"
    assert (root / "outputs" / "tune" / "best_params.yaml").is_file()
