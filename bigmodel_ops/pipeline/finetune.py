"""Fine-tune a sequence classifier on the labeled splits from the pretrained backbone.

Hyperparameters: every ``finetune`` setting (:func:`~bigmodel_ops.pipeline._finetuning.hyperparams`),
with lr / dropout / weight_decay / batch_size (and any other fine-tuning setting it holds) taken from
``<tune_dir>/best_params.yaml`` when ``finetune.use_tuned`` (a ConfigError naming the file when it
is missing or malformed). Training runs at most ``finetune.max_epochs`` epochs on the train split
with the val split evaluated after each epoch (``finetune.early_stopping_patience`` stops earlier);
the active sizing profile decides devices and precision. The BEST epoch (by val_acc) is exported,
with LoRA adapters merged into the weights (``finetune.method: lora``).

``finetune.restarts: N`` fine-tunes N times from different seeds
(:mod:`~bigmodel_ops.classification.restarts`) and keeps the run with the best val_acc; each run
logs its curves into a child run ``finetune/restart-<k>``, and the stage's run gets
``restart_val_acc`` (one value per restart, at step k), ``kept_restart`` / ``kept_seed`` and the
kept run's metrics. With ``finetune.combine_restarts: soup`` (or ``greedy_soup``) the stage exports
the mean of the runs' weights instead (:mod:`~bigmodel_ops.classification.soup`): the report's and
the run's val metrics are the soup's, scored on val, with ``soup_members`` / ``soup_seeds`` (the
runs in it) and ``soup_size``; ``best_epoch`` and the step counters stay the best run's. The
control gets as many tries (child runs ``finetune/control-restart-<k>``), selected or combined the
same way. Each child run carries its fit's cost (the MLflow front page sums a run
and its children, as for the tune stage's trials).

``finetune.control: scratch`` also trains the from-scratch control (the same recipe with
``from_scratch: true``) and adds its best val metrics to the report and the run as
``control_val_acc`` / ``control_val_loss`` / ``control_val_f1`` / ``control_best_epoch``, plus
``pretrained_gain_val_acc`` (ours minus the control's); nothing else of the control is saved.

Outputs, written only after training finished and the model was logged:

- ``paths.classifier/``: model.safetensors (backbone + head), config.json (model config,
  num_labels, labels, max_length, pooling, ``mlflow_run_id`` / ``mlflow_artifact_path`` of the
  logged model), tokenizer.json; built in a temporary folder next to it and renamed into place;
- ``paths.finetune_report``: the best epoch's val_acc / val_loss / val_f1, ``best_epoch``, the
  epochs trained, ``stopped_early``, trainable / total parameter counts (and the control's metrics).

MLflow run ``finetune``: params (the effective hyperparameters and where they came from),
train_loss every ``tracking.log_every_n_steps`` steps and val metrics per epoch at the global
step (plus an ``epoch`` metric), and the pyfunc text model ``classifier`` (serving.py, models from
code; signature: string column ``text`` -> ``label`` string, ``score`` double).

A NaN/inf train loss stops training at that step, and a val loss that is NaN/inf after training;
both raise TrainingDiverged and write nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from bigmodel_ops.classification.class_weights import class_weight_tensor
from bigmodel_ops.classification.export import save_classifier
from bigmodel_ops.classification.inputs import effective_max_length
from bigmodel_ops.classification.restarts import Restart, pick_best, restart_seed
from bigmodel_ops.classification.soup import Soup, soup_of
from bigmodel_ops.classification.training import (
    FitConfig,
    HyperParams,
    fit_classifier,
    trainable_parameters,
)
from bigmodel_ops.config import Params
from bigmodel_ops.contract import CONTROL_FILE, TOKENIZER_FILE, check_model_dir
from bigmodel_ops.cost import Cost
from bigmodel_ops.cost_callback import CostCallback, cost_of
from bigmodel_ops.errors import ConfigError, TrainingDiverged
from bigmodel_ops.fsutil import publish, write_json_atomic
from bigmodel_ops.model import read_exported_config
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams, stage_splits
from bigmodel_ops.serving import MODEL_ARTIFACT_PATH, log_pyfunc_model
from bigmodel_ops.trainer import MetricsCallback

_logger = logging.getLogger(__name__)


_TUNED_KEYS = {"lr": float, "dropout": float, "weight_decay": float, "batch_size": int}


def resolve_hparams(params: Params, paths: ProjectPaths) -> tuple[HyperParams, str]:
    """(hyperparameters, source): source is "tuned" (best_params.yaml) or "params"."""
    base = hyperparams(params)
    if not params.finetune.use_tuned:
        return base, "params"
    path = paths.best_params
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found, but finetune.use_tuned is true (run the tune stage first, or set "
            "finetune.use_tuned: false to use the finetune values in params.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    values: dict[str, Any] = {}
    for key, kind in _TUNED_KEYS.items():
        raw = data.get(key) if isinstance(data, dict) else None
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ConfigError(f"{path}: {key!r} must be a number, got {raw!r}")
        values[key] = kind(raw)
    if (
        values["lr"] <= 0
        or values["batch_size"] <= 0
        or not 0 <= values["dropout"] < 1
        or values["weight_decay"] < 0
    ):
        raise ConfigError(f"{path}: values out of range: {values}")
    # Other fine-tuning settings a (future) search space tuned are taken too, when present.
    others = {k: v for k, v in data.items() if k not in _TUNED_KEYS and k not in ("value", "trial")}
    try:
        return base.override({**others, **values}), "tuned"
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: {error}") from None


def run(
    params: Params, *, paths: ProjectPaths, quiet: bool = False, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Fine-tune a sequence classifier on the labeled splits from the pretrained backbone.

    Exports and logs the classifier; returns the report. ``callbacks`` are added to the Trainer
    (tests inject faults this way). A NaN/inf train loss stops training at that step and raises
    TrainingDiverged: nothing is exported or logged as a model, and the run is marked FAILED.
    """
    hparams, source = resolve_hparams(params, paths)
    check_model_dir(paths.pretrained_model)
    backbone_config, _ = read_exported_config(paths.pretrained_model)
    fit = fit_config(params)
    # Settings that need the backbone (pooling, freeze_layers, class weights, LoRA targets) fail
    # here, before the run starts.
    n_trainable, n_total = _check_setup(fit, hparams, paths)
    max_length = effective_max_length(params.finetune.max_length, backbone_config)
    splits = stage_splits(params, paths)
    # balanced class weights need every class in the train split: DataError naming the setting
    class_weight_tensor(hparams.class_weights, splits["train"].labels, fit.num_labels)
    with stage_run(params, "finetune", system_metrics=True) as run:
        run.log_params(
            {"hparams": hparams.as_dict(), "hparams_source": source, "max_length_effective": max_length}
        )
        restarts = params.finetune.restarts
        ours = _fit_best(
            fit,
            hparams,
            params=params,
            paths=paths,
            splits=splits,
            run=run,
            control=False,
            source=source,
            callbacks=callbacks,
            quiet=quiet,
        )
        final = ours.val
        report = _report(ours, restarts=restarts, n_trainable=n_trainable, n_total=n_total)
        control, cost = None, ours.cost
        if params.finetune.control == "scratch":
            # Every rank trains the control (DDP needs all of them); rank 0 reports it.
            scratch = _fit_best(
                fit,
                hparams.replace(from_scratch=True),
                params=params,
                paths=paths,
                splits=splits,
                run=run,
                control=True,
                source=source,
                callbacks=(),
                quiet=quiet,
            )
            control, cost = scratch.classifier, _sum_costs(cost, scratch.cost)
            report.update(_control_report(scratch, ours=final, restarts=restarts))
        if not ours.is_global_zero:
            return {}
        run.log_metrics(
            {f"best_{k}": v for k, v in final.items()}
            | {"best_epoch": report["best_epoch"]}
            | {
                k: v
                for k, v in report.items()
                if k.startswith(("control_", "pretrained_gain", "kept_", "soup_"))
                and isinstance(v, int | float)
            }
            # One run each: the stage's cost covers both fits (the same step, later: the latest
            # value). With restarts every fit logged its cost into its child run.
            | (cost.metrics() if cost is not None and restarts == 1 and control is not None else {}),
            step=report["global_step"],
        )
        _export(
            params,
            paths,
            run=run,
            classifier=ours.classifier,
            control=control,
            hparams=hparams,
            report=report,
        )
        write_json_atomic(paths.finetune_report, report)
        _logger.info(
            "finetune: val_acc %.4f, val_loss %.4f -> %s",
            final["val_acc"],
            final["val_loss"],
            paths.classifier,
        )
    return report


