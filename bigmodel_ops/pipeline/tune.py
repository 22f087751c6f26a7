"""Search fine-tuning hyperparameters with Optuna (pruned trials, nested MLflow runs).

The study lives in ``tune.storage`` (an Optuna storage URL) or, by default, in the journal file
``outputs/tune/study.journal`` (persisted by DVC, so an interrupted ``dvc repro`` continues the
study). Trials already COMPLETE or PRUNED count towards ``tune.n_trials`` and only the remainder
runs; FAILED trials do not count (they are retried).

MLflow: the stage run ``tune`` gets one nested run per trial, ``tune/trial-<number>``, with the
trial's params, its subset reports (``tune/val_acc_subset``, ``tune/val_loss_subset``) on the
step axis, its train/val metrics, its cost (``tune/optimizer_steps``, ``tune/budget_steps``,
``tune/wall_seconds``) and tags ``optuna.state`` / ``optuna.reason`` / ``optuna.trial``. A pruned
trial's run ends FINISHED with ``bigmodel_ops.outcome = TrialPruned``; a diverged or failed one
ends FAILED. The parent is tagged with the best trial and its run id.

Outputs (only when at least one trial completed): ``best_params.json`` (the dependency of
``finetune``: the searched settings of the best trial plus the effective lr / dropout /
weight_decay / batch_size) and Optuna's optimisation-history, intermediate-values,
parameter-importance and parallel-coordinate plots in ``outputs/tune/`` (also MLflow artifacts
under ``plots/``), and the report ``outputs/metrics/tune.json`` (best value, trials by state,
total trial seconds and optimizer steps, steps saved by pruning). With no completed trial the stage fails and writes neither (the
journal stays, so finished trials are not lost). The algorithms are in :mod:`bigmodel_ops.tuning`.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import optuna

from bigmodel_ops.classification.inputs import load_splits
from bigmodel_ops.classification.training import prepare_model
from bigmodel_ops.config import Params
from bigmodel_ops.contract import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from bigmodel_ops.errors import BigModelOpsError
from bigmodel_ops.fsutil import write_json_atomic
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams
from bigmodel_ops.tuning.study import (
    fail_stale_trials,
    make_pruner,
    make_sampler,
    make_storage,
    objective_factory,
    save_plots,
    study_name,
    study_summary,
)

_logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
# Always in best_params.json (finetune reads them), searched or not.
CORE_SETTINGS = ("lr", "dropout", "weight_decay", "batch_size")


def name_of_study(params: Params, paths: ProjectPaths) -> str:
    """The study of this setup: search space, budget, metric, the non-tuned fine-tuning settings,
    seed, labels, precision, and the contents of the pretrained model and the train/val data."""
    fit = fit_config(params)
    searched = {k.replace(".", "_") for k in params.tune.search_space.names()}
    setup = {
        "search_space": params.tune.search_space.model_dump(mode="json", exclude_none=True),
        "max_epochs": params.tune.max_epochs,
        "train_fraction": params.tune.train_fraction,
        "metric": params.tune.metric,
        # Every fine-tuning setting a trial does not draw (nor its epoch budget, tune.max_epochs).
        "finetune": {
            "max_length": params.finetune.max_length,
            **{
                k: v
                for k, v in hyperparams(params).as_dict().items()
                if k not in searched and k != "max_epochs"
            },
        },
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


def _open_study(params: Params, paths: ProjectPaths, name: str, direction: str) -> optuna.Study:
    storage = make_storage(params.tune.storage, journal=paths.tune_dir / JOURNAL_FILE)
    probe = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    stale = fail_stale_trials(probe)
    if stale:
        _logger.warning("tune: trials %s were left RUNNING by an ended process; marked failed", stale)
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(
            params.tune.sampler,
            seed=params.project.seed,
            n_existing=len(probe.get_trials(deepcopy=False)),
            startup_trials=params.tune.sampler_startup_trials,
        ),
        pruner=make_pruner(params.tune),
    )


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Search fine-tuning hyperparameters with Optuna (pruned trials, nested MLflow runs).

    Runs (or continues) the study; writes best_params.json and the report, and returns the report.
    Raises BigModelOpsError when no trial completed.
    """
    tune = params.tune
    splits = load_splits(
        prepared=paths.prepared,
        model_dir=paths.pretrained_model,
        labels=params.prepare.labels,
        max_length=params.finetune.max_length,
    )
    base = hyperparams(params)
    # Settings that need the backbone (pooling, freeze_layers, LoRA targets) fail before any trial.
    prepare_model(paths.pretrained_model, num_labels=len(params.prepare.labels), hparams=base)
    name = name_of_study(params, paths)
    direction = "maximize" if tune.metric == "val_acc" else "minimize"
    study = _open_study(params, paths, name, direction)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_done = len(study.get_trials(deepcopy=False, states=done_states))
    remaining = max(0, tune.n_trials - n_done)
    if n_done:
        _logger.info("tune: study %s has %d finished trial(s); running %d more", name, n_done, remaining)

    with stage_run(params, "tune") as run:
        run.set_tags({"optuna.study": name, "optuna.direction": direction, "optuna.metric": tune.metric})
        if remaining:
            objective = objective_factory(
                tune,
                fit=fit_config(params),
                base=base,
                model_dir=paths.pretrained_model,
                splits=splits,
                run=run,
                study=name,
                quiet=quiet,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=tune.timeout_s,
                    # A trial that runs out of memory or hits a numerical error fails alone;
                    # user errors (BigModelOpsError) stop the stage.
                    catch=(RuntimeError, FloatingPointError),
                    gc_after_trial=True,
                )
        report, best = _summarise(study, run=run, name=name, paths=paths, base=base)
        for plot in save_plots(study, paths.tune_dir):
            run.log_artifact(plot, "plots")
        run.log_dict(best, "best_params.json")
        write_json_atomic(paths.best_params, best)
        write_json_atomic(paths.tune_report, report)
        _logger.info("tune: best %s = %.4f (trial %d)", tune.metric, best["value"], best["trial"])
    return report


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
    report = {
        "best_value": float(best["value"]),
        "best_trial": int(best["trial"]),
        "n_trials": counts["n_complete"] + counts["n_pruned"] + counts["n_failed"],
        **counts,
        **{k: summary[k] for k in ("total_trial_seconds", "total_optimizer_steps", "steps_saved_by_pruning")},
    }
    run.log_metrics(
        {
            k: float(report[k])
            for k in ("best_value", "total_trial_seconds", "total_optimizer_steps", "steps_saved_by_pruning")
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
