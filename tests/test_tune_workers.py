"""Parallel workers on one study: real processes, a real journal file, a real SIGKILL.

The library-level tests use a cheap objective (a sleep) so that timing is under the test's
control; the stage-level test runs real tiny fine-tuning trials with `bigmodel-ops tune --workers 2`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bigmodel_ops.cli import main
from bigmodel_ops.pipeline.tune import name_of_study
from bigmodel_ops.tuning.storage import HEARTBEAT_ATTR, open_storage, reap_stale_trials
from bigmodel_ops.tuning.workers import _pop_waiting, fill_queue, run_worker
from tests.helpers_finetune import make_project

HEARTBEAT, GRACE = 1, 3


def _storage(location: Path):
    """A journal file, or an sqlite RDB storage (Optuna's own heartbeat) for a ``.db`` path."""
    url = f"sqlite:///{location}" if location.suffix == ".db" else None
    return open_storage(url, journal=location, heartbeat_interval=HEARTBEAT, grace_period=GRACE, max_retry=2)


STORES = pytest.mark.parametrize("store", ["study.journal", "study.db"], ids=["journal", "rdb"])


def _worker(journal: str, tag: str, hold_s: float, results: str) -> None:
    """A worker process: runs queued trials; each sleeps ``hold_s`` and returns x."""
    study = optuna.load_study(study_name="s", storage=_storage(Path(journal)))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("worker", tag)
        trial.set_user_attr("pid", os.getpid())
        time.sleep(hold_s)
        return x

    ran = run_worker(study, objective, poll_s=0.2)
    Path(results, f"{tag}.json").write_text(json.dumps(ran))


def _start(journal: Path, tag: str, hold_s: float, results: Path) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(
        target=_worker, args=(str(journal), tag, hold_s, str(results))
    )
    process.start()
    return process


def _pop_all(journal: str, tag: str, results: str) -> None:
    """A worker process that only takes queued trials (as run_worker does), as fast as it can."""
    study = optuna.load_study(study_name="s", storage=_storage(Path(journal)))
    taken = []
    while (trial := _pop_waiting(study)) is not None:
        taken.append(trial.number)
    Path(results, f"{tag}.json").write_text(json.dumps(taken))


def _new_study(journal: Path, n_trials: int) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=_storage(journal), direction="maximize")
    fill_queue(study, n_trials=n_trials)
    return study


def _wait(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@STORES
def test_three_workers_run_exactly_the_requested_trials(tmp_path: Path, store: str):
    journal = tmp_path / store
    study = _new_study(journal, n_trials=9)
    workers = [_start(journal, f"w{k}", 0.5, tmp_path) for k in range(3)]
    for worker in workers:
        worker.join(timeout=180)
        assert worker.exitcode == 0
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(9))  # unique, none lost, none extra
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = [n for k in range(3) for n in json.loads((tmp_path / f"w{k}.json").read_text())]
    assert sorted(ran) == list(range(9))  # each trial run by exactly one worker
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared
    # a second fill of a full study queues nothing
    assert fill_queue(study, n_trials=9) == {"done": 9, "running": 0, "waiting": 0, "enqueued": 0}


@STORES
def test_workers_taking_queued_trials_at_once_never_take_the_same_one(tmp_path: Path, store: str):
    # Optuna hands out a WAITING trial by reading, then updating it; on sqlite the read is outside
    # the update's transaction, and without the storage lock 3 such processes took 8 of 300
    # trials twice.
    journal = tmp_path / store
    _new_study(journal, n_trials=300)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_pop_all, args=(str(journal), f"p{k}", str(tmp_path))) for k in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    taken = [n for k in range(3) for n in json.loads((tmp_path / f"p{k}.json").read_text())]
    assert sorted(taken) == list(range(300))  # every trial taken, and by exactly one process


@STORES
def test_a_killed_workers_trial_is_failed_and_retried_but_a_live_one_is_left_alone(
    tmp_path: Path, store: str
):
    journal = tmp_path / store
    study = _new_study(journal, n_trials=3)
    slow = _start(journal, "slow", 600.0, tmp_path)  # its first trial never ends by itself

    def slow_running() -> list:
        return [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == "slow"
            # the journal's liveness record is a system attribute (RDB keeps its own table)
            and (store.endswith(".db") or HEARTBEAT_ATTR in t.system_attrs)
        ]

    _wait(lambda: bool(slow_running()), timeout=120, what="the slow worker's heartbeat")
    (victim,) = slow_running()
    fast = _start(journal, "fast", 0.2, tmp_path)
    # the fast worker starts, runs the two other queued trials and waits for the slow one:
    # well past the grace period, it has not failed the live worker's trial
    _wait(lambda: len(study.get_trials(states=(TrialState.COMPLETE,))) == 2, timeout=120, what="two trials")
    time.sleep(GRACE + 2 * HEARTBEAT)
    assert study.get_trials()[victim.number].state == TrialState.RUNNING
    assert reap_stale_trials(study) == []  # nor does anyone else
    assert fast.is_alive()

    os.kill(slow.pid, signal.SIGKILL)
    slow.join(timeout=30)
    fast.join(timeout=120)
    assert fast.exitcode == 0

    trials = study.get_trials()
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL
    assert "no heartbeat" in failed.user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == failed.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["worker"] == "fast"
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    assert len(trials) == 4  # three slots plus the failed attempt; nothing RUNNING or WAITING left


