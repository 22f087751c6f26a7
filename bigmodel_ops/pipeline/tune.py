"""Search fine-tuning hyperparameters with Optuna (pruned trials, nested MLflow runs, workers).

The study lives in ``tune.storage`` / ``--storage`` (an SQLAlchemy URL: workers on many
machines) or, by default, in the journal file ``outputs/tune/study.journal`` (persisted by DVC,
so an interrupted ``dvc repro`` continues the study). The study runs exactly ``tune.n_trials``
COMPLETE or PRUNED trials: a run queues the missing ones and ``tune.workers`` / ``--workers``
processes run the queue (:mod:`bigmodel_ops.tuning.workers`). With ``tune.baseline_trial`` the
first trial of a new study runs the ``finetune`` settings themselves, so the best trial is never
worse than them on the study's metric (``baseline_value`` in the report). Every running trial heartbeats; a
trial whose process died (a SIGKILL, a lost machine) is failed by the next worker that sees it
silent for ``tune.grace_period_s`` and retried with the same parameters; a live worker's trial is
never touched. FAILED trials hold no slot: the next run replaces them.

Before any trial: the inputs (splits, tokenizer vocabulary against the backbone, every label
present in the training split), the models a trial can draw (LoRA targets, pooling), the storage
(reachable) and the study (same direction) are checked; each failure is one error naming the
setting or file, and leaves no trial behind.

MLflow: the stage run ``tune`` gets one nested run per trial, ``tune/trial-<number>``, with the
trial's params, its subset reports (``tune/val_acc_subset``, ``tune/val_loss_subset``) on the
optimizer-step axis (with ``tune.report_every_n_examples``, which keys the Optuna reports by
training examples, also ``tune/examples_seen``), its train/val metrics, its cost
(``tune/optimizer_steps``, ``tune/budget_steps``, ``tune/wall_seconds``) and tags
``optuna.state`` / ``optuna.reason`` / ``optuna.trial`` / ``optuna.worker`` (and
``tune.baseline`` on the baseline trial). A pruned trial's run ends FINISHED with
``bigmodel_ops.outcome = TrialPruned``; a diverged or failed one ends FAILED; the run of a
trial whose worker died ends KILLED (``optuna.state = FAIL``). The
``tune`` run's id is kept in the study (user attribute ``mlflow_run_id``): a run that was
killed (still RUNNING or KILLED in MLflow) is resumed by the next run of the stage, so a study
interrupted and continued stays one ``tune`` run. The parent is tagged with the best trial and
its run id.

Outputs (only when at least one trial completed): ``best_params.yaml`` (the dependency of
``finetune``: the searched settings of the best trial plus the effective lr / dropout /
weight_decay / batch_size, its value and number), Optuna's optimisation-history,
intermediate-values, parameter-importance and parallel-coordinate plots in ``outputs/tune/``
(also MLflow artifacts under ``plots/``), and the report ``outputs/metrics/tune.json`` (best
value, the baseline trial's value and number when it completed, trials by state, total trial
seconds and optimizer steps, steps saved by pruning). With no completed trial the stage fails
and writes neither (the study stays, so finished trials are not lost). The algorithms are in
:mod:`bigmodel_ops.tuning`; the worker pool and the checks it shares with this module are in
:mod:`bigmodel_ops.pipeline._tuning`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from bigmodel_ops.config import Params, load_params
from bigmodel_ops.contract import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from bigmodel_ops.errors import BigModelOpsError
from bigmodel_ops.fsutil import publish, write_json_atomic
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import add_common_args, guarded, setup_logging, stage_run
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams
from bigmodel_ops.pipeline._tuning import check_inputs, run_pool, storage_for, tracking_client
from bigmodel_ops.tuning.checks import check_direction
from bigmodel_ops.tuning.storage import describe
from bigmodel_ops.tuning.study import (
    baseline_values,
    load_study,
    save_plots,
    study_name,
    study_summary,
)
from bigmodel_ops.tuning.workers import end_stale_trial_run, fill_queue

_logger = logging.getLogger(__name__)

# Always in best_params.yaml (finetune reads them), searched or not.
CORE_SETTINGS = ("lr", "dropout", "weight_decay", "batch_size")


def name_of_study(params: Params, paths: ProjectPaths) -> str:
    """The study of this setup: search space, budget, metric, the report axis when it is not
    optimizer steps (``tune.report_every_n_examples`` set: reports keyed by examples must not
    meet step-keyed ones in one study; the default leaves the name as it always was), the
    non-tuned fine-tuning settings, seed, labels, precision, and the contents of the pretrained
    model and the train/val data."""
    fit = fit_config(params)
    searched = {k.replace(".", "_") for k in params.tune.search_space.names()}
    setup = {
        "search_space": params.tune.search_space.model_dump(mode="json", exclude_none=True),
        "max_epochs": params.tune.max_epochs,
        "train_fraction": params.tune.train_fraction,
        "metric": params.tune.metric,
        **({"report_axis": "examples"} if params.tune.report_every_n_examples is not None else {}),
        # Every fine-tuning setting a trial does not draw (nor its epoch budget, tune.max_epochs).
        "finetune": {
            "max_length": params.finetune.max_length,
            **{
                k: v
                for k, v in hyperparams(params).as_dict().items()
                if k not in searched and k != "max_epochs"
            },
        },
        # The baseline trial's settings (tune.baseline_trial): a new finetune.lr is a new study.
        **(
            {"baseline": baseline_values(params.tune.search_space, hyperparams(params))}
            if params.tune.baseline_trial
            else {}
        ),
        "seed": params.project.seed,
        "labels": params.prepare.labels,
        "precision": fit.precision,
    }
    model = paths.pretrained_model
    inputs = {
        "weights": model / WEIGHTS_FILE,
        "config": model / CONFIG_FILE,
        "tokenizer": model / TOKENIZER_FILE,
        "train": paths.prepared / "train.parquet",
        "val": paths.prepared / "val.parquet",
    }
    return study_name(params.project.name, setup=setup, inputs=inputs)


def direction_of(params: Params) -> str:
    return "maximize" if params.tune.metric == "val_acc" else "minimize"


def _resumable_run(study: optuna.Study, client: Any) -> str | None:
    """The ``tune`` run of this study's last interrupted run, to continue: still RUNNING (its
    process was killed), KILLED (stopped by a signal) or FAILED by the tracking layer's reaper
    of dead processes (tag ``bigmodel_ops.reap_reason``); None when there is none or it ended
    normally or by an error of its own."""
    run_id = study.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a deleted run or another store: start a new run
        return None
    status = run.info.status
    reaped = status == "FAILED" and "bigmodel_ops.reap_reason" in run.data.tags
    return run_id if status in ("RUNNING", "KILLED") or reaped else None


def run(
    params: Params,
    *,
    paths: ProjectPaths,
    quiet: bool = False,
    workers: int | None = None,
    storage: str | None = None,
    extra_callbacks: Callable[[optuna.Trial], Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Search fine-tuning hyperparameters with Optuna (pruned trials, nested MLflow runs, workers).

    Runs (or continues) the study with ``workers`` processes (default ``tune.workers``) on
    ``storage`` (default ``tune.storage``); writes best_params.yaml, the plots and the
    report, and returns the report. Raises BigModelOpsError when no trial completed, or before
    any trial when an input, the search space, the storage or the study is wrong.
    ``extra_callbacks``: Lightning callbacks added to every trial this process runs (tests).
    """
    tune = params.tune
    n_workers = workers or tune.workers
    splits, base = check_inputs(params, paths)
    name = name_of_study(params, paths)
    direction = direction_of(params)
    store = storage_for(
        params, paths, url=storage, setting="--storage" if storage is not None else "tune.storage"
    )
    created = optuna.create_study(storage=store, study_name=name, direction=direction, load_if_exists=True)
    check_direction(created, direction, metric=tune.metric)
    study = load_study(tune, store, name, seed=params.project.seed, worker=0)
    client = tracking_client(params)

    def on_stale(trial: optuna.trial.FrozenTrial) -> None:
        end_stale_trial_run(client, trial)

    first = baseline_values(tune.search_space, base) if tune.baseline_trial else None
    drawn = [k for k, _ in tune.search_space.items() if first is not None and k not in first]
    if drawn:
        _logger.info("tune: the baseline trial draws %s (finetune values outside the space)", drawn)
    counts = fill_queue(study, n_trials=tune.n_trials, on_stale=on_stale, first=first)
    pending = counts["running"] + counts["waiting"] + counts["enqueued"]
    if counts["done"]:
        _logger.info("tune: study %s has %d finished trial(s); %d to run", name, counts["done"], pending)
    resume = _resumable_run(study, client)

    with stage_run(params, "tune", resume_run_id=resume) as run:
        study.set_user_attr("mlflow_run_id", run.run_id)
        run.set_tags(
            {
                "optuna.study": name,
                "optuna.direction": direction,
                "optuna.metric": tune.metric,
                "optuna.storage": describe(store),
                "tune.workers": n_workers,
            }
        )
        if pending:
            run_pool(
                params,
                paths=paths,
                splits=splits,
                base=base,
                study=study,
                run=run,
                n_workers=n_workers,
                storage=storage,
                quiet=quiet,
                on_stale=on_stale,
                extra_callbacks=extra_callbacks,
            )
        report, best = _summarise(study, run=run, name=name, paths=paths, base=base)
        for plot in save_plots(study, paths.tune_dir):
            run.log_artifact(plot, "plots")
        run.log_dict(best, paths.best_params.name)
        _write_yaml_atomic(paths.best_params, best)
        write_json_atomic(paths.tune_report, report)
        _logger.info("tune: best %s = %.4f (trial %d)", tune.metric, best["value"], best["trial"])
    return report


