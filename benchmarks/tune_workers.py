"""Trials per minute with 1 and 2 tune workers, and what storage plus tracking cost per trial.

Builds a temporary project from the repo's params.yaml (the bundled IMDb reviews) with the
``tiny`` model preset, runs the prepare, tokenize and pretrain stages once through the library,
then runs the ``tune`` stage (no pruner, so every trial trains its whole budget) twice on the same
pretrained model with the same trial count: ``workers=1`` and ``workers=2``, each on a fresh
journal study, with MLflow on a temporary sqlite store.

- ``trials_per_min_1`` / ``trials_per_min_2``: trials over the stage's wall time (what a user
  waits for, worker start-up included);
- ``overhead_pct``: the Optuna storage and MLflow tracking work of one trial, replayed alone
  (the same operations a trial of the 2-worker study did: pop a queued trial, draw its params,
  its heartbeats, one report and one subset metric per report step, its user attributes, the
  tell; a nested MLflow run with its params, tags and cost metrics, through the worker-process
  path), over the shorter of the two runs' median trial wall times, in percent. The median of 5
  replays is used.

Prints both runs, then, last, one JSON line with those keys and the per-run details.

Usage::

    python benchmarks/tune_workers.py [--quick] [--n-trials 8] [--keep DIR]

``--quick``: 8 pretraining steps and 4 trials on a quarter of the train split (checks the code
path; the figures are only indicative). Without it, 60 pretraining steps and 8 trials of one epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks._project import log, project_dir  # noqa: E402


def build_params(args: argparse.Namespace, *, tracking_uri: str) -> dict[str, Any]:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    source = raw["prepare"]["source"]
    source["path"] = str((REPO_ROOT / source["path"]).resolve())
    if source.get("unlabeled_path"):
        source["unlabeled_path"] = str((REPO_ROOT / source["unlabeled_path"]).resolve())
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


def replay_overhead(study_trial: Any, *, root: Path, tracking_uri: str, repeats: int = 5) -> float:
    """Median seconds of one trial's storage + tracking operations, replayed on fresh stores of
    the same kinds (a journal file; the sqlite MLflow store through ClientRun)."""
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
            None, journal=root / f"replay-{k}.journal", heartbeat_interval=5, grace_period=30, max_retry=2
        )
        study = optuna.create_study(storage=storage, study_name="replay", direction="maximize")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    from bigmodel_ops.config import parse_params
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline import prepare, pretrain, tokenize, tune
    from bigmodel_ops.tuning.storage import open_storage

    started_all = time.perf_counter()
    with project_dir(args.keep, prefix="tune-workers-") as root:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        raw = build_params(args, tracking_uri=uri)
        params = parse_params(raw, source="params.yaml (benchmark overrides)")
        paths = ProjectPaths(root)
        log(
            f"tune-workers: tiny preset, {params.tune.n_trials} trials of {params.tune.max_epochs} epoch x "
            f"{params.tune.train_fraction:.0%} of train, no pruner, {os.cpu_count()} CPUs"
            f"{' [QUICK]' if args.quick else ''}"
        )
        if not (paths.pretrained_model / "model.safetensors").is_file():
            t0 = time.perf_counter()
            prepare.run(params, paths=paths, quiet=True)
            tokenize.run(params, paths=paths, quiet=True)
            pretrain.run(params, paths=paths, quiet=True)
            log(f"setup: {time.perf_counter() - t0:.0f} s")
        results: dict[str, dict[str, Any]] = {}
        last_study = None
        for workers in (1, 2):
            (paths.tune_dir / tune.JOURNAL_FILE).unlink(missing_ok=True)
            variant = parse_params(copy.deepcopy(raw))
            t0 = time.perf_counter()
            report = tune.run(variant, paths=paths, quiet=True, workers=workers)
            seconds = time.perf_counter() - t0
            storage = open_storage(
                None,
                journal=paths.tune_dir / tune.JOURNAL_FILE,
                heartbeat_interval=5,
                grace_period=30,
                max_retry=2,
            )
            last_study = optuna.load_study(study_name=tune.name_of_study(variant, paths), storage=storage)
            trials = last_study.get_trials()
            walls = [float(t.user_attrs["wall_seconds"]) for t in trials if "wall_seconds" in t.user_attrs]
            results[str(workers)] = {
                "stage_seconds": round(seconds, 1),
                "n_trials": report["n_trials"],
                "n_complete": report["n_complete"],
                "trials_per_min": round(report["n_trials"] / (seconds / 60.0), 2),
                "median_trial_seconds": round(statistics.median(walls), 2),
                "workers_that_ran_trials": _workers_used(uri, last_study.user_attrs["mlflow_run_id"]),
            }
            log(
                f"workers={workers}: {report['n_trials']} trials in {seconds:.1f} s "
                f"({results[str(workers)]['trials_per_min']:.2f} trials/min), median trial "
                f"{results[str(workers)]['median_trial_seconds']:.2f} s"
            )
        median_trial = min(
            trials,
            key=lambda t: abs(float(t.user_attrs["wall_seconds"]) - results["2"]["median_trial_seconds"]),
        )
        overhead_s = replay_overhead(median_trial, root=root, tracking_uri=uri)
        # Against the 1-worker median trial: the shorter one (two workers share the cores), so the
        # larger, conservative percentage.
        reference = min(results["1"]["median_trial_seconds"], results["2"]["median_trial_seconds"])
        overhead_pct = 100.0 * overhead_s / reference
        log(
            f"storage + tracking per trial: {overhead_s * 1000:.0f} ms replayed, {overhead_pct:.2f}% of a "
            f"{reference:.2f} s trial (target <= 2%)"
        )
    return {
        "benchmark": "tune_workers",
        "quick": bool(args.quick),
        "n_trials": args.n_trials,
        "cpus": os.cpu_count(),
        "trials_per_min_1": results["1"]["trials_per_min"],
        "trials_per_min_2": results["2"]["trials_per_min"],
        "overhead_pct": round(overhead_pct, 3),
        "overhead_ms_per_trial": round(overhead_s * 1000, 1),
        "runs": results,
        "seconds_total": round(time.perf_counter() - started_all, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the code path")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per run (default 8; quick 4)")
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
