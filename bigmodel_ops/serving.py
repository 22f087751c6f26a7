"""Packaging the classifier as a servable MLflow pyfunc model (models from code, no pickle).

:func:`log_pyfunc_model` logs :mod:`bigmodel_ops.pyfunc_model` as the model's code, the exported
classifier folder (safetensors + config.json + tokenizer.json) as its artifact, and the
bigmodel_ops package as code. Its requirements are only what inference needs (mlflow, torch,
tokenizers, safetensors, pandas and numpy, which bigmodel_ops.classification imports directly):
the served model imports neither Lightning nor peft nor optuna (tests/test_serving.py checks it
in a fresh process). pydantic is not required by our code, only by MLflow itself.

The signature says what the model answers: a string column ``text`` in; ``label`` (string),
``score`` (double) and one ``prob_<label>`` (double) per training label out, the labels read from
the classifier's config.json (see :mod:`bigmodel_ops.pyfunc_model`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_ARTIFACT_PATH = "classifier"
# What the served model imports (pyfunc_model -> classification.export/inputs -> model, contract).
INFERENCE_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "pandas", "numpy")


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in INFERENCE_PACKAGES:
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
    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        with fluent_tracking_uri(uri):
            yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then put back exactly as it was
    (unset stays unset, so MLFLOW_TRACKING_URI keeps deciding for later callers in the process)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is None and hasattr(utils, "_tracking_uri"):
            utils._tracking_uri = None
        else:
            mlflow.set_tracking_uri(previous)


def log_pyfunc_model(run: Any, model_dir: Path, *, tracking_uri: str, input_texts: list[str]) -> Any:
    """Log the classifier folder as the servable pyfunc model ``classifier`` of ``run``.

    Models from code: pyfunc_model.py is the model, the folder is its artifact, the bigmodel_ops
    package travels as code, requirements are pinned to the installed versions (no inference
    subprocess). The output schema has one ``prob_<label>`` column per label of the folder's
    config.json. Returns MLflow's ModelInfo.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    import bigmodel_ops
    from bigmodel_ops import pyfunc_model
    from bigmodel_ops.classification.export import read_classifier_config

    labels = [str(label) for label in read_classifier_config(Path(model_dir))["labels"]]
    # The example must be servable: empty texts are refused by the model.
    input_texts = [text for text in input_texts if isinstance(text, str) and text.strip()] or [
        "a short example text"
    ]

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema(
            [ColSpec("string", "label"), ColSpec("double", "score")]
            + [ColSpec("double", column) for column in pyfunc_model.output_columns(labels)[2:]]
        ),
    )
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    with _fluent_target(tracking_uri, experiment_id):
        return Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT_PATH,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run.run_id,
            python_model=str(Path(pyfunc_model.__file__)),
            artifacts={pyfunc_model.ARTIFACT_KEY: str(model_dir)},
            code_paths=[str(Path(bigmodel_ops.__file__).parent)],
            signature=signature,
            input_example=pd.DataFrame({"text": input_texts}),
            pip_requirements=_pip_requirements(),
        )
