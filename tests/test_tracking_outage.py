"""A real `mlflow server` that goes away mid-run, or is down when the stage starts: no metric lost."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking.spool import is_offline_id
from bigmodel_ops.tracking.store import TrackingOfflineWarning
from tests.helpers_tracking import (
    clear_run_env,
    free_port,
    make_params,
    start_server,
    stop_server,
    tracked_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def server_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_store: Path) -> dict:
    clear_run_env(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: plain runs, no pipeline parent
    port = free_port()
    db = tmp_path / "server.db"
    shutil.copy(_migrated_store, db)
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {
        "port": port,
        "db": db,
        "uri": uri,
        "artifacts": tmp_path / "served",
        "log": tmp_path / "server.log",
    }


def _start(env: dict):
    return start_server(env["port"], env["db"], env["artifacts"], env["log"])


def _log_steps(run, steps: range) -> None:
    for step in steps:
        run.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.001}, step=step)
        time.sleep(0.002)


def test_server_stopped_and_restarted_mid_run(tmp_path: Path, server_env: dict) -> None:
    params = make_params(tmp_path)
    server = _start(server_env)
    try:
        with tracked_run(params, stage="pretrain") as run:
            _log_steps(run, range(0, 150))
            run.flush()
            stop_server(server)
            with pytest.warns(TrackingOfflineWarning, match="spooled"):
                _log_steps(run, range(150, 300))
                note = tmp_path / "note.txt"
                note.write_text("logged during the outage")
                run.log_artifact(note, "notes")
                run.flush()
            assert run.offline
            assert list((tmp_path / "spool").glob("*.jsonl"))
            server = _start(server_env)  # same port, same store
            _log_steps(run, range(300, 450))
        assert not run.offline
        client = MlflowClient(server_env["uri"])
        history = client.get_metric_history(run.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(450))  # expected 450, all found
        assert len(client.get_metric_history(run.run_id, "train/lr")) == 450
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert [f.path for f in client.list_artifacts(run.run_id, "notes")] == ["notes/note.txt"]
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    finally:
        stop_server(server)


def test_server_down_at_start_then_replayed_by_the_next_stage(tmp_path: Path, server_env: dict) -> None:
    params = make_params(tmp_path)
    with pytest.warns(TrackingOfflineWarning):
        with tracked_run(params, stage="prepare") as offline_run:
            assert is_offline_id(offline_run.run_id)  # no server: a placeholder, training continues
            offline_run.log_params({"rows": 120})
            _log_steps(offline_run, range(100))
    placeholder = offline_run._run_id
    assert list((tmp_path / "spool").glob("*.jsonl"))  # still down at the end: kept on disk

    server = _start(server_env)
    try:
        with tracked_run(params, stage="tokenize") as next_run:  # replays the spool in the background
            _log_steps(next_run, range(10))
        assert not list((tmp_path / "spool").glob("*.jsonl"))
        real = offline_run.run_id
        assert real != placeholder and not is_offline_id(real)
        client = MlflowClient(server_env["uri"])
        created = client.get_run(real)
        assert created.info.run_name == "prepare" and created.info.status == "FINISHED"
        assert created.data.params["rows"] == "120"
        assert sorted(m.step for m in client.get_metric_history(real, "train/loss")) == list(range(100))
        assert created.data.tags["bigmodel_ops.stage"] == "prepare"
        exp = client.get_experiment_by_name("trk-test")
        assert {r.info.run_name for r in client.search_runs([exp.experiment_id])} == {"prepare", "tokenize"}
    finally:
        stop_server(server)