@dataclass
class _Best:
    """The kept run of :func:`_fit_best` and what the others reached."""

    classifier: Any  # the kept run's best epoch (or the soup), on the CPU, adapters merged
    restart: Restart  # the kept run (with a soup: the run with the best val_acc)
    tries: list[Restart]  # every run, in order
    cost: Cost | None  # of every run together
    is_global_zero: bool
    soup: Soup | None = None  # finetune.combine_restarts: soup / greedy_soup

    @property
    def val(self) -> dict[str, float]:
        """The exported model's val metrics: the soup's, else the kept run's best epoch's."""
        if self.soup is None:
            return self.restart.val
        return {key: v for key, v in self.soup.val.items() if math.isfinite(v)}  # as Restart.of_fit


def _fit_best(
    fit: FitConfig,
    hparams: HyperParams,
    *,
    params: Params,
    paths: ProjectPaths,
    splits: Any,
    run: Any,
    control: bool,
    source: str,
    callbacks: Sequence[Any],
    quiet: bool,
) -> _Best:
    """Fine-tune ``finetune.restarts`` times (:mod:`~bigmodel_ops.classification.restarts`) and keep
    the run with the best val_acc, or (``finetune.combine_restarts``) a soup of every run's best
    epoch, scored on the val split.

    One run: the classifier logs its curves and cost into the stage's ``run``; the control logs
    nothing (the stage logs the cost of both fits). Several: each fit is a child run
    ``restart-<k>`` (``control-restart-<k>``) with its curves, cost, best val metrics and seed, and
    the stage's run gets ``restart_val_acc`` (``control_restart_val_acc``) at step k. A NaN/inf
    loss or val metric of the classifier raises TrainingDiverged; the control's non-finite val
    metrics are only left out.
    """
    n, combine = params.finetune.restarts, params.finetune.combine_restarts
    prefix = "control_" if control else ""
    tries: list[Restart] = []
    exported: list[Any] = []  # every run's best epoch, when they make a soup
    kept_model, cost, is_zero = None, None, True
    for k in range(n):
        seed = restart_seed(fit.seed, k)
        name = f"{'control-' if control else ''}restart-{k}"
        with (
            run.child_run(name, tags={"bigmodel_ops.seed": seed})
            if n > 1
            else contextlib.nullcontext(None if control else run)
        ) as sink:
            fit_callbacks: list[Any] = [CostCallback()]  # metered, logged by the stage
            if sink is not None:
                metric_callback = MetricsCallback(
                    sink,
                    log_every_n_steps=params.tracking.log_every_n_steps,
                    loss_key="train_loss",
                    lr_key="lr",
                    epoch_key="epoch",
                )
                fit_callbacks = [metric_callback]
            module, trainer = fit_classifier(
                dataclasses.replace(fit, seed=seed),
                model_dir=paths.pretrained_model,
                splits=splits,
                hparams=hparams,
                callbacks=[*fit_callbacks, *(() if control else callbacks)],
                quiet=quiet,
            )
            if not control:
                where = f" (restart {k}, seed {seed})" if n > 1 else ""
                _check_finite(module, hparams, source=source, restart=where)
            tries.append(Restart.of_fit(module, trainer, index=k, seed=seed))
            if n > 1:
                sink.log_metrics(
                    {f"best_{key}": v for key, v in tries[-1].val.items()}
                    | {"best_epoch": tries[-1].best_epoch},
                    step=tries[-1].global_step,
                )
        if n > 1:
            _logger.info(
                "finetune: %s restart %d/%d (seed %d): val_acc %.4f",
                "control" if control else "classifier",
                k + 1,
                n,
                seed,
                tries[-1].val_acc,
            )
            run.log_metrics({f"{prefix}restart_val_acc": tries[-1].val_acc}, step=k)
        cost, is_zero = _sum_costs(cost, cost_of(trainer)), trainer.is_global_zero
        if combine != "best":  # best epoch, adapters merged
            exported.append(module.export_model().cpu())
        elif pick_best(tries) == k:  # the others are dropped
            kept_model = module.export_model().cpu()
        del module, trainer
    soup = None
    if combine != "best":
        soup = soup_of(
            exported,
            kind=combine,
            val=splits["val"],
            num_labels=fit.num_labels,
            batch_size=hparams.batch_size,
            accelerator=fit.accelerator,
        )
        kept_model = soup.model
        _logger.info(
            "finetune: %s %s of restarts %s: val_acc %.4f",
            "control" if control else "classifier",
            combine,
            soup.members,
            soup.val["val_acc"],
        )
    return _Best(kept_model, tries[pick_best(tries)], tries, cost, is_zero, soup)


