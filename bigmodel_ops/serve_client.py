"""Run ``mlflow models serve`` and talk to it: start (bounded wait), invoke, time, stop.

Used by tests/test_serving.py and benchmarks/serve_latency.py. :func:`scoring_server` starts
``python -m mlflow models serve -m URI --env-manager local`` on 127.0.0.1 and a free port in its
own process group, waits (bounded) until ``/ping`` answers, yields the base URL and always stops
the whole group (SIGTERM, then SIGKILL). Standard library only (urllib), besides MLflow itself in
the server process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The scoring server did not come up (its log tail is in the message)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local URL
        return int(response.status)


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextlib.contextmanager
def scoring_server(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 180.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Serve ``model_uri`` with ``mlflow models serve --env-manager local``; yields the base URL.

    ``env`` is the server's environment (default: this process's, e.g. MLFLOW_TRACKING_URI for a
    ``models:/`` URI). ServerError when the server exits or does not answer ``/ping`` within
    ``startup_timeout_s``. The server's process group is stopped on exit, whatever happened.
    """
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        "1",
    ]
    owned_log = log_path is None
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="mlflow-serve-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own process group: uvicorn's workers stop with it
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerError(f"mlflow models serve exited with {process.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _get(f"{url}/ping", timeout=2.0) == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerError(
                    f"mlflow models serve did not answer {url}/ping within {startup_timeout_s:.0f} s:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)
        if owned_log:
            with contextlib.suppress(OSError):
                log_path.unlink()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def invoke(url: str, payload: Any, *, timeout: float = 60.0) -> tuple[int, Any]:
    """POST ``payload`` (JSON-encoded unless bytes/str) to ``<url>/invocations``: (status, body).

    The body is parsed JSON when it is JSON, else text. HTTP errors are returned, not raised.
    """
    data = (
        payload
        if isinstance(payload, bytes)
        else (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
    )
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local URL
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as error:
        status, body = int(error.code), error.read()
    text = body.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def round_trip_latency(
    url: str, texts: Sequence[str], *, batch_size: int, repeats: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Median and p95 wall time (ms) of ``/invocations`` round trips of ``batch_size`` texts."""
    batch = [texts[i % len(texts)] for i in range(batch_size)]
    payload = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in batch]}}
    times = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        status, body = invoke(url, payload)
        elapsed = (time.perf_counter() - started) * 1000.0
        if status != 200:
            raise ServerError(f"/invocations answered {status}: {body}")
        if index >= warmup:
            times.append(elapsed)
    times.sort()
    p95 = times[min(len(times) - 1, max(0, round(0.95 * len(times)) - 1))]
    return {
        f"serve_b{batch_size}_median_ms": statistics.median(times),
        f"serve_b{batch_size}_p95_ms": p95,
    }
