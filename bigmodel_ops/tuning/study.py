"""The Optuna search over fine-tuning hyperparameters (the library of the ``tune`` stage).

Each trial is a real fine-tuning run of ``tune.max_epochs`` epochs from the pretrained backbone
with any fine-tuning settings drawn from ``tune.search_space`` (:func:`suggest`); the sampler is
:func:`make_sampler` (TPE, random, CMA-ES or GP, seeded). Every ``tune.report_every_n_steps``
optimizer steps (or, with ``tune.report_every_n_examples``, each time the training examples seen
reach the next multiple of it; the report step is then the examples count) the trial reports its
metric on a fixed subset of the val split and the pruner (:func:`make_pruner`: median, Hyperband,
successive halving, threshold) may stop it there (:mod:`bigmodel_ops.tuning.pruning`); the
trial's value is measured on the whole val split.

Study and resume: a study's name (:func:`study_name`) hashes everything that decides what a
trial measures, so a rerun with the same setup continues the same study. Storage, heartbeats and
the retry of a dead worker's trial are :mod:`bigmodel_ops.tuning.storage`; several workers on one
study, :mod:`bigmodel_ops.tuning.workers`.

The stage glue (storage, MLflow parent run, outputs) is :mod:`bigmodel_ops.pipeline.tune`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from bigmodel_ops.classification.inputs import TokenizedSplit
from bigmodel_ops.classification.training import FitConfig, HyperParams, fit_classifier
from bigmodel_ops.config import SearchSpace, TuneParams, setting_name
from bigmodel_ops.fsutil import publish, sha256_file, short_hash
from bigmodel_ops.trainer import MetricsCallback
from bigmodel_ops.tuning.pruning import NonFiniteObjective, StepPruningCallback, val_subset

_logger = logging.getLogger(__name__)


def study_name(project: str, *, setup: Mapping[str, Any], inputs: Mapping[str, Path]) -> str:
    """``<project>-tune-<hash>`` of the setup and the inputs' contents: same setup and same
    inputs -> same study (resume)."""
    fingerprints = {name: sha256_file(path)[:16] for name, path in inputs.items()}
    return f"{project}-tune-{short_hash({**setup, 'inputs': fingerprints})}"


def make_sampler(
    kind: str, *, seed: int, n_existing: int = 0, startup_trials: int | None = None
) -> optuna.samplers.BaseSampler:
    """A seeded sampler: "tpe", "random", "cmaes" or "gp" (tune.sampler).

    ``startup_trials``: random trials before a model-based sampler starts (None: Optuna's default).
    """
    # Offset the seed by the trials already in the study: a resumed study must not replay the
    # random draws of its first trials.
    seed = seed + n_existing
    startup = {} if startup_trials is None else {"n_startup_trials": startup_trials}
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "cmaes":
        # CMA-ES models continuous and integer settings only: categorical ones (batch_size as a
        # list of choices, pooling, method, ...) are drawn by its independent sampler, at random,
        # and a space with a single numeric setting is sampled at random altogether (Optuna's
        # CMA-ES needs two or more dimensions). Needs the `cmaes` package.
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
            **startup,
        )
    if kind == "gp":
        # Optuna's Gaussian-process sampler (torch + scipy); categorical settings are modelled too.
        return optuna.samplers.GPSampler(seed=seed, **startup)
    # Multivariate TPE; the constant liar makes parallel workers avoid the points of each
    # other's running trials (harmless with one worker).
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **startup)


def load_study(tune: TuneParams, storage: Any, name: str, *, seed: int, worker: int = 0) -> optuna.Study:
    """The study ``name`` with this worker's sampler (:func:`make_sampler` of ``tune.sampler``,
    seeded by ``seed``, the trials already in the study and the worker's index, so workers do not
    draw the same points) and the pruner (:func:`make_pruner`)."""
    existing = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(
            tune.sampler,
            seed=seed + 7919 * worker,
            n_existing=existing,
            startup_trials=tune.sampler_startup_trials,
        ),
        pruner=make_pruner(tune),
    )


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """tune.pruner over the step-level reports: steps are optimizer steps, or training examples
    when ``tune.report_every_n_examples`` is set (warmup, min_resource and max_resource count
    the same unit; min_resource defaults to the report cadence, :attr:`TuneParams.first_rung`)."""
    min_resource = tune.first_rung
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_steps
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=tune.max_resource, reduction_factor=tune.reduction_factor
        )
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=tune.reduction_factor
        )
    if tune.pruner == "threshold":
        bound = {"lower" if tune.metric == "val_acc" else "upper": tune.prune_threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=tune.pruner_warmup_steps)
    return optuna.pruners.NopPruner()


def suggest_values(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Draw every setting of the space: {key as declared: value}."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if dist.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif dist.type == "int":
            values[key] = trial.suggest_int(
                key, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log
            )
        else:
            values[key] = trial.suggest_float(
                key, float(dist.low), float(dist.high), step=dist.step, log=dist.log
            )
    return values


def suggest(trial: optuna.Trial, space: SearchSpace, base: HyperParams | None = None) -> HyperParams:
    """The trial's hyperparameters: the searched ones drawn, the others those of ``base``
    (the ``finetune`` params)."""
    return (base or HyperParams()).override(suggest_values(trial, space))


def baseline_values(space: SearchSpace, base: HyperParams) -> dict[str, Any]:
    """The baseline trial's fixed params: each searched setting at its ``base`` (``finetune``)
    value, keyed as the space declares it. A value the space cannot draw (outside the range, off
    the step, not among the choices) is left out, so the sampler draws that setting instead."""
    current = base.as_dict()
    values: dict[str, Any] = {}
    for key, dist in space.items():
        value = current[setting_name(key).replace(".", "_")]
        if dist.type == "categorical":
            inside = value in dist.choices
        else:
            inside = dist.low <= value <= dist.high
            if inside and dist.step is not None:
                steps = (value - dist.low) / dist.step
                inside = abs(steps - round(steps)) < 1e-9
        if inside:
            values[key] = value
    return values


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Trial counts by state, the best COMPLETE trial (None if there is none) and the value of
    the baseline trial (None when the study has none, or it was pruned or failed)."""
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
        # Cost: optimizer steps and wall seconds of the trials that recorded them, and the steps
        # pruned trials did not train (their budget minus what they trained).
        "total_trial_seconds": round(sum(float(t.user_attrs.get("wall_seconds", 0.0)) for t in trials), 3),
        "total_optimizer_steps": sum(int(t.user_attrs.get("optimizer_steps", 0)) for t in trials),
        "steps_saved_by_pruning": sum(
            max(0, int(t.user_attrs.get("budget_steps", 0)) - int(t.user_attrs.get("optimizer_steps", 0)))
            for t in trials
            if t.state == states.PRUNED
        ),
    }
    if complete:
        best = study.best_trial
        summary["best"] = {**best.params, "value": best.value, "trial": best.number}
    baseline = [t for t in complete if t.user_attrs.get("baseline")]
    summary["baseline"] = {"value": baseline[0].value, "trial": baseline[0].number} if baseline else None
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
    worker: int = 0,
    extra_callbacks: Callable[[optuna.Trial], Sequence[Any]] | None = None,
):
    """The Optuna objective: one nested MLflow run and one fine-tuning per trial.

    Every ``tune.report_every_n_steps`` optimizer steps the trial reports its metric on a fixed
    subset of the val split (:class:`~bigmodel_ops.tuning.pruning.StepPruningCallback`, also
    logged as ``tune/val_acc_subset`` / ``tune/val_loss_subset`` on the step axis); the pruner
    may stop it there. With ``tune.report_every_n_examples`` the reports are on the examples axis
    (the trial's own batch size sets the examples of a step; the trial gets the user attribute
    ``report_axis = "examples"``), the MLflow metrics stay on the optimizer-step axis with
    ``tune/examples_seen`` beside them. The trial's value is the metric on the whole val split of
    its best epoch (by val_acc: the epoch finetune would export).

    ``run``: the stage's MLflow run handle, or a :class:`~bigmodel_ops.tuning.workers.ClientRun`
    in a worker process; ``worker`` is tagged on each trial run (``optuna.worker``).
    ``extra_callbacks(trial)``: more Lightning callbacks for that trial's training (fault
    injection in tests; production passes none).

    Each trial records its cost as user attributes and run metrics: ``optimizer_steps``,
    ``budget_steps`` (what it would have trained unpruned; both in optimizer steps on either
    report axis), ``wall_seconds``; its run is tagged ``optuna.state`` (COMPLETE / PRUNED /
    FAIL) and ``optuna.reason``. A pruned trial's run ends FINISHED. Divergence (a NaN/inf
    subset report, or a NaN/inf final value or val loss) raises
    :class:`~bigmodel_ops.tuning.pruning.NonFiniteObjective` after recording ``fail_reason =
    "diverged: ..."``: the worker records the trial FAIL and the study goes on. Any other
    exception also fails the trial (recorded with its type and message) and is re-raised.
    """
    monitor = tune.metric
    subset = val_subset(splits["val"], fraction=tune.report_val_fraction, seed=fit.seed)

    def objective(trial: optuna.Trial) -> float:
        hparams = suggest(trial, tune.search_space, base)
        started = time.perf_counter()
        examples = tune.report_every_n_examples
        pruning = StepPruningCallback(
            trial,
            subset=subset,
            every_n_steps=tune.report_every_n_steps if examples is None else None,
            every_n_examples=examples,
            train_batch_size=hparams.batch_size,
            metric=monitor,
            num_labels=fit.num_labels,
            batch_size=max(hparams.batch_size, 64),
        )

        def record(child: Any | None, state: str, reason: str | None = None) -> None:
            cost = {
                "optimizer_steps": pruning.steps,
                "budget_steps": pruning.budget_steps if pruning.budget_steps is not None else pruning.steps,
                "wall_seconds": round(time.perf_counter() - started, 3),
            }
            for key, value in cost.items():
                trial.set_user_attr(key, value)
            if reason:
                trial.set_user_attr("fail_reason" if state == "FAIL" else "prune_reason", reason)
            if child is not None:
                child.log_metrics({f"tune/{k}": float(v) for k, v in cost.items()}, step=pruning.steps)
                tags = {"optuna.state": state}
                if reason:
                    tags["optuna.reason"] = reason[:500]
                child.set_tags(tags)

        try:
            with run.child_run(
                f"trial-{trial.number}",
                tags={
                    "optuna.trial": trial.number,
                    "optuna.study": study,
                    "optuna.worker": worker,
                    **({"tune.baseline": "true"} if trial.user_attrs.get("baseline") else {}),
                },
                finished_on=(optuna.TrialPruned,),
            ) as child:
                pruning.sink = child
                trial.set_user_attr("mlflow_run_id", child.run_id)
                if examples is not None:  # benchmarks/hpo_replay.py replays step reports only
                    trial.set_user_attr("report_axis", "examples")
                child.log_params({k: v for k, v in hparams.as_dict().items() if k in _hparam_names(trial)})
                try:
                    module, _ = fit_classifier(
                        fit,
                        model_dir=model_dir,
                        splits=splits,
                        hparams=hparams,
                        max_epochs=tune.max_epochs,
                        callbacks=[
                            *(extra_callbacks(trial) if extra_callbacks else ()),
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
                except optuna.TrialPruned as pruned:
                    record(child, "PRUNED", str(pruned) or "pruned")
                    raise
                except NonFiniteObjective as error:
                    record(child, "FAIL", f"diverged: {error}")
                    raise
                final = module.best_val or module.last_val
                value = final.get(monitor, float("nan"))
                loss = final.get("val_loss", float("nan"))
                if not (math.isfinite(value) and math.isfinite(loss)):
                    error = NonFiniteObjective(f"{monitor}={value}, val_loss={loss}")
                    record(child, "FAIL", f"diverged: {error}")
                    raise error
                record(child, "COMPLETE")
                child.set_tags({"optuna.value": value})
                child.log_metrics({"tune/value": float(value)}, step=pruning.steps)
                return value
        except (optuna.TrialPruned, NonFiniteObjective):
            raise
        except Exception as error:
            record(None, "FAIL", f"{type(error).__name__}: {error}"[:500])
            raise

    return objective


def _hparam_names(trial: optuna.Trial) -> set[str]:
    """The HyperParams field names of the trial's drawn settings (``lora.rank`` -> ``lora_rank``)."""
    return {k.replace(".", "_") if k.startswith("lora.") else k for k in trial.params}


PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "intermediate_values.png": "plot_intermediate_values",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
}


def save_plots(study: optuna.Study, directory: Path) -> list[Path]:
    """Optuna's plots (matplotlib backend) as PNG files in ``directory``, each published
    atomically; returns the files written. Parameter importance needs two complete trials and is
    skipped (logged) otherwise, as is any plot Optuna cannot draw for this study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written: list[Path] = []
    for filename, function in PLOTS.items():
        path = directory / filename
        if function == "plot_param_importances" and len(complete) < 2:
            _logger.info("tune: %s skipped (needs 2 complete trials, has %d)", filename, len(complete))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, importance on few trials
                axes = getattr(ovm, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            _logger.warning("tune: %s skipped: %s", filename, error)
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = axes.get_figure()
        try:
            with publish(path) as pub:
                figure.savefig(pub.staged(path), bbox_inches="tight", dpi=100, format="png")
        finally:
            plt.close("all")
        written.append(path)
    return written
