"""Fine-tune a sequence classifier on the labeled splits from the pretrained backbone.

Hyperparameters: ``finetune`` params, with lr / dropout / weight_decay / batch_size taken from
``<tune_dir>/best_params.json`` when ``finetune.use_tuned`` (a ConfigError naming the file when it
is missing or malformed). Training runs ``finetune.max_epochs`` epochs on the train split with the
val split evaluated after each epoch; the active sizing profile decides devices and precision.

Outputs, written only after training finished and the model was logged:

- ``paths.classifier/``: model.safetensors (backbone + head), config.json (model config,
  num_labels, labels, max_length, pooling, ``mlflow_run_id`` / ``mlflow_artifact_path`` of the
  logged model), tokenizer.json; built in a temporary folder next to it and renamed into place;
- ``paths.finetune_report``: final val_acc / val_loss / val_f1 and the epochs trained.

MLflow run ``finetune``: params (the effective hyperparameters and where they came from),
train_loss every ``tracking.log_every_n_steps`` steps and val metrics per epoch at the global
step (plus an ``epoch`` metric), and the pyfunc text model ``classifier`` (serving.py, models from
code; signature: string column ``text`` -> ``label`` string, ``score`` double).

A val loss that is NaN/inf after training raises TrainingDiverged and writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from bigmodel_ops.classification.export import save_classifier
from bigmodel_ops.classification.inputs import effective_max_length, load_splits
from bigmodel_ops.classification.training import HyperParams, fit_classifier
from bigmodel_ops.config import Params
from bigmodel_ops.contract import TOKENIZER_FILE, check_model_dir
from bigmodel_ops.errors import ConfigError, TrainingDiverged
from bigmodel_ops.fsutil import publish, write_json_atomic
from bigmodel_ops.model import read_exported_config
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run
from bigmodel_ops.pipeline._finetuning import fit_config
from bigmodel_ops.serving import MODEL_ARTIFACT_PATH, log_pyfunc_model
from bigmodel_ops.trainer import MetricsCallback

_logger = logging.getLogger(__name__)

_TUNED_KEYS = {"lr": float, "dropout": float, "weight_decay": float, "batch_size": int}


def resolve_hparams(params: Params, paths: ProjectPaths) -> tuple[HyperParams, str]:
    """(hyperparameters, source): source is "tuned" (best_params.json) or "params"."""
    ft = params.finetune
    if not ft.use_tuned:
        return HyperParams(
            lr=ft.lr, dropout=ft.dropout, weight_decay=ft.weight_decay, batch_size=ft.batch_size
        ), "params"
    path = paths.best_params
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found, but finetune.use_tuned is true (run the tune stage first, or set "
            "finetune.use_tuned: false to use the finetune values in params.yaml)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
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
    return HyperParams(**values), "tuned"


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune a sequence classifier on the labeled splits from the pretrained backbone.

    Exports and logs the classifier; returns the report.
    """
    from bigmodel_ops.tracking.runs import tracking_uri

    hparams, source = resolve_hparams(params, paths)
    check_model_dir(paths.pretrained_model)
    backbone_config, _ = read_exported_config(paths.pretrained_model)
    max_length = effective_max_length(params.finetune.max_length, backbone_config)
    splits = load_splits(
        prepared=paths.prepared,
        model_dir=paths.pretrained_model,
        labels=params.prepare.labels,
        max_length=params.finetune.max_length,
    )
    with stage_run(params, "finetune", system_metrics=True) as run:
        run.log_params(
            {"hparams": hparams.as_dict(), "hparams_source": source, "max_length_effective": max_length}
        )
        metrics = MetricsCallback(
            run,
            log_every_n_steps=params.tracking.log_every_n_steps,
            loss_key="train_loss",
            lr_key="lr",
            epoch_key="epoch",
        )
        module, trainer = fit_classifier(
            fit_config(params),
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hparams,
            max_epochs=params.finetune.max_epochs,
            callbacks=[metrics],
            quiet=quiet,
        )
        if not trainer.is_global_zero:
            return {}
        final = dict(module.last_val)
        if not all(math.isfinite(v) for v in final.values()) or not final:
            raise TrainingDiverged(
                f"finetune: validation metrics are not finite after training ({final}); lower the "
                f"learning rate (lr={hparams.lr:g}, from {source}) or raise finetune.warmup_ratio"
            )
        report = {**final, "epochs": int(trainer.current_epoch), "global_step": int(trainer.global_step)}
        with publish(paths.classifier) as pub:
            # MLflow names the artifact after the folder's own name: keep it clean.
            model_dir = pub.staged(paths.classifier, name=MODEL_ARTIFACT_PATH)
            module.model.cpu()
            save_classifier(
                module.model,
                model_dir,
                labels=params.prepare.labels,
                max_length=max_length,
                tokenizer_file=paths.pretrained_model / TOKENIZER_FILE,
                extra={
                    "mlflow_run_id": run.run_id,
                    "mlflow_artifact_path": MODEL_ARTIFACT_PATH,
                    "hparams": hparams.as_dict(),
                },
            )
            run.flush()
            info = log_pyfunc_model(
                run, model_dir, tracking_uri=tracking_uri(params.tracking), input_texts=_example_texts(paths)
            )
            run.set_tags({"bigmodel_ops.model_uri": info.model_uri})
        write_json_atomic(paths.finetune_report, report)
        _logger.info(
            "finetune: val_acc %.4f, val_loss %.4f -> %s",
            final["val_acc"],
            final["val_loss"],
            paths.classifier,
        )
    return report


def _example_texts(paths: ProjectPaths) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(paths.prepared / "val.parquet", columns=["text"])
    return [text[:200] for text in table["text"].slice(0, 2).to_pylist()]
