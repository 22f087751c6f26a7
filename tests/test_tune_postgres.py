"""Tuning workers on a PostgreSQL study: the storage a team shares across machines.

Four worker processes on one real PostgreSQL database (its own, dropped afterwards): exactly the
requested trials, unique numbers, each run by one worker; a study that exists with another
direction and an unreachable server are clear errors that never show the URL's password.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bigmodel_ops.errors import ConfigError
from bigmodel_ops.tuning.storage import open_storage
from bigmodel_ops.tuning.workers import fill_queue, run_worker

pytestmark = pytest.mark.slow


def _storage(url: str):
    return open_storage(url, journal=Path("unused"), heartbeat_interval=1, grace_period=3, max_retry=2)


def _worker(url: str, tag: str, results: str) -> None:
    study = optuna.load_study(study_name="s", storage=_storage(url))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("worker", tag)
        time.sleep(0.3)
        return x

    Path(results, f"{tag}.json").write_text(json.dumps(run_worker(study, objective, poll_s=0.2)))


def test_four_workers_on_postgresql_run_exactly_the_requested_trials(postgres_url: str, tmp_path: Path):
    study = optuna.create_study(study_name="s", storage=_storage(postgres_url), direction="maximize")
    fill_queue(study, n_trials=12)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(postgres_url, f"w{k}", str(tmp_path))) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = sorted(n for k in range(4) for n in json.loads((tmp_path / f"w{k}.json").read_text()))
    assert ran == list(range(12))  # none lost, none run twice
    assert len({t.user_attrs["worker"] for t in trials}) >= 2
    assert fill_queue(study, n_trials=12)["enqueued"] == 0


def test_unreachable_postgresql_names_the_setting_and_hides_the_password():
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError) as info:
        _storage("postgresql+psycopg://bob:hunter2secret@127.0.0.1:1/study")  # nothing listens on port 1
    message = str(info.value)
    assert message.startswith("tune.storage = 'postgresql+psycopg://bob:***@127.0.0.1:1/study': cannot open")
    assert "Connection refused" in message or "connection failed" in message
    assert "hunter2secret" not in message
