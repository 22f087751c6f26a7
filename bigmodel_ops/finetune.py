"""The finetune stage: train the sequence classifier and export it (files + servable MLflow model).

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

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigmodel_ops.classification import (
    TOKENIZER_FILE,
    HyperParams,
    MetricsLogger,
    effective_max_length,
    fit_classifier,
    load_splits,
    save_classifier,
)
from bigmodel_ops.config import Params
from bigmodel_ops.errors import ConfigError, TrainingDiverged
from bigmodel_ops.fsutil import replace_dir, write_json_atomic
from bigmodel_ops.model import read_exported_config
from bigmodel_ops.paths import ProjectPaths

_logger = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "classifier"
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


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in (
        "mlflow",
        "torch",
        "lightning",
        "tokenizers",
        "safetensors",
        "numpy",
        "pandas",
        "pyarrow",
        "pydantic",
        "pyyaml",
    ):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


@contextlib.contextmanager
def _fluent_target(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent state at our store and experiment while a model is logged.

    ``Model.log`` resolves the store from MLflow's global tracking URI and files the LoggedModel
    under the *active* experiment, not the run's. MLFLOW_TRACKING_URI in the environment (how
    tests and CI select a store) wins over params, so then nothing global is changed.
    """
    import mlflow

    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


def log_pyfunc_model(run: Any, params: Params, model_dir: Path, *, input_texts: list[str]) -> Any:
    """Log the classifier folder as the servable pyfunc model ``classifier`` of ``run``.

    Models from code: serving.py is the model, the folder is its artifact, the bigmodel_ops
    package travels as code, requirements are pinned to the installed versions (no inference
    subprocess). Returns MLflow's ModelInfo.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    import bigmodel_ops
    from bigmodel_ops import serving
    from bigmodel_ops.tracking.runs import tracking_uri

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    with _fluent_target(tracking_uri(params), experiment_id):
        return Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT_PATH,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run.run_id,
            python_model=str(Path(serving.__file__)),
            artifacts={serving.ARTIFACT_KEY: str(model_dir)},
            code_paths=[str(Path(bigmodel_ops.__file__).parent)],
            signature=signature,
            input_example=pd.DataFrame({"text": input_texts}),
            pip_requirements=_pip_requirements(),
        )


def run_finetune(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune, export and log the classifier; return the report."""
    from bigmodel_ops.tracking import stage_run

    hparams, source = resolve_hparams(params, paths)
    splits = load_splits(params, prepared=paths.prepared, model_dir=paths.pretrained_model)
    backbone_config, _ = read_exported_config(paths.pretrained_model)
    max_length = effective_max_length(params, backbone_config)

    with stage_run(params, stage="finetune", system_metrics=True) as run:
        run.log_params(
            {"hparams": hparams.as_dict(), "hparams_source": source, "max_length_effective": max_length}
        )
        module, trainer = fit_classifier(
            params,
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hparams,
            max_epochs=params.finetune.max_epochs,
            callbacks=[MetricsLogger(run, every_n_steps=params.tracking.log_every_n_steps)],
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

        target = paths.classifier
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            # The folder's own name is what MLflow shows for the artifact: keep it clean.
            model_dir = staging / MODEL_ARTIFACT_PATH
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
            info = log_pyfunc_model(run, params, model_dir, input_texts=_example_texts(paths))
            run.set_tags({"bigmodel_ops.model_uri": info.model_uri})
            replace_dir(model_dir, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_json_atomic(paths.finetune_report, report)
        _logger.info(
            "finetune: val_acc %.4f, val_loss %.4f -> %s", final["val_acc"], final["val_loss"], target
        )
    return report


def _example_texts(paths: ProjectPaths) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(paths.prepared / "val.parquet", columns=["text"])
    return [text[:200] for text in table["text"].slice(0, 2).to_pylist()]
