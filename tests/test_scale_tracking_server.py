"""Issue #14, tracking: a team's `mlflow server`, PostgreSQL backend + artifact root, over HTTP.

The server is started the documented way, ``bigmodel-ops ui`` with ``MLFLOW_TRACKING_URI``
pointing at a fresh PostgreSQL database (the ``postgres_url`` fixture); its artifact root is the
project's ``tracking.artifact_location``. A whole ``dvc repro`` of the tiny pipeline then logs to
it over HTTP with MLflow's and our client defaults: no ``MLFLOW_HTTP_*`` variable is set (the
session fixture's short retries are dropped by ``project_env``), so the values our stages use
are ``tracking.http_max_retries`` / ``http_timeout_s``. Everything a team browses must be there:
one parent run with its stage runs, their metrics, their artifacts (read back through the server,
stored under the artifact root), and the registered classifier with its aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.serving import fluent_tracking_uri
from tests.dvc_project import STAGES, Project
from tests.helpers_tracking import free_port, stop_server, wait_http

pytestmark = pytest.mark.slow

EXPERIMENT = "bigmodel-ops-demo"


def test_dvc_repro_logs_everything_to_a_postgresql_backed_server(tmp_path: Path, postgres_url: str):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    project = Project.create(tmp_path / "repo", edit=_passing_gate, tracking_uri=uri)
    server_env = {**project.env, "MLFLOW_TRACKING_URI": postgres_url}
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "bigmodel_ops.cli", "ui", "--port", str(port)],
        cwd=project.root,
        env=server_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"{uri}/health", timeout=180, process=server)
        assert not any(key.startswith("MLFLOW_HTTP_") for key in project.env)
        assert project.repro() == set(STAGES)
        client = MlflowClient(uri)
        _check_runs(client)
        _check_artifacts(client, uri, project.root, tmp_path / "downloads")
        _check_registry(client)
    except BaseException:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        # SIGTERM: `bigmodel-ops ui` then stops the server's own process group (SIGKILL would orphan it).
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_server(server)
    # Nothing reached a local store: the stages logged over HTTP only.
    assert not (project.root / "mlflow.db").exists()


def _passing_gate(params: dict) -> None:
    """The tiny model must be promoted, so that the champion alias is there to check."""
    params["evaluate"].pop("min_accuracy", None)
    params["evaluate"]["gate"].update(min=0.0, max={})


def _check_runs(client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    (parent,) = [r for r in runs if r.data.tags.get("bigmodel_ops.role") == "pipeline"]
    for stage in STAGES:
        (run,) = by_name[stage]
        assert run.info.status == "FINISHED", (stage, run.info.status)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    trials = [r for r in runs if r.info.run_name.startswith("tune/trial-")]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    pretrain = by_name["pretrain"][0]
    history = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert len(history) >= 2 and all(m.value > 0 for m in history)
    evaluate = by_name["evaluate"][0].data.metrics
    assert 0.0 <= evaluate["test_acc"] <= 1.0
    assert parent.data.metrics["evaluate.test_acc"] == evaluate["test_acc"]


def _check_artifacts(client: MlflowClient, uri: str, root: Path, downloads: Path) -> None:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (finetune,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'finetune'")
    (logged,) = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{finetune.info.run_id}'"
    )
    with fluent_tracking_uri(uri):  # models:/ URIs resolve through MLflow's global tracking URI
        model_files = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{logged.model_id}", dst_path=str(downloads / "model")
            )
        )
    assert (model_files / "MLmodel").is_file() and list(model_files.rglob("model.safetensors"))
    (evaluate,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
    (downloads / "evaluate").mkdir()
    local = Path(client.download_artifacts(evaluate.info.run_id, "", str(downloads / "evaluate")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files, "no evaluate artifacts came back through the server"
    # Stored under the project's artifact root (params tracking.artifact_location), served over HTTP.
    stored = [p for p in (root / "mlartifacts").rglob("*") if p.is_file()]
    assert stored and {p.name for p in files} <= {p.name for p in stored}
    metrics = json.loads((root / "outputs" / "metrics" / "evaluate.json").read_text())
    assert metrics["test_acc"] == pytest.approx(
        client.get_run(evaluate.info.run_id).data.metrics["test_acc"], abs=1e-9
    )


def _check_registry(client: MlflowClient) -> None:
    (model,) = client.search_registered_models("name = 'bigmodel-ops-demo-classifier'")
    versions = client.search_model_versions("name = 'bigmodel-ops-demo-classifier'")
    assert len(versions) == 1 and versions[0].status == "READY"
    version = client.get_model_version_by_alias(model.name, "champion")
    assert version.version == versions[0].version
    assert client.get_run(version.run_id).info.status == "FINISHED"
    assert {"champion", "challenger"} <= set(client.get_registered_model(model.name).aliases)
    assert version.tags["promoted"] == "true" and version.tags["promotion_reason"]
    base = client.get_model_version_by_alias("bigmodel-ops-demo-base", "latest-pretrain")
    assert client.get_run(base.run_id).info.run_name == "pretrain"


def test_clients_honour_mlflow_tracking_uri_and_default_retries_and_timeouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With no MLFLOW_HTTP_* set, a stage talking HTTP gets tracking.http_max_retries and
    http_timeout_s for its lifetime (MLflow's own defaults, minutes of retries, otherwise);
    values the user sets win; a local store gets none; MLFLOW_TRACKING_URI wins over params."""
    from bigmodel_ops.tracking.runs import _stage_scope, tracking_uri
    from tests.helpers_tracking import make_params

    for key in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(key, raising=False)
    params = make_params(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri(params.tracking) == "http://127.0.0.1:9"
    with _stage_scope(params.tracking, "pretrain"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(params.tracking.http_max_retries) == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(params.tracking.http_timeout_s) == "20"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")
    with _stage_scope(params.tracking, "pretrain"):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'local.db'}")
    with _stage_scope(params.tracking, "pretrain"):
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_stage_against_a_dead_server_with_default_retries_goes_offline_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The defaults in action: nothing listens at the tracking URI; the stage's run opens
    offline (spooled) within tens of seconds, not MLflow's default minutes of retries."""
    import time

    from tests.helpers_tracking import clear_run_env, free_port, make_params, tracked_run

    clear_run_env(monkeypatch)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    params = make_params(tmp_path)
    start = time.monotonic()
    with tracked_run(params, stage="pretrain") as run:
        run.log_metrics({"loss": 1.0}, step=1)
        opened = time.monotonic() - start
    assert run.offline
    assert opened < 60, opened
    assert list((tmp_path / "spool").rglob("*")), "nothing was spooled for replay"
