"""Tracking under load: 8 processes logging metrics at once to one MLflow store, nothing lost.

Each writer process owns one run and sends ``MlflowClient.log_batch`` calls of ``--batch`` metrics
(5 keys x batch/5 steps) as fast as the store takes them, for ``--seconds`` or ``--max-batches``,
whichever comes first (bounded in time and in count). Every call is timed; a call that raises
counts as failed, not as sent. Afterwards the parent reads every key's full history back and
counts what was stored: ``sent`` must equal ``stored``.

Backends, each on loopback only, one after the other, in one run of this script:

- ``server_sqlite``: ``mlflow server`` over a sqlite file (what ``bigmodel-ops ui`` starts by default);
- ``server_postgresql``: ``mlflow server`` over a fresh PostgreSQL database, created for the run and
  dropped after (URL from $BIGMODEL_OPS_TEST_POSTGRES_URL, default
  postgresql://postgres@127.0.0.1:5432/postgres; skipped with a reason where none answers);
- ``embedded_sqlite``: no server, each writer opens the sqlite file itself (MLflow's default
  ``sqlite:///mlflow.db`` with several processes).

    python benchmarks/tracking_soak.py [--quick] [--seconds 60] [--writers 8] [--backends ...]

The last line printed is one JSON object: ``sent``, ``stored``, ``metrics_per_s`` (of the
PostgreSQL server where it ran, else the sqlite server), and per backend ``<backend>`` with
sent, stored, failed, metrics_per_s, batch_p50_ms, batch_p99_ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

POSTGRES_ENV = "BIGMODEL_OPS_TEST_POSTGRES_URL"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
KEYS = 5


def _writer(
    uri: str, experiment_id: str, seconds: float, max_batches: int, batch: int, out: mp.Queue
) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    steps = max(1, batch // KEYS)
    sent = failed = 0
    latencies: list[float] = []
    began = time.time()
    deadline = time.monotonic() + seconds
    step = 0
    while time.monotonic() < deadline and len(latencies) + failed < max_batches:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key=f"m{k}", value=float(step + s) * (k + 1), timestamp=now, step=step + s)
            for s in range(steps)
            for k in range(KEYS)
        ]
        start = time.perf_counter()
        try:
            client.log_batch(run_id, metrics=metrics)
        except Exception:  # noqa: BLE001 - a refused batch is counted, not fatal
            failed += 1
        else:
            latencies.append(time.perf_counter() - start)
            sent += len(metrics)
            step += steps
    ended = time.time()
    client.set_terminated(run_id)
    out.put(
        {"run_id": run_id, "sent": sent, "failed": failed, "latencies": latencies, "window": (began, ended)}
    )


def _stored(uri: str, run_ids: list[str]) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return sum(len(client.get_metric_history(run_id, f"m{k}")) for run_id in run_ids for k in range(KEYS))


def soak(uri: str, *, writers: int, seconds: float, max_batches: int, batch: int) -> dict:
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(uri).create_experiment(f"soak-{uuid.uuid4().hex[:8]}")
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(uri, experiment_id, seconds, max_batches, batch, out))
        for _ in range(writers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    # From the first writer's first call to the last writer's last one (process start-up excluded).
    elapsed = max(r["window"][1] for r in results) - min(r["window"][0] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    sent = sum(r["sent"] for r in results)
    stored = _stored(uri, [r["run_id"] for r in results])
    return {
        "sent": sent,
        "stored": stored,
        "failed_batches": sum(r["failed"] for r in results),
        "metrics_per_s": round(sent / elapsed, 1),
        "batch_p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
        "batch_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2)
        if latencies
        else None,
        "seconds": round(elapsed, 1),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path, *, workers: int) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    command += ["--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers)]
    process = subprocess.Popen(
        command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(url) from None
                time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database (SQLAlchemy URL with the psycopg 3 driver), dropped afterwards."""
    import psycopg

    admin = os.environ.get(POSTGRES_ENV, POSTGRES_DEFAULT)
    name = f"bmo_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{admin.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s per backend instead of 60")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50, help="metrics per log_batch call")
    parser.add_argument("--max-batches", type=int, default=100_000, help="per writer")
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn workers of each server")
    parser.add_argument(
        "--backends", default="server_sqlite,server_postgresql,embedded_sqlite", help="comma-separated"
    )
    args = parser.parse_args()
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    report: dict = {
        "writers": args.writers,
        "seconds_per_backend": seconds,
        "batch": args.batch,
        "server_workers": args.server_workers,
    }
    with tempfile.TemporaryDirectory(prefix="tracking-soak-") as tmp:
        tmp_path = Path(tmp)
        for backend in args.backends.split(","):
            kwargs = dict(
                writers=args.writers, seconds=seconds, max_batches=args.max_batches, batch=args.batch
            )
            folder = tmp_path / backend
            folder.mkdir()
            db = f"sqlite:///{folder / 'mlflow.db'}"
            if backend == "embedded_sqlite":
                from mlflow.tracking import MlflowClient

                MlflowClient(db).search_experiments()  # migrate once, before the writers race
                report[backend] = soak(db, **kwargs)
            elif backend == "server_sqlite":
                with mlflow_server(
                    db, folder / "artifacts", folder / "server.log", workers=args.server_workers
                ) as url:
                    report[backend] = soak(url, **kwargs)
            elif backend == "server_postgresql":
                try:
                    database = postgres_database()
                    store = database.__enter__()
                except Exception as error:  # noqa: BLE001 - report why, run the others
                    report[backend] = {"skipped": f"no PostgreSQL: {str(error).strip()[:200]}"}
                    continue
                try:
                    with mlflow_server(
                        store, folder / "artifacts", folder / "server.log", workers=args.server_workers
                    ) as url:
                        report[backend] = soak(url, **kwargs)
                finally:
                    database.__exit__(None, None, None)
            else:
                parser.error(f"--backends: unknown backend {backend!r}")
            print(json.dumps({backend: report[backend]}), flush=True)
    headline = next(
        (
            report[b]
            for b in ("server_postgresql", "server_sqlite", "embedded_sqlite")
            if "sent" in report.get(b, {})
        ),
        {},
    )
    report.update(
        sent=headline.get("sent"), stored=headline.get("stored"), metrics_per_s=headline.get("metrics_per_s")
    )
    report["nothing_lost"] = all(
        v["sent"] == v["stored"] for v in report.values() if isinstance(v, dict) and "sent" in v
    )
    print(json.dumps(report))
    return 0 if report["nothing_lost"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
