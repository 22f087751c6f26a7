"""The tune stage: an Optuna search over the fine-tuning hyperparameters.

Each trial is a real fine-tuning run of ``tune.max_epochs`` epochs from the pretrained backbone
with hyperparameters drawn from ``tune.search_space`` (lr log-uniform or uniform, dropout,
weight_decay, batch_size categorical). The objective is ``tune.metric`` on the validation split
after the last epoch (val_acc maximised, val_loss minimised); the pruner sees it after every
epoch through optuna-integration's ``PyTorchLightningPruningCallback``.

Study and resume: the study lives in ``tune.storage`` (an Optuna storage URL) or, by default, in a
journal file ``<tune_dir>/study.journal``. Its name is ``<project>-tune-<hash>``, the hash covering
everything that decides what a trial measures (search space, epochs, metric, the non-tuned
fine-tuning settings, seed, precision, and fingerprints of the pretrained model and of the
train/val data), so a rerun with the same setup continues the same study: trials already COMPLETE
or PRUNED count towards ``n_trials`` and only the remainder runs. FAILED trials do not count (they
are retried). A RUNNING trial found at start belongs to a killed process (the journal has no
heartbeat; one tune process per study is assumed) and is marked FAIL.

MLflow: the stage run ``tune`` gets one nested run per trial, ``tune/trial-<number>``, with the
trial's params, val metrics per epoch (step = epoch) and tags ``optuna.state`` / ``optuna.trial``.
A pruned trial's run ends FINISHED with ``bigmodel_ops.outcome = TrialPruned``; a trial whose
objective is NaN (diverged) or that raised ends FAILED.

Outputs (only when at least one trial completed): ``best_params.json`` and the optimization
history plot in ``tune_dir``, the report ``tune.json`` (best value, trial counts). Each is written
to a temporary file and renamed into place. With no completed trial the stage fails and writes
neither (the journal stays, so finished trials are not lost).

Trials run on one device each: Optuna's Lightning callback would need an RDB storage and a
re-launch of the whole study under DDP; parallelise trials instead (several processes on one
RDB or journal storage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from bigmodel_ops.classification import (
    HyperParams,
    MetricsLogger,
    TokenizedSplit,
    fit_classifier,
    load_splits,
    resolve_precision,
)
from bigmodel_ops.config import Params
from bigmodel_ops.errors import BigModelOpsError
from bigmodel_ops.fsutil import write_json_atomic
from bigmodel_ops.paths import ProjectPaths

_logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
PLOT_FILE = "optimization_history.png"


class _NonFiniteObjective(Exception):
    """The trial's objective (or val loss) is NaN/inf: the trial diverged."""


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def study_name(params: Params, paths: ProjectPaths) -> str:
    """``<project>-tune-<hash>``: same setup and same inputs -> same study (resume)."""
    tune = params.tune
    setup = {
        "search_space": tune.search_space.model_dump(mode="json"),
        "max_epochs": tune.max_epochs,
        "metric": tune.metric,
        "finetune": {
            k: getattr(params.finetune, k)
            for k in ("max_length", "warmup_ratio", "freeze_backbone", "grad_clip")
        },
        "seed": params.project.seed,
        "labels": params.prepare.labels,
        "precision": resolve_precision(params),
        "inputs": {
            name: _fingerprint(path)
            for name, path in {
                "weights": paths.pretrained_model / "model.safetensors",
                "config": paths.pretrained_model / "config.json",
                "tokenizer": paths.pretrained_model / "tokenizer.json",
                "train": paths.prepared / "train.parquet",
                "val": paths.prepared / "val.parquet",
            }.items()
        },
    }
    blob = json.dumps(setup, sort_keys=True, separators=(",", ":"))
    return f"{params.project.name}-tune-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def make_storage(params: Params, paths: ProjectPaths) -> optuna.storages.BaseStorage | str:
    """tune.storage (a URL) or the journal file in tune_dir."""
    if params.tune.storage:
        return params.tune.storage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(paths.tune_dir / JOURNAL_FILE)))


def make_sampler(params: Params, *, n_existing: int) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already in the study: a resumed study must not replay the
    # random draws of its first trials.
    seed = params.project.seed + n_existing
    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    tune = params.tune
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=0)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.max_epochs)
    if tune.pruner == "threshold":
        bound = {"lower" if tune.metric == "val_acc" else "upper": tune.prune_threshold}
        return optuna.pruners.ThresholdPruner(**bound)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, params: Params) -> HyperParams:
    space = params.tune.search_space
    return HyperParams(
        lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        dropout=trial.suggest_float("dropout", space.dropout.low, space.dropout.high, log=space.dropout.log),
        weight_decay=trial.suggest_float(
            "weight_decay", space.weight_decay.low, space.weight_decay.high, log=space.weight_decay.log
        ),
        batch_size=int(trial.suggest_categorical("batch_size", list(space.batch_size))),
    )


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials (left by a killed process) FAIL; return their numbers."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        # Attributes first: a finished trial can no longer be updated.
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted (process ended)")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return [trial.number for trial in stale]


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Trial counts by state, and the best COMPLETE trial (None if there is none)."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    summary: dict[str, Any] = {
        "n_complete": len(complete),
        "n_pruned": sum(t.state == states.PRUNED for t in trials),
        "n_failed": sum(t.state == states.FAIL for t in trials),
        "failures": {
            t.number: t.user_attrs.get("fail_reason", "failed") for t in trials if t.state == states.FAIL
        },
        "best": None,
    }
    if complete:
        best = study.best_trial
        summary["best"] = {**best.params, "value": best.value, "trial": best.number}
    return summary


