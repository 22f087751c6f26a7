"""The Optuna search over fine-tuning hyperparameters (the library of the ``tune`` stage).

Each trial is a real fine-tuning run of ``tune.max_epochs`` epochs from the pretrained backbone
with hyperparameters drawn from ``tune.search_space``; the pruner sees the validation metric
after every epoch through optuna-integration's ``PyTorchLightningPruningCallback``.

Study and resume: a study's name (:func:`study_name`) hashes everything that decides what a
trial measures, so a rerun with the same setup continues the same study. A RUNNING trial found
at start belongs to a killed process (the journal has no heartbeat; one tune process per study
is assumed) and is marked FAIL (:func:`fail_stale_trials`).

The stage glue (storage, MLflow parent run, outputs) is :mod:`bigmodel_ops.pipeline.tune`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from bigmodel_ops.classification.inputs import TokenizedSplit
from bigmodel_ops.classification.training import FitConfig, HyperParams, fit_classifier
from bigmodel_ops.config import SearchSpace, TuneParams
from bigmodel_ops.fsutil import publish, sha256_file, short_hash
from bigmodel_ops.trainer import MetricsCallback

_logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
PLOT_FILE = "optimization_history.png"


class NonFiniteObjective(Exception):
    """The trial's objective (or val loss) is NaN/inf: the trial diverged."""


def study_name(project: str, *, setup: Mapping[str, Any], inputs: Mapping[str, Path]) -> str:
    """``<project>-tune-<hash>`` of the setup and the inputs' contents: same setup and same
    inputs -> same study (resume)."""
    fingerprints = {name: sha256_file(path)[:16] for name, path in inputs.items()}
    return f"{project}-tune-{short_hash({**setup, 'inputs': fingerprints})}"


def make_storage(url: str | None, *, journal: Path) -> optuna.storages.BaseStorage | str:
    """The storage URL when given, else a journal file (created with its folder)."""
    if url:
        return url
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


def make_sampler(kind: str, *, seed: int, n_existing: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler ("random" or "tpe")."""
    # Offset the seed by the trials already in the study: a resumed study must not replay the
    # random draws of its first trials.
    seed = seed + n_existing
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=0)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.max_epochs)
    if tune.pruner == "threshold":
        bound = {"lower" if tune.metric == "val_acc" else "upper": tune.prune_threshold}
        return optuna.pruners.ThresholdPruner(**bound)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: SearchSpace, base: HyperParams | None = None) -> HyperParams:
    """The trial's hyperparameters: the searched ones drawn, the others those of ``base``
    (the ``finetune`` params)."""
    return (base or HyperParams()).replace(
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


def objective_factory(
    tune: TuneParams,
    *,
    fit: FitConfig,
    base: HyperParams | None = None,
    model_dir: Path,
    splits: Mapping[str, TokenizedSplit],
    run: Any,
    study: str,
    quiet: bool,
):
    """The Optuna objective: one nested MLflow run and one fine-tuning per trial.

    A pruned trial's run ends FINISHED tagged PRUNED; a NaN objective returns NaN (Optuna fails
    the trial with a warning and the study goes on); any other exception fails the trial.
    """
    from optuna_integration import PyTorchLightningPruningCallback

    monitor = tune.metric

    def objective(trial: optuna.Trial) -> float:
        hparams = suggest(trial, tune.search_space, base)
        try:
            with run.child_run(
                f"trial-{trial.number}",
                tags={"optuna.trial": trial.number, "optuna.study": study},
                finished_on=(optuna.TrialPruned,),
            ) as child:
                trial.set_user_attr("mlflow_run_id", child.run_id)
                child.log_params({k: hparams.as_dict()[k] for k in trial.params})
                pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
                try:
                    module, _ = fit_classifier(
                        fit,
                        model_dir=model_dir,
                        splits=splits,
                        hparams=hparams,
                        max_epochs=tune.max_epochs,
                        callbacks=[
                            pruning,
                            MetricsCallback(
                                child,
                                log_every_n_steps=10,
                                loss_key="train_loss",
                                lr_key="lr",
                                val_step="epoch",
                            ),
                        ],
                        quiet=quiet,
                        single_device=True,
                        train_fraction=tune.train_fraction,
                    )
                    pruning.check_pruned()  # a no-op off DDP; required under it
                except optuna.TrialPruned:
                    child.set_tags({"optuna.state": "PRUNED"})
                    raise
                value = module.last_val.get(monitor, float("nan"))
                loss = module.last_val.get("val_loss", float("nan"))
                if not (math.isfinite(value) and math.isfinite(loss)):
                    child.set_tags({"optuna.state": "FAIL", "optuna.fail_reason": "objective is NaN"})
                    raise NonFiniteObjective(f"{monitor}={value}, val_loss={loss}")
                child.set_tags({"optuna.state": "COMPLETE", "optuna.value": value})
                return value
        except NonFiniteObjective as error:
            trial.set_user_attr("fail_reason", f"diverged: {error}")
            _logger.warning("tune: trial %d diverged (%s); Optuna records it as failed", trial.number, error)
            return float("nan")  # Optuna fails the trial with a warning
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}"[:500])
            raise

    return objective


def save_history_plot(study: optuna.Study, path: Path) -> None:
    """Optuna's optimisation-history plot as a PNG, published atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study)
    figure = axes.get_figure()
    try:
        with publish(path) as pub:
            figure.savefig(pub.staged(path), bbox_inches="tight", dpi=100, format="png")
    finally:
        plt.close(figure)