def _export(
    params: Params,
    paths: ProjectPaths,
    *,
    run: Any,
    classifier: Any,
    control: Any,
    hparams: HyperParams,
    report: dict[str, Any],
) -> None:
    """Publish the classifier (logged as the servable pyfunc model), the control and the report.

    ``outputs/finetune/control`` always exists: the from-scratch control's model folder (scored on
    the test split by the evaluate stage), or only ``control.json`` saying none was trained.
    """
    from bigmodel_ops.tracking.runs import tracking_uri

    backbone_config, _ = read_exported_config(paths.pretrained_model)
    max_length = effective_max_length(params.finetune.max_length, backbone_config)
    tokenizer_file = paths.pretrained_model / TOKENIZER_FILE
    with publish(paths.classifier, paths.control_classifier) as pub:
        # MLflow names the artifact after the folder's own name: keep it clean.
        model_dir = pub.staged(paths.classifier, name=MODEL_ARTIFACT_PATH)
        extra = {"hparams": hparams.as_dict(), "best_epoch": report["best_epoch"]}
        if "kept_restart" in report:  # which of finetune.restarts runs this is
            extra |= {"restart": report["kept_restart"], "seed": report["kept_seed"]}
        if "soup_members" in report:  # or which runs' mean
            extra |= {key: report[key] for key in ("combine_restarts", "soup_members", "soup_seeds")}
        save_classifier(
            classifier,
            model_dir,
            labels=params.prepare.labels,
            max_length=max_length,
            tokenizer_file=tokenizer_file,
            truncation=params.finetune.truncation,
            head_tokens=params.finetune.head_tokens,
            extra={"mlflow_run_id": run.run_id, "mlflow_artifact_path": MODEL_ARTIFACT_PATH, **extra},
        )
        control_dir = pub.staged(paths.control_classifier)
        control_dir.mkdir()
        if control is not None:
            save_classifier(
                control,
                control_dir,
                labels=params.prepare.labels,
                max_length=max_length,
                tokenizer_file=tokenizer_file,
                truncation=params.finetune.truncation,
                head_tokens=params.finetune.head_tokens,
                extra={**extra, "from_scratch": True, "best_epoch": report.get("control_best_epoch", 0)},
            )
        (control_dir / CONTROL_FILE).write_text(json.dumps({"trained": control is not None}) + "\n")
        run.flush()
        info = log_pyfunc_model(
            run, model_dir, tracking_uri=tracking_uri(params.tracking), input_texts=_example_texts(paths)
        )
        run.set_tags({"bigmodel_ops.model_uri": info.model_uri})


