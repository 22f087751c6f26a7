"""Shared fixtures: every test gets its own real sqlite MLflow store.

A fresh sqlite store runs its Alembic migrations on first use (seconds), so one
migrated store is made per session and copied for each test.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# Launcher variables that would make a process believe it is one rank of a bigger job, and the
# run id a parent stage hands its children: none may leak from the calling environment.
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "BIGMODEL_OPS_RUN_ID")


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    """Loading an MLflow pyfunc model in this process puts the model's ``code/`` folder first on
    ``sys.path``, and processes started with ``spawn`` inherit ``sys.path``: a later test's worker
    processes would import ``bigmodel_ops`` from that copy. Each test ends with the path it began with."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, not a rank of a launcher's job."""
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def one_thread(no_rank_env: None):
    """One process on one torch thread: tiny models train faster (and more predictably on a busy
    machine) single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_store: Path) -> Iterator[str]:
    """A real, empty, migrated sqlite MLflow store for this test; MLFLOW_TRACKING_URI points at it.
    A test that calls ``mlflow.set_tracking_uri`` leaves MLflow's global URI set, and it wins over
    the environment: it is cleared after each test so the next one reaches its own store."""
    db = tmp_path / "mlflow-store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_migrated_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield uri
    from mlflow.tracking._tracking_service import utils

    utils._tracking_uri = None


@pytest.fixture
def repo_params() -> dict[str, Any]:
    """The repo's params.yaml as a fresh, mutable dict."""
    return copy.deepcopy(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))


def write_params(directory: Path, params: dict[str, Any], name: str = "params.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


POSTGRES_ENV = "BIGMODEL_OPS_TEST_POSTGRES_URL"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Any:
    """A fresh PostgreSQL database for this test (SQLAlchemy URL, psycopg 3 driver), dropped after.

    The server comes from $BIGMODEL_OPS_TEST_POSTGRES_URL (default: trust auth on 127.0.0.1:5432);
    the test skips, saying why, where none answers (.ci/run checks that CI's does).
    """
    import uuid

    psycopg = pytest.importorskip(
        "psycopg", reason="PostgreSQL tests need psycopg (pip install psycopg[binary])"
    )
    admin = os.environ.get(POSTGRES_ENV, POSTGRES_DEFAULT)
    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.skip(
            f"no PostgreSQL answers at ${POSTGRES_ENV} or {POSTGRES_DEFAULT}: {str(error).strip()[:200]}"
        )
    name = f"bmo_test_{uuid.uuid4().hex[:12]}"
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            base = admin.rsplit("/", 1)[0]
            yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
