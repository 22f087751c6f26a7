"""The MLflow pyfunc text classifier (a models-from-code file).

The finetune stage logs this file as ``python_model`` with the exported classifier folder
(model.safetensors + config.json + tokenizer.json) as the artifact ``classifier``, and the
bigmodel_ops package as code, so a served model needs no pickle at all: MLflow runs this file,
which builds the model and loads the weights with safetensors.

Input: a DataFrame with a string column ``text`` (a list of strings or a Series also works).
Output: a DataFrame with one row per text and the columns

- ``label`` (str): the most probable of the training labels;
- ``score`` (float): its softmax probability;
- ``prob_<label>`` (float), one per training label in the classifier's label order: the softmax
  probability of that label (the row sums to 1; ``label`` is the argmax).

One column per label rather than a list column: every column is a scalar in the signature, so
the scoring server's JSON, a CSV of the output and a DataFrame all read the same way. Texts longer
than the classifier's ``max_length`` tokens are truncated as it was trained (its config.json's
``truncation``: head, tail or head_tail); an empty input gives an empty frame
with these columns. A missing, empty or whitespace-only text, or a non-string value, is refused
with an ``MlflowException`` (INVALID_PARAMETER_VALUE, so ``mlflow models serve`` answers 400)
naming the row: there is nothing to classify.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "classifier"
BATCH_SIZE = 64
PROB_PREFIX = "prob_"


def output_columns(labels: Sequence[str]) -> list[str]:
    """The output's columns for a classifier of these labels: label, score, prob_<label>..."""
    return ["label", "score", *(f"{PROB_PREFIX}{label}" for label in labels)]


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_texts(values: Sequence[Any]) -> list[str]:
    """The texts, or an MlflowException (INVALID_PARAMETER_VALUE) naming the first bad row: a
    missing value, a non-string, or an empty / whitespace-only text."""
    texts = []
    for row, value in enumerate(values):
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            raise _invalid(f"row {row}: 'text' is missing (null); send a non-empty string per row")
        if not isinstance(value, str):
            raise _invalid(f"row {row}: 'text' must be a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise _invalid(f"row {row}: 'text' is empty or whitespace only; there is nothing to classify")
        texts.append(value)
    return texts


class TextClassifierModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from bigmodel_ops.classification.export import load_classifier

        self._classifier = load_classifier(context.artifacts[ARTIFACT_KEY])

    # pd.DataFrame is a hint MLflow derives no signature or validation from (it would otherwise
    # warn "Add type hints to the `predict` method" whenever this class is defined): the logged
    # signature (string column `text` -> label, score, prob_<label>...) stays the contract, and
    # MLflow's schema enforcement hands predict a DataFrame. A Series or a list, passed directly,
    # also work.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise _invalid(f"input needs a 'text' column, got columns {list(model_input.columns)}")
            values = model_input["text"].tolist()
        elif isinstance(model_input, pd.Series):
            values = model_input.tolist()
        elif isinstance(model_input, str):
            values = [model_input]
        else:
            values = list(model_input)
        texts = check_texts(values)
        batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        classifier = self._classifier
        labels = classifier.labels
        columns = output_columns(labels)
        if not texts:
            return pd.DataFrame(
                {c: pd.Series([], dtype=object if c == "label" else "float64") for c in columns}
            )
        import torch

        probs = torch.softmax(classifier.logits(texts, batch_size=batch_size).double(), dim=-1)
        scores, ids = probs.max(dim=-1)
        frame = {
            "label": pd.Series([labels[i] for i in ids.tolist()], dtype=object),
            "score": pd.Series(scores.tolist(), dtype="float64"),
        }
        for index, column in enumerate(columns[2:]):
            frame[column] = pd.Series(probs[:, index].tolist(), dtype="float64")
        return pd.DataFrame(frame)


mlflow.models.set_model(TextClassifierModel())
