"""Trials per minute with 1, 2, 4 ... tune workers, on the journal file and on PostgreSQL.

Builds a temporary project from the repo's params.yaml (the bundled IMDb reviews) with the
``tiny`` model preset, runs the prepare, tokenize and pretrain stages once through the library,
then runs the ``tune`` stage (no pruner, so every trial trains its whole budget) once per storage
and worker count on the same pretrained model with the same trial count, each on a fresh study:
the journal file (``outputs/tune/study.journal``, deleted before each run) and/or PostgreSQL (a
fresh database per run, created and dropped on the server of ``$BIGMODEL_OPS_TEST_POSTGRES_URL``,
default ``postgresql://postgres@127.0.0.1:5432/postgres``), with MLflow on a temporary sqlite store.

- ``<storage>_trials_per_min_<n>`` (e.g. ``journal_trials_per_min_4``,
  ``postgresql_trials_per_min_4``): trials over the stage's wall time with ``n`` workers (what a
  user waits for, worker start-up included); ``trials_per_min_<n>`` without prefix are the
  journal's (the keys of earlier versions);
- ``<storage>_overhead_ms_per_trial`` / ``<storage>_overhead_pct``: the Optuna storage and MLflow
  tracking work of one trial, replayed alone (the same operations a trial of the last run did:
  pop a queued trial, draw its params, its heartbeats, one report and one subset metric per report
  step, its user attributes, the tell; a nested MLflow run with its params, tags and cost metrics,
  through the worker-process path) on a fresh study of that storage, over the shortest median
  trial wall time of that storage's runs, in percent. The median of 5 replays is used.
  ``overhead_pct`` / ``overhead_ms_per_trial`` without prefix are the journal's.

Prints each run, then, last, one JSON line with those keys and the per-run details.

Usage::

    python benchmarks/tune_workers.py [--quick] [--n-trials 8] [--workers 1,2,4]
        [--storage journal,postgresql] [--keep DIR]

``--quick``: 8 pretraining steps and 4 trials on a quarter of the train split (checks the code
path; the figures are only indicative). Without it, 60 pretraining steps and 8 trials of one epoch.
More workers than cores oversubscribe the CPU (each worker gets cores // workers torch threads,
at least 1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks._project import log, project_dir, repo_params  # noqa: E402


def build_params(args: argparse.Namespace, *, tracking_uri: str) -> dict[str, Any]:
    raw = repo_params()
    raw["tracking"].update({"uri": tracking_uri, "system_metrics": False})
    raw["pretrain"]["register_model"] = False
    steps = 8 if args.quick else 60
    raw["profiles"][raw["profile"]].update(max_steps=steps, batch_size=8, model_preset="tiny")
    raw["model"]["block_size"] = 64
    raw["pretrain"].update(
        warmup_steps=2, val_every_n_steps=steps // 2, val_batches=2, checkpoint_every_n_steps=steps // 2
    )
    raw["finetune"]["max_length"] = 64
    raw["tune"].update(
        n_trials=args.n_trials,
        pruner="none",
        max_epochs=1,
        train_fraction=0.25 if args.quick else 1.0,
        report_every_n_steps=10,
    )
    raw["tune"]["search_space"]["batch_size"] = {"type": "categorical", "choices": [32]}
    return raw


def replay_overhead(
    study_trial: Any, *, root: Path, tracking_uri: str, storage_url: str | None = None, repeats: int = 5
) -> float:
    """Median seconds of one trial's storage + tracking operations, replayed on fresh studies of
    the same kind (a new journal file, or a new study in the ``storage_url`` database; the sqlite
    MLflow store through ClientRun)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from bigmodel_ops.tuning.storage import open_storage
    from bigmodel_ops.tuning.workers import ClientRun, fill_queue

    reports = sorted(study_trial.intermediate_values.items())
    heartbeats = max(1, int(float(study_trial.user_attrs.get("wall_seconds", 1.0)) // 5) + 1)
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"replay-{time.time_ns()}")
    parent = ClientRun(client, client.create_run(experiment, run_name="tune").info.run_id)
    times = []
    for k in range(repeats):
        storage = open_storage(
            storage_url,
            journal=root / f"replay-{k}.journal",
            heartbeat_interval=5,
            grace_period=30,
            max_retry=2,
        )
        study = optuna.create_study(storage=storage, study_name=f"replay-{k}", direction="maximize")
        fill_queue(study, n_trials=1)
        started = time.perf_counter()
        study._thread_local.cached_all_trials = None
        trial = optuna.Trial(study, study._pop_waiting_trial_id())
        for name, dist in study_trial.distributions.items():
            trial._suggest(name, dist)
        for _ in range(heartbeats):
            storage.record_heartbeat(trial._trial_id)
        with parent.child_run(f"trial-{k}", tags={"optuna.trial": k}) as child:
            trial.set_user_attr("mlflow_run_id", child.run_id)
            child.log_params(study_trial.params)
            for step, value in reports:
                trial.report(value, step=step)
                child.log_metrics({"tune/val_acc_subset": value, "tune/val_loss_subset": 0.7}, step=step)
            for key in ("optimizer_steps", "budget_steps", "wall_seconds"):
                trial.set_user_attr(key, study_trial.user_attrs.get(key, 0))
            child.log_metrics(
                {"tune/optimizer_steps": 1.0, "tune/budget_steps": 1.0, "tune/wall_seconds": 1.0}, step=1
            )
            child.set_tags({"optuna.state": "COMPLETE", "optuna.value": 0.5})
        study.tell(trial, 0.5)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _workers_used(tracking_uri: str, tune_run_id: str) -> list[int]:
    """The ``optuna.worker`` tags of the trial runs under one ``tune`` run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(tune_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{tune_run_id}'", max_results=500)
    return sorted({int(r.data.tags["optuna.worker"]) for r in runs if "optuna.worker" in r.data.tags})


POSTGRES_ENV = "BIGMODEL_OPS_TEST_POSTGRES_URL"  # the server of tests/conftest.py's postgres_url
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
STORAGES = ("journal", "postgresql")


def _admin_connection() -> tuple[str, Any]:
    """(the admin URL, an autocommit connection to it); SystemExit saying why when none answers."""
    try:
        import psycopg
    except ImportError:
        raise SystemExit(
            "tune-workers: --storage postgresql needs psycopg (pip install psycopg[binary])"
        ) from None
    admin = os.environ.get(POSTGRES_ENV, POSTGRES_DEFAULT)
    try:
        return admin, psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        raise SystemExit(
            f"tune-workers: no PostgreSQL answers at ${POSTGRES_ENV} or {POSTGRES_DEFAULT}: "
            f"{str(error).strip()[:200]}"
        ) from None


@contextlib.contextmanager
def fresh_database(label: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``$BIGMODEL_OPS_TEST_POSTGRES_URL``
    (SQLAlchemy URL, psycopg 3 driver), dropped afterwards."""
    admin, connection = _admin_connection()
    name = f"bmo_bench_{label}_{uuid.uuid4().hex[:8]}"
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{base}/{name}"
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _study_storage(storage_url: str | None, paths: Any) -> Any:
    from bigmodel_ops.tuning.storage import open_storage

    return open_storage(
        storage_url,
        journal=paths.tune_journal,
        heartbeat_interval=5,
        grace_period=30,
        max_retry=2,
    )


def tune_once(
    raw: dict[str, Any], *, paths: Any, workers: int, storage_url: str | None, tracking_uri: str
) -> tuple[dict[str, Any], list[Any]]:
    """One run of the tune stage on a fresh study: (its figures, the study's trials)."""
    import optuna

    from bigmodel_ops.config import parse_params
    from bigmodel_ops.pipeline import tune

    paths.tune_journal.unlink(missing_ok=True)
    variant = parse_params(copy.deepcopy(raw))
    t0 = time.perf_counter()
    report = tune.run(variant, paths=paths, quiet=True, workers=workers, storage=storage_url)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(
        study_name=tune.name_of_study(variant, paths), storage=_study_storage(storage_url, paths)
    )
    trials = study.get_trials()
    walls = [float(t.user_attrs["wall_seconds"]) for t in trials if "wall_seconds" in t.user_attrs]
    figures = {
        "stage_seconds": round(seconds, 1),
        "n_trials": report["n_trials"],
        "n_complete": report["n_complete"],
        "trials_per_min": round(report["n_trials"] / (seconds / 60.0), 2),
        "median_trial_seconds": round(statistics.median(walls), 2),
        "workers_that_ran_trials": _workers_used(tracking_uri, study.user_attrs["mlflow_run_id"]),
    }
    return figures, trials


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bigmodel_ops.config import parse_params
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline import prepare, pretrain, tokenize

    if "postgresql" in args.storage:  # fail before the setup, not after the journal runs
        _admin_connection()[1].close()
    started_all = time.perf_counter()
    summary: dict[str, Any] = {
        "benchmark": "tune_workers",
        "quick": bool(args.quick),
        "n_trials": args.n_trials,
        "workers": args.workers,
        "storages": args.storage,
        "cpus": os.cpu_count(),
    }
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    with project_dir(args.keep, prefix="tune-workers-") as root:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        raw = build_params(args, tracking_uri=uri)
        params = parse_params(raw, source="params.yaml (benchmark overrides)")
        paths = ProjectPaths(root)
        log(
            f"tune-workers: tiny preset, {params.tune.n_trials} trials of {params.tune.max_epochs} epoch x "
            f"{params.tune.train_fraction:.0%} of train, no pruner, workers {args.workers}, storages "
            f"{args.storage}, {os.cpu_count()} CPUs{' [QUICK]' if args.quick else ''}"
        )
        if not (paths.pretrained_model / "model.safetensors").is_file():
            t0 = time.perf_counter()
            prepare.run(params, paths=paths, quiet=True)
            tokenize.run(params, paths=paths, quiet=True)
            pretrain.run(params, paths=paths, quiet=True)
            log(f"setup: {time.perf_counter() - t0:.0f} s")
        for kind in args.storage:
            results: dict[str, dict[str, Any]] = {}
            trials: list[Any] = []
            for workers in args.workers:
                with contextlib.ExitStack() as stack:
                    url = stack.enter_context(fresh_database(f"w{workers}")) if kind == "postgresql" else None
                    results[str(workers)], trials = tune_once(
                        raw, paths=paths, workers=workers, storage_url=url, tracking_uri=uri
                    )
                figures = results[str(workers)]
                summary[f"{kind}_trials_per_min_{workers}"] = figures["trials_per_min"]
                log(
                    f"{kind}, workers={workers}: {figures['n_trials']} trials in {figures['stage_seconds']:.1f} s "
                    f"({figures['trials_per_min']:.2f} trials/min), median trial "
                    f"{figures['median_trial_seconds']:.2f} s"
                )
            # The replay copies the median trial of the last run (the most workers).
            last = results[str(args.workers[-1])]["median_trial_seconds"]
            median_trial = min(trials, key=lambda t: abs(float(t.user_attrs["wall_seconds"]) - last))
            with contextlib.ExitStack() as stack:
                url = stack.enter_context(fresh_database("replay")) if kind == "postgresql" else None
                overhead_s = replay_overhead(median_trial, root=root, tracking_uri=uri, storage_url=url)
            # Against the shortest median trial (several workers share the cores, so trials differ):
            # the larger, conservative percentage.
            reference = min(r["median_trial_seconds"] for r in results.values())
            overhead_pct = 100.0 * overhead_s / reference
            summary[f"{kind}_overhead_ms_per_trial"] = round(overhead_s * 1000, 1)
            summary[f"{kind}_overhead_pct"] = round(overhead_pct, 3)
            runs[kind] = results
            log(
                f"{kind}: storage + tracking per trial: {overhead_s * 1000:.0f} ms replayed, "
                f"{overhead_pct:.2f}% of a {reference:.2f} s trial (target <= 2%)"
            )
    if "journal" in runs:  # the keys of earlier versions
        for workers in args.workers:
            summary[f"trials_per_min_{workers}"] = summary[f"journal_trials_per_min_{workers}"]
        summary["overhead_pct"] = summary["journal_overhead_pct"]
        summary["overhead_ms_per_trial"] = summary["journal_overhead_ms_per_trial"]
    summary["runs"] = runs
    summary["seconds_total"] = round(time.perf_counter() - started_all, 1)
    return summary


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be at least 1, got {text!r}")
    return values


def _storage_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(values) - set(STORAGES))
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"storages are {', '.join(STORAGES)} (comma-separated), got {text!r}"
        )
    return list(dict.fromkeys(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the code path")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per run (default 8; quick 4)")
    parser.add_argument(
        "--workers",
        type=_int_list,
        default=[1, 2],
        help="worker counts to run, comma-separated (default 1,2)",
    )
    parser.add_argument(
        "--storage",
        type=_storage_list,
        default=["journal"],
        help="journal and/or postgresql, comma-separated (default journal); PostgreSQL: the server of "
        f"${POSTGRES_ENV} (default {POSTGRES_DEFAULT}), a fresh database per run",
    )
    parser.add_argument("--keep", type=Path, default=None, help="project folder to keep and reuse")
    args = parser.parse_args(argv)
    if args.n_trials is None:
        args.n_trials = 4 if args.quick else 8
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    summary = run(args)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
