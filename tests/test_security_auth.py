"""Servers we start listen on 127.0.0.1 by default, and `bigmodel-ops ui --auth` puts MLflow's
basic-auth app in front of the store: no credentials (or wrong ones) get 401, the admin account
from the environment gets 200, and our tracking layer logs through it with the credentials MLflow
clients read from the environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).

All real: `bigmodel-ops ui` in its own process group, `mlflow server --app-name basic-auth` on a
free loopback port, a real sqlite store.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.ui import server_command
from tests.helpers_tracking import free_port, raw_params, tracked_run

pytestmark = [pytest.mark.fault, pytest.mark.slow]

_SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _wait_listening(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            _status(url)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def _ui_env(**extra: str) -> dict[str, str]:
    drop = (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_AUTH_CONFIG_PATH",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLFLOW_AUTH_ADMIN")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path: Path, _migrated_store: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    raw = raw_params(root)
    raw["tracking"]["uri"] = "sqlite:///mlflow.db"
    raw["tracking"]["artifact_location"] = "mlartifacts"
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(raw))
    shutil.copy(_migrated_store, root / "mlflow.db")
    return root


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_every_server_command_binds_to_loopback_by_default():
    from bigmodel_ops.cli import _stages, build_parser

    parser = build_parser(_stages())
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    hosts = {}
    for name, command in sub.choices.items():
        for action in command._actions:
            if "--host" in action.option_strings:
                hosts[name] = action.default
    assert "ui" in hosts, hosts
    assert all(host == "127.0.0.1" for host in hosts.values()), hosts
    tracking = parse_params(raw_params(Path("/tmp"))).tracking
    command = server_command(tracking, host=hosts["ui"], port=5000, uri="sqlite:///x.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    from bigmodel_ops import serve_client

    assert serve_client.free_port.__defaults__ == ("127.0.0.1",)


def test_ui_auth_without_credentials_in_the_environment_refuses_to_start(project: Path):
    result = subprocess.run(
        [sys.executable, "-m", "bigmodel_ops.cli", "ui", "--auth", "--port", str(free_port())],
        cwd=project,
        env=_ui_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ui --auth: no admin credentials in the environment" in result.stderr
    assert "never read from params.yaml" in result.stderr


@pytest.fixture
def auth_server(project: Path) -> Iterator[dict]:
    user, password = "ops-admin", secrets.token_urlsafe(16)
    port = free_port()
    log = (project.parent / "ui.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bigmodel_ops.cli", "ui", "--auth", "--port", str(port)],
        cwd=project,
        env=_ui_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_listening(f"http://127.0.0.1:{port}/health", process)
        yield {"base": f"http://127.0.0.1:{port}", "user": user, "password": password, "process": process}
    finally:
        _stop(process)
        log.close()


def test_basic_auth_server_answers_401_without_and_200_with_credentials(auth_server: dict, project: Path):
    base, user, password = auth_server["base"], auth_server["user"], auth_server["password"]
    assert _status(base + _SEARCH) == 401
    assert _status(base + _SEARCH, (user, "wrong-password")) == 401
    assert _status(base + _SEARCH, ("nobody", password)) == 401
    assert _status(base + _SEARCH, (user, password)) == 200
    # Bound to loopback only, and its user database is inside the project.
    listening = {
        conn.laddr.ip
        for proc in [
            psutil.Process(auth_server["process"].pid),
            *psutil.Process(auth_server["process"].pid).children(recursive=True),
        ]
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == int(base.rsplit(":", 1)[1])
    }
    assert listening == {"127.0.0.1"}, listening
    assert (project / ".bigmodel_ops" / "auth" / "basic_auth.db").is_file()
    assert password not in (project / ".bigmodel_ops" / "auth" / "basic_auth.ini").read_text()


def test_our_tracking_logs_through_basic_auth_with_credentials_from_the_environment(
    auth_server: dict, project: Path, monkeypatch: pytest.MonkeyPatch
):
    base = auth_server["base"]
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["password"])
    params = parse_params(raw_params(project))
    with tracked_run(params, stage="pretrain") as run:
        for step in range(5):
            run.log_metrics({"train/loss": 2.0 - step * 0.1}, step=step)
        run.flush()
        run_id = run.run_id
    client = MlflowClient(base)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    # The same client without the password is turned away.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(base).get_run(run_id)