def _check_setup(fit: Any, hparams: HyperParams, paths: ProjectPaths) -> tuple[int, int]:
    """Build the model as it will train, once, to fail early on settings that need the backbone;
    returns (trainable, total) parameter counts."""
    from bigmodel_ops.classification.training import prepare_model

    model = prepare_model(paths.pretrained_model, num_labels=fit.num_labels, hparams=hparams)
    # The exported model's size: adapters are merged away, so they do not count.
    total = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    counts = trainable_parameters(model), total
    del model
    return counts


def _report(ours: _Best, *, restarts: int, n_trainable: int, n_total: int) -> dict[str, Any]:
    """The kept run's best val metrics and counters (and, with restarts, which run it is)."""
    kept = ours.restart
    report: dict[str, Any] = {
        **ours.val,
        "best_epoch": kept.best_epoch,
        "epochs": kept.epochs,
        "global_step": kept.global_step,
        "stopped_early": kept.stopped_early,
        "trainable_params": n_trainable,
        "total_params": n_total,
    }
    if restarts > 1:
        report |= {"restarts": restarts, "restart_val_acc": [r.val_acc for r in ours.tries]}
        if ours.soup is None:
            report |= {"kept_restart": kept.index, "kept_seed": kept.seed}
        else:
            report |= _soup_report(ours)
    return report


