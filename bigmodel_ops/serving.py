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

Loading a model from code runs its code, so a model is only as trusted as its files. When it is
logged, :func:`log_pyfunc_model` records :func:`model_digest` (sha256 over every file of the
logged folder) as the tag ``bigmodel_ops.model_sha256`` of the logged model, in the tracking
database. Before anything of a downloaded model is imported or unpickled, :func:`verify_model_dir`
refuses a folder whose MLmodel is not our models-from-code pyfunc (e.g. one rewritten to load a
cloudpickled ``python_model``), that holds any pickle-format file, or whose files no longer match
the recorded digest (code, weights or MLmodel changed in the artifact store after logging).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigmodel_ops.errors import CheckpointError

MODEL_ARTIFACT_PATH = "classifier"
MODEL_DIGEST_TAG = "bigmodel_ops.model_sha256"
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
# Files that unpickle (or torch.load) when read: never part of a model we log.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib", ".dill", ".pt", ".pth", ".ckpt", ".bin")
# Written by the registry into the artifact folder after logging: not part of the digest.
_REGISTRY_FILES = ("registered_model_meta",)
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
    """MLflow's global tracking URI set to ``uri`` for the block, then put back exactly as it was,
    MLFLOW_TRACKING_URI included: ``mlflow.set_tracking_uri`` also writes that variable, so
    restoring through it would point later callers in the process (and its children) at
    whatever store was global before, not at the one the environment named."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = previous
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


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
        info = Model.log(
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
    _record_digest(run.client, info, tracking_uri=tracking_uri)
    return info


def model_digest(model_dir: Path) -> str:
    """sha256 over the relative path and bytes of every file of a model folder, in path order
    (the registry's ``registered_model_meta``, written after logging, excluded)."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative in _REGISTRY_FILES:
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _record_digest(client: Any, info: Any, *, tracking_uri: str) -> None:
    """Tag the logged model with the digest of its files as stored (read back from the store)."""
    import tempfile

    import mlflow

    # models:/ URIs resolve through MLflow's global tracking URI, whatever tracking_uri= says.
    with fluent_tracking_uri(tracking_uri), tempfile.TemporaryDirectory(prefix="bigmodel-ops-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp, tracking_uri=tracking_uri)
        client.set_logged_model_tags(info.model_id, {MODEL_DIGEST_TAG: model_digest(Path(local))})


def recorded_digest(client: Any, model_uri: str) -> str | None:
    """The digest recorded when the model at ``model_uri`` was logged: for ``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``models:/<model id>`` and ``runs:/<run id>/<name>``; None for other
    URIs (a local folder) and for models logged without one."""
    from mlflow.exceptions import MlflowException

    model_id = None
    try:
        if model_uri.startswith("models:/"):
            ref = model_uri[len("models:/") :].strip("/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                model_id = _version_model_id(client.get_model_version_by_alias(name, alias))
            elif "/" in ref:
                name, version = ref.rsplit("/", 1)
                model_id = _version_model_id(client.get_model_version(name, version))
            else:
                model_id = ref
        elif model_uri.startswith("runs:/"):
            run_id, _, name = model_uri[len("runs:/") :].partition("/")
            experiment = client.get_run(run_id).info.experiment_id
            found = client.search_logged_models(
                [experiment], filter_string=f"source_run_id = '{run_id}' AND name = '{name.strip('/')}'"
            )
            model_id = found[0].model_id if found else None
        if model_id is None:
            return None
        return client.get_logged_model(model_id).tags.get(MODEL_DIGEST_TAG)
    except MlflowException:
        return None


def _version_model_id(version: Any) -> str | None:
    """The logged model behind a registered version (its ``model_id``, which some stores leave
    empty, else its ``models:/<id>`` source); None for a version made from a run's artifact folder."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/") :] if source.startswith("models:/m-") else None


def verify_model_dir(model_dir: Path, *, expected_digest: str | None, model_uri: str) -> None:
    """Refuse (CheckpointError naming the file) a model folder that is not our models-from-code
    pyfunc, holds a pickle-format file, or differs from ``expected_digest``. Reads only bytes and
    YAML (safe_load): nothing of the model runs. ``expected_digest=None`` skips the digest check
    (a local folder, which is as trusted as the disk it is on)."""
    import yaml

    root = Path(model_dir)
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise CheckpointError(f"{model_uri}: no MLmodel file in {root}; not an MLflow model folder")
    try:
        flavors = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{mlmodel}: not a valid MLmodel file: {error}") from None
    pyfunc = flavors.get("python_function") or {}
    if set(flavors) != {"python_function"} or pyfunc.get("loader_module") != CODE_MODEL_LOADER:
        raise CheckpointError(
            f"{mlmodel}: refused: not a bigmodel_ops models-from-code pyfunc (flavors {sorted(flavors)}, "
            f"loader_module {pyfunc.get('loader_module')!r}); loading it could unpickle or run foreign code"
        )
    if "python_model" in pyfunc:
        raise CheckpointError(
            f"{mlmodel}: refused: python_function names a pickled python_model ({pyfunc['python_model']!r})"
        )
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: refused: a pickle-format file inside the model {model_uri}")
    if expected_digest is not None:
        actual = model_digest(root)
        if actual != expected_digest:
            raise CheckpointError(
                f"{model_uri}: refused: its files changed after it was logged (sha256 {actual[:12]}..., "
                f"recorded {expected_digest[:12]}... in tag {MODEL_DIGEST_TAG}); re-run the stage that logs it"
            )