def test_tune_with_two_workers_through_the_cli(tmp_path: Path, monkeypatch, mlflow_store: str):
    monkeypatch.chdir(tmp_path)
    params, paths, params_file = make_project(
        tmp_path, n_train=48, n_eval=16, tune={"n_trials": 4, "pruner": "none", "report_every_n_steps": 2}
    )
    assert main(["tune", "--params", str(params_file), "--quiet", "--workers", "2"]) == 0

    storage = _storage(paths.tune_journal)
    study = optuna.load_study(study_name=name_of_study(params, paths), storage=storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    report = json.loads(paths.tune_report.read_text())
    assert report["n_complete"] == 4 and report["n_trials"] == 4

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("ft-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (tune_run,) = [r for r in runs if r.info.run_name == "tune"]
    assert tune_run.data.tags["tune.workers"] == "2" and tune_run.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.info.run_name.startswith("tune/trial-")}
    assert set(children) == {f"tune/trial-{n}" for n in range(4)}
    for trial in trials:
        child = children[f"tune/trial-{trial.number}"]
        assert child.data.tags["mlflow.parentRunId"] == tune_run.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert child.data.tags["optuna.worker"] in ("0", "1")
    assert study.user_attrs["mlflow_run_id"] == tune_run.info.run_id


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(tmp_path: Path, monkeypatch, capsys, workers: str):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["tune", "--workers", workers])
    assert f"--workers must be at least 1, got {workers}" in capsys.readouterr().err


def test_client_run_buffers_trial_logging_and_writes_it_at_the_end(tmp_path):
    """A worker's trial run writes its reports in batches: nothing per report while the
    buffer is young, everything (metrics on their steps, tags, the final status) when the
    run ends, also when the trial fails; a zero interval writes each call at once."""
    from bigmodel_ops.tuning.workers import ClientRun

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("buffered")
    parent = ClientRun(client, client.create_run(experiment, run_name="tune").info.run_id, flush_every_s=3600)

    with parent.child_run("trial-0") as child:
        for step in (10, 20, 30):
            child.log_metrics({"tune/val_acc_subset": step / 100}, step=step)
        child.set_tags({"optuna.state": "COMPLETE"})
        assert client.get_metric_history(child.run_id, "tune/val_acc_subset") == []
        assert "optuna.state" not in client.get_run(child.run_id).data.tags
    run = client.get_run(child.run_id)
    history = client.get_metric_history(child.run_id, "tune/val_acc_subset")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert run.data.tags["optuna.state"] == "COMPLETE"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FINISHED"

    with pytest.raises(ValueError, match="diverged"), parent.child_run("trial-1") as failing:
        failing.log_metrics({"tune/val_acc_subset": 0.5}, step=10)
        raise ValueError("loss diverged")
    run = client.get_run(failing.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["bigmodel_ops.error"] == "ValueError: loss diverged"
    assert [m.value for m in client.get_metric_history(failing.run_id, "tune/val_acc_subset")] == [0.5]

    live = ClientRun(client, client.create_run(experiment, run_name="tune").info.run_id, flush_every_s=0)
    with live.child_run("trial-2") as child:
        child.log_metrics({"tune/val_acc_subset": 0.7}, step=10)
        assert [m.value for m in client.get_metric_history(child.run_id, "tune/val_acc_subset")] == [0.7]


def test_a_journal_lock_left_by_a_killed_process_is_a_plain_file_taken_over_after_the_grace_period(
    tmp_path: Path,
):
    import subprocess
    import sys

    journal = tmp_path / "outputs" / "study.journal"
    # A process killed while it holds the journal's lock (as SIGKILL during a heartbeat write does).
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from bigmodel_ops.tuning.storage import open_storage\n"
        "storage = open_storage(None, journal=Path(sys.argv[1]), heartbeat_interval=1, grace_period=3, "
        "max_retry=0)\n"
        "storage._backend._lock.acquire()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, "outputs/study.journal"], cwd=tmp_path)
    assert killed.returncode == -9
    lock = journal.with_name("study.journal.lock")
    # What `dvc repro` hashes next: a plain file, not a symlink dangling at a relative target.
    assert lock.is_file() and not lock.is_symlink()
    assert {p.name for p in journal.parent.iterdir() if p.is_file()} >= {
        "study.journal",
        "study.journal.lock",
    }
    storage = open_storage(None, journal=journal, heartbeat_interval=1, grace_period=3, max_retry=0)
    started = time.monotonic()
    optuna.create_study(storage=storage, study_name="after-the-kill").optimize(lambda t: 1.0, n_trials=1)
    assert time.monotonic() - started >= 3  # waited out the dead holder, then took the lock over
    assert not lock.exists()
