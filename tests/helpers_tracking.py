"""Shared helpers of the tracking tests: tiny git/DVC projects, params, a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from bigmodel_ops.config import Params, parse_params
from bigmodel_ops.tracking import StageRun, stage_run

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def clear_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rank / DVC / run-id variables of the calling environment may leak into a test."""
    for name in (
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "SLURM_PROCID",
        "DVC_STAGE",
        "DVC_ROOT",
        "BIGMODEL_OPS_RUN_ID",
    ):
        monkeypatch.delenv(name, raising=False)


def raw_params(tmp_path: Path, **tracking: object) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["project"]["name"] = "trk-test"
    raw["tracking"] = {
        "uri": "sqlite:///unused.db",
        "artifact_location": str(tmp_path / "artifacts"),
        "spool_dir": str(tmp_path / "spool"),
        "flush_interval_s": 0.2,
        "retry_interval_s": 0.5,
        "system_metrics": True,
        **tracking,
    }
    return raw


def make_params(tmp_path: Path, **tracking: object) -> Params:
    return parse_params(raw_params(tmp_path, **tracking))


def tracked_run(params: Params, *, stage: str, **kwargs: Any) -> contextlib.AbstractContextManager[StageRun]:
    """``stage_run`` with the tracking settings, experiment and params of ``params``."""
    return stage_run(
        params.tracking,
        experiment=params.experiment_name,
        stage=stage,
        params=params.model_dump(mode="json"),
        **kwargs,
    )


def make_project(root: Path, raw: dict | None = None, *, dvc: bool = False) -> Path:
    """A git repo holding our dvc.yaml and a params.yaml (optionally `dvc init`-ed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw or raw_params(root)))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    if dvc:
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("/.bigmodel_ops\n/artifacts\n/spool\n*.db\n")
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=root, check=True)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, *, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def start_server(port: int, db: Path, artifacts: Path, log: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port over a sqlite file, in its own process group."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey worker pool
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # the uvicorn worker is stopped with the group
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process=process)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """Kill the server and its worker abruptly, like a crash (and instantly, unlike SIGTERM)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
