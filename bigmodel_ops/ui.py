"""`bigmodel-ops ui`: the MLflow UI on the project's tracking store.

Starts ``mlflow server`` with the project's backend store (the tracking URI; an http URI means a
server already exists, so we only print where to look), serving artifacts from the project's
artifact location, bound to 127.0.0.1 by default. It prints the URL of the experiment's
training-runs table (``/#/experiments/<id>/runs``; the 3.x UI otherwise opens a GenAI overview)
and blocks until the server exits or Ctrl-C/SIGTERM, which stop the server's whole process group.
Returns the server's exit code (0 after Ctrl-C). MLflow's GenAI job runner is off unless
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise (it starts a pool of worker processes that
browsing training runs does not need).

``auth=True`` (``bigmodel-ops ui --auth``) starts MLflow's basic-auth app (``mlflow server
--app-name basic-auth``): every request needs HTTP basic credentials (401 without). The admin
account is created on first start from the environment only, never from params or the command
line: ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``, or else the client variables
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (which our stages and MLflow clients
send to an ``http://`` tracking URI). The user database is ``.bigmodel_ops/auth/basic_auth.db``
in the project (``MLFLOW_AUTH_CONFIG_PATH`` points at another configuration), and the Flask
secret is ``MLFLOW_FLASK_SERVER_SECRET_KEY`` or a random one per start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from bigmodel_ops.config import TrackingParams
from bigmodel_ops.errors import ConfigError


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The experiment's runs table in the saved view that shows the pipelines' headline metrics."""
    from bigmodel_ops.tracking.frontpage import table_url

    return table_url(base, experiment_id) if experiment_id else f"{base}/"


AUTH_DIR = Path(".bigmodel_ops") / "auth"


def server_command(
    tracking: TrackingParams, *, host: str, port: int, uri: str, auth: bool = False
) -> list[str]:
    location = tracking.artifact_location
    artifacts = location if "://" in location else Path(location).resolve().as_uri()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        *(["--app-name", "basic-auth"] if auth else []),
    ]


def auth_environment(environ: dict[str, str], *, auth_dir: Path = AUTH_DIR) -> dict[str, str]:
    """The server's environment for the basic-auth app: admin credentials from the environment
    only (ConfigError when there are none), its own user database and a Flask secret."""
    env = dict(environ)
    username = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or env.get("MLFLOW_TRACKING_USERNAME")
    password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or env.get("MLFLOW_TRACKING_PASSWORD")
    if not username or not password:
        raise ConfigError(
            "ui --auth: no admin credentials in the environment; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD). "
            "Credentials are never read from params.yaml or the command line."
        )
    env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"] = username, password
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    if not env.get("MLFLOW_AUTH_CONFIG_PATH"):
        folder = auth_dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    return env


def run_ui(
    tracking: TrackingParams,
    *,
    experiment: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    auth: bool = False,
) -> int:
    """Serve the MLflow UI for the tracking store and experiment; see the module docstring."""
    from mlflow.tracking import MlflowClient

    from bigmodel_ops.tracking.runs import tracking_uri

    uri = tracking_uri(tracking)
    if uri.startswith(("http://", "https://")):
        experiment_id = _experiment_id(MlflowClient(uri), experiment)
        print(f"tracking server already at {uri}: open {experiment_url(uri.rstrip('/'), experiment_id)}")
        return 0
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port (1-65535)")
    env = auth_environment(dict(os.environ)) if auth else os.environ.copy()
    experiment_id = _experiment_id(MlflowClient(uri), experiment)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if experiment_id is None:
        print(f"no experiment {experiment!r} yet in {uri}; run a stage first", flush=True)
    print(f"MLflow UI for {experiment!r}: {experiment_url(base, experiment_id)}", flush=True)
    # The GenAI job runner (a pool of huey workers) is not needed to browse training runs.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Own process group: `mlflow server` forks uvicorn workers that must end with it.
    process = subprocess.Popen(
        server_command(tracking, host=host, port=port, uri=uri, auth=auth), env=env, start_new_session=True
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(process)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; workers of the group may still be shutting down.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return


def _experiment_id(client: object, name: str) -> str | None:
    try:
        experiment = client.get_experiment_by_name(name)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an empty or missing store still gets a UI
        return None
    return experiment.experiment_id if experiment is not None else None