def _write_yaml_atomic(path: Path, data: dict) -> None:
    with publish(path) as pub:
        pub.staged(path).write_text(yaml.safe_dump(data, sort_keys=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bigmodel-ops tune`` beyond ``--params`` / ``--quiet``."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes on the study (default: tune.workers)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage URL (default: tune.storage, else the journal file)",
    )


def command(argv: Sequence[str] | None = None) -> int:
    """``bigmodel-ops tune [--workers N] [--storage URL]``: validate, run, exit 0 / 2."""
    parser = argparse.ArgumentParser(
        prog="bigmodel-ops tune", description=(run.__doc__ or "").splitlines()[0]
    )
    add_common_args(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    def action() -> None:
        run(
            load_params(args.params),
            paths=ProjectPaths(),
            quiet=args.quiet,
            workers=args.workers,
            storage=args.storage,
        )

    return guarded("tune", action)


def _summarise(
    study: optuna.Study, *, run: Any, name: str, paths: ProjectPaths, base: Any
) -> tuple[dict, dict]:
    """(report, best params); logs counts, cost and failures; error when nothing completed."""
    summary = study_summary(study)
    counts = {k: summary[k] for k in ("n_complete", "n_pruned", "n_failed")}
    run.log_metrics({k: float(v) for k, v in counts.items()}, step=0)
    reasons = "; ".join(f"trial {n}: {why}" for n, why in summary["failures"].items())
    if summary["failures"]:
        _logger.warning("tune: %d failed trial(s): %s", len(summary["failures"]), reasons)
        run.set_tags({"tune.failures": json.dumps(summary["failures"])})
    best = summary["best"]
    if best is None:
        raise BigModelOpsError(
            f"tune: no trial of study {name!r} completed ({counts['n_complete']} complete, "
            f"{counts['n_pruned']} pruned, {counts['n_failed']} failed{': ' + reasons if reasons else ''}); "
            f"{paths.best_params} was not written. Check the search space (tune.search_space), the "
            "pruner settings (tune.pruner / tune.prune_threshold) or raise tune.n_trials."
        )
    baseline = summary["baseline"]
    report = {
        "best_value": float(best["value"]),
        "best_trial": int(best["trial"]),
        # The finetune settings' own trial (tune.baseline_trial), when it completed.
        **(
            {"baseline_value": float(baseline["value"]), "baseline_trial": int(baseline["trial"])}
            if baseline
            else {}
        ),
        "n_trials": counts["n_complete"] + counts["n_pruned"] + counts["n_failed"],
        **counts,
        **{k: summary[k] for k in ("total_trial_seconds", "total_optimizer_steps", "steps_saved_by_pruning")},
    }
    run.log_metrics(
        {
            k: float(report[k])
            for k in (
                "best_value",
                "baseline_value",
                "total_trial_seconds",
                "total_optimizer_steps",
                "steps_saved_by_pruning",
            )
            if k in report
        },
        step=0,
    )
    searched = {k: v for k, v in best.items() if k not in ("value", "trial")}
    run.log_params({f"best.{k}": v for k, v in searched.items()})
    best_run = study.best_trial.user_attrs.get("mlflow_run_id")
    run.set_tags({"tune.best_trial": best["trial"], **({"tune.best_run_id": best_run} if best_run else {})})
    # finetune reads the core settings whether searched or not: write their effective values.
    core = {k: v for k, v in base.as_dict().items() if k in CORE_SETTINGS}
    return report, {**core, **best}
