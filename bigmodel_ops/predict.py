"""`bigmodel-ops predict`: classify texts with a registered model and print label and probabilities.

The model is ``models:/<evaluate.registered_model>@<evaluate.promote_alias>`` (by default
``models:/<project>-classifier@champion``, the version the evaluate stage's gate promoted) in the
project's tracking store (MLFLOW_TRACKING_URI wins over ``tracking.uri``), or any MLflow model URI
given with ``--model``. It is downloaded, checked (:func:`bigmodel_ops.serving.verify_model_dir`:
our models-from-code pyfunc, no pickle-format file, files equal to the digest recorded when it was
logged; registry and run URIs must have one) and only then loaded with ``mlflow.pyfunc.load_model``:
exactly what ``mlflow models serve`` serves. ``--model`` may also name an exported classifier folder
(``outputs/finetune/model``: safetensors + config.json + tokenizer.json, what ``dvc pull`` brings
to another machine), read without MLflow's store, with the same pyfunc code.

Texts come from the command line (one argument per text) or from ``--file`` (one text per line;
``-`` reads stdin). An empty or whitespace-only text is an error naming it (exit 2), checked before
the model is loaded. Output, one line per text: ``label  score  prob_a=... prob_b=...  | text``, or
with ``--json`` one JSON object per line: ``{"text", "label", "score", "probabilities": {label:
p}}``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from bigmodel_ops.config import Params
from bigmodel_ops.errors import BigModelOpsError, CheckpointError, DataError
from bigmodel_ops.serving import MODEL_DIGEST_TAG

PROB_PREFIX = "prob_"  # bigmodel_ops.pyfunc_model.PROB_PREFIX (not imported: it imports mlflow)
_SHOWN_CHARS = 80


class PredictInputError(DataError):
    """A text given to predict cannot be classified (empty, or the file is unreadable)."""


def default_model_uri(params: Params) -> str:
    """``models:/<registered model>@<promote alias>``: the model the evaluate stage promotes."""
    name = params.evaluate.registered_model or f"{params.project.name}-classifier"
    return f"models:/{name}@{params.evaluate.promote_alias}"


def read_texts(texts: Sequence[str] = (), file: Path | None = None) -> list[str]:
    """The texts to classify: ``texts``, then the lines of ``file`` (``-`` is stdin).

    PredictInputError when there is none, or one is empty or whitespace only (naming it).
    """
    result: list[str] = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise PredictInputError(
                f"text argument {index + 1} is empty or whitespace only; there is nothing to classify"
            )
        result.append(text)
    if file is not None:
        source = "stdin" if str(file) == "-" else str(file)
        try:
            content = sys.stdin.read() if str(file) == "-" else Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PredictInputError(f"{source}: cannot read texts: {error}") from None
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                raise PredictInputError(
                    f"{source}: line {number} is empty or whitespace only; give one non-empty text per line"
                )
            result.append(line)
    if not result:
        raise PredictInputError("no text to classify: give texts as arguments or --file FILE")
    return result


class _FolderModel:
    """Our pyfunc model's ``predict`` over a classifier folder (no MLflow store involved)."""

    def __init__(self, folder: Path) -> None:
        from types import SimpleNamespace

        from bigmodel_ops.pyfunc_model import ARTIFACT_KEY, TextClassifierModel

        self._model = TextClassifierModel()
        self._model.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(folder)}))

    def predict(self, frame: Any) -> Any:
        return self._model.predict(None, frame)


def load_model(model_uri: str, *, tracking_uri: str) -> Any:
    """The pyfunc model at ``model_uri``, verified before it loads; CheckpointError with the reason
    (MLflow's, or the verification's) when it cannot load."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from bigmodel_ops.serving import fluent_tracking_uri, recorded_digest, verify_model_dir

    folder = Path(model_uri)
    if folder.is_dir() and not (folder / "MLmodel").exists():
        return _FolderModel(folder)  # load_classifier: safetensors only, CheckpointError naming files
    try:
        with (
            fluent_tracking_uri(tracking_uri),
            tempfile.TemporaryDirectory(prefix="bigmodel-ops-predict-") as tmp,
        ):
            local = Path(
                mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp, tracking_uri=tracking_uri)
            )
            expected = recorded_digest(MlflowClient(tracking_uri), model_uri)
            if expected is None and model_uri.startswith(("models:/", "runs:/")):
                raise CheckpointError(
                    f"{model_uri}: refused: no {MODEL_DIGEST_TAG} recorded for it in the tracking store, so "
                    "its code cannot be checked before it runs; log it with bigmodel_ops (the finetune stage)"
                )
            verify_model_dir(local, expected_digest=expected, model_uri=model_uri)
            return mlflow.pyfunc.load_model(str(local))
    except (MlflowException, OSError) as error:
        reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
        hint = (
            " (run the evaluate stage to register and promote a model, or pass --model URI)"
            if model_uri.startswith("models:/")
            else ""
        )
        raise CheckpointError(f"cannot load model {model_uri!r}: {reason}{hint}") from None


def classify(model: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """One record per text: text, label, score and (for our pyfunc) probabilities {label: p}."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        out = model.predict(pd.DataFrame({"text": list(texts)}))
    except MlflowException as error:
        raise BigModelOpsError(f"the model refused the input: {error.message}") from None
    prob_columns = [c for c in out.columns if str(c).startswith(PROB_PREFIX)]
    records = []
    for text, (_, row) in zip(texts, out.iterrows(), strict=True):
        record: dict[str, Any] = {"text": text, "label": str(row["label"]), "score": float(row["score"])}
        if prob_columns:
            record["probabilities"] = {c[len(PROB_PREFIX) :]: float(row[c]) for c in prob_columns}
        records.append(record)
    return records


def format_record(record: dict[str, Any]) -> str:
    """The readable line of one prediction."""
    text = record["text"].replace("\n", " ")
    shown = text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
    probs = "  ".join(f"{label}={p:.4f}" for label, p in record.get("probabilities", {}).items())
    return f"{record['label']}  {record['score']:.4f}  {probs}  | {shown}".replace("    |", "  |")


def predict(
    params: Params,
    *,
    texts: Sequence[str] = (),
    file: Path | None = None,
    model_uri: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Classify texts with the registered champion model (or --model URI); print label and probabilities.

    Returns 0. Texts are checked before the model is loaded; see the module docstring.
    """
    from bigmodel_ops.tracking.runs import tracking_uri

    out = out or sys.stdout
    chosen = read_texts(texts, file)
    model = load_model(model_uri or default_model_uri(params), tracking_uri=tracking_uri(params.tracking))
    for record in classify(model, chosen):
        out.write((json.dumps(record) if as_json else format_record(record)) + "\n")
    out.flush()
    return 0