def _soup_report(best: _Best, *, prefix: str = "") -> dict[str, Any]:
    """How the soup was made (``combine_restarts``) and which runs it holds: ``soup_members``
    (restart indices, in the order they joined), ``soup_seeds``, ``soup_size``; ``prefix``
    ``control_`` for the control's."""
    assert best.soup is not None
    members = [best.tries[i] for i in best.soup.members]
    return {
        f"{prefix}combine_restarts": best.soup.kind,
        f"{prefix}soup_members": [r.index for r in members],
        f"{prefix}soup_seeds": [r.seed for r in members],
        f"{prefix}soup_size": len(members),
    }


def _check_finite(module: Any, hparams: HyperParams, *, source: str, restart: str) -> None:
    """TrainingDiverged when the train loss became NaN/inf, or the val metrics are not finite."""
    if module.diverged_at_step is not None:
        raise TrainingDiverged(
            f"finetune{restart}: the train loss became NaN/inf at step {module.diverged_at_step}; "
            "training stopped there and nothing was exported, logged as a model or registered. Lower "
            f"the learning rate (lr={hparams.lr:g}, from {source}) or raise finetune.warmup_ratio"
        )
    values = {**module.best_val, **module.last_val}
    if not module.best_val or not all(math.isfinite(v) for v in values.values()):
        raise TrainingDiverged(
            f"finetune{restart}: validation metrics are not finite after training ({module.last_val}); "
            f"lower the learning rate (lr={hparams.lr:g}, from {source}) or raise finetune.warmup_ratio"
        )


def _sum_costs(a: Cost | None, b: Cost | None) -> Cost | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b


def _control_report(control: _Best, *, ours: dict[str, float], restarts: int) -> dict[str, Any]:
    """The from-scratch control's best val metrics as ``control_*`` (and, with restarts, which
    run was kept), plus ``pretrained_gain_val_acc`` (ours minus the control's)."""
    best, val = control.restart, control.val
    out: dict[str, Any] = {f"control_{k}": v for k, v in val.items()}
    out["control_best_epoch"] = best.best_epoch
    out["control_epochs"] = best.epochs
    if restarts > 1:
        out["control_restart_val_acc"] = [r.val_acc for r in control.tries]
        if control.soup is None:
            out["control_kept_restart"] = best.index
        else:
            out |= _soup_report(control, prefix="control_")
    if "val_acc" in val:
        out["pretrained_gain_val_acc"] = ours["val_acc"] - val["val_acc"]
    _logger.info(
        "finetune: control (from scratch) val_acc %.4f; pretrained val_acc %.4f",
        val.get("val_acc", math.nan),
        ours["val_acc"],
    )
    return out


def _example_texts(paths: ProjectPaths) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(paths.prepared / "val.parquet", columns=["text"])
    return [text[:200] for text in table["text"].slice(0, 2).to_pylist()]