def _objective_factory(
    params: Params,
    *,
    paths: ProjectPaths,
    splits: Mapping[str, TokenizedSplit],
    run: Any,
    study: str,
    quiet: bool,
):
    from optuna_integration import PyTorchLightningPruningCallback

    monitor = params.tune.metric

    def objective(trial: optuna.Trial) -> float:
        hparams = suggest(trial, params)
        try:
            with run.child_run(
                f"trial-{trial.number}", tags={"optuna.trial": trial.number, "optuna.study": study}
            ) as child:
                trial.set_user_attr("mlflow_run_id", child.run_id)
                child.log_params(hparams.as_dict())
                pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
                try:
                    module, _ = fit_classifier(
                        params,
                        model_dir=paths.pretrained_model,
                        splits=splits,
                        hparams=hparams,
                        max_epochs=params.tune.max_epochs,
                        callbacks=[pruning, MetricsLogger(child, every_n_steps=1, step="epoch")],
                        quiet=quiet,
                        single_device=True,
                        train_fraction=params.tune.train_fraction,
                    )
                    pruning.check_pruned()  # a no-op off DDP; required under it
                except optuna.TrialPruned:
                    child.set_tags({"optuna.state": "PRUNED"})
                    raise
                value = module.last_val.get(monitor, float("nan"))
                loss = module.last_val.get("val_loss", float("nan"))
                if not (math.isfinite(value) and math.isfinite(loss)):
                    child.set_tags({"optuna.state": "FAIL", "optuna.fail_reason": "objective is NaN"})
                    raise _NonFiniteObjective(f"{monitor}={value}, val_loss={loss}")
                child.set_tags({"optuna.state": "COMPLETE", "optuna.value": value})
                return value
        except _NonFiniteObjective as error:
            trial.set_user_attr("fail_reason", f"diverged: {error}")
            _logger.warning("tune: trial %d diverged (%s); Optuna records it as failed", trial.number, error)
            return float("nan")  # Optuna fails the trial with a warning
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}"[:500])
            raise

    return objective


def _save_plot_atomic(study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study)
    figure = axes.get_figure()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, bbox_inches="tight", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)


def run_tune(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) the study; write best_params.json and the report. Returns the report."""
    from bigmodel_ops.tracking import stage_run

    tune = params.tune
    splits = load_splits(params, prepared=paths.prepared, model_dir=paths.pretrained_model)
    name = study_name(params, paths)
    storage = make_storage(params, paths)
    direction = "maximize" if tune.metric == "val_acc" else "minimize"
    probe = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    stale = fail_stale_trials(probe)
    if stale:
        _logger.warning("tune: trials %s were left RUNNING by an ended process; marked failed", stale)
    n_existing = len(probe.get_trials(deepcopy=False))
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(params, n_existing=n_existing),
        pruner=make_pruner(params),
    )
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_done = len(study.get_trials(deepcopy=False, states=done_states))
    remaining = max(0, tune.n_trials - n_done)
    if n_done:
        _logger.info("tune: study %s has %d finished trial(s); running %d more", name, n_done, remaining)

    with stage_run(params, stage="tune") as run:
        run.set_tags({"optuna.study": name, "optuna.direction": direction, "optuna.metric": tune.metric})
        if remaining:
            objective = _objective_factory(
                params, paths=paths, splits=splits, run=run, study=name, quiet=quiet
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
        summary = study_summary(study)
        counts = {k: summary[k] for k in ("n_complete", "n_pruned", "n_failed")}
        run.log_metrics({k: float(v) for k, v in counts.items()}, step=0)
        if summary["failures"]:
            _logger.warning(
                "tune: %d failed trial(s): %s",
                len(summary["failures"]),
                "; ".join(f"trial {n}: {why}" for n, why in summary["failures"].items()),
            )
            run.set_tags({"tune.failures": json.dumps(summary["failures"])})
        best = summary["best"]
        if best is None:
            reasons = "; ".join(f"trial {n}: {why}" for n, why in summary["failures"].items())
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
        }
        run.log_metrics({"best_value": report["best_value"]}, step=0)
        run.log_params({f"best.{k}": v for k, v in best.items() if k not in ("value", "trial")})
        paths.tune_dir.mkdir(parents=True, exist_ok=True)
        plot = paths.tune_dir / PLOT_FILE
        _save_plot_atomic(study, plot)
        run.log_artifact(plot, "plots")
        run.log_dict(best, "best_params.json")
        write_json_atomic(paths.best_params, best)
        write_json_atomic(paths.tune_report, report)
        _logger.info("tune: best %s = %.4f (trial %d)", tune.metric, best["value"], best["trial"])
    return report
