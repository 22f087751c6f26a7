"""The MLflow pyfunc text classifier (a models-from-code file).

The finetune stage logs this file as ``python_model`` with the exported classifier folder
(model.safetensors + config.json + tokenizer.json) as the artifact ``classifier``, and the
bigmodel_ops package as code, so a served model needs no pickle at all: MLflow runs this file,
which builds the model and loads the weights with safetensors.

Input: a DataFrame with a string column ``text`` (a list of strings or a Series also works).
Output: a DataFrame with one row per text: ``label`` (str, one of the training labels) and
``score`` (float, the softmax probability of that label). Texts longer than the classifier's
``max_length`` tokens are truncated; an empty input gives an empty frame.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "classifier"
BATCH_SIZE = 64


class TextClassifierModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from bigmodel_ops.classification.export import load_classifier

        self._classifier = load_classifier(context.artifacts[ARTIFACT_KEY])

    # pd.DataFrame is a hint MLflow derives no signature or validation from (it would otherwise
    # warn "Add type hints to the `predict` method" whenever this class is defined): the logged
    # signature (string column `text` -> label, score) stays the contract, and MLflow's schema
    # enforcement hands predict a DataFrame. A Series or a list, passed directly, also work.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"input needs a 'text' column, got columns {list(model_input.columns)}")
            texts = model_input["text"].astype(str).tolist()
        elif isinstance(model_input, pd.Series):
            texts = model_input.astype(str).tolist()
        else:
            texts = [str(text) for text in model_input]
        batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        labels, scores = self._classifier.predict(texts, batch_size=batch_size)
        return pd.DataFrame(
            {"label": pd.Series(labels, dtype=object), "score": pd.Series(scores, dtype="float64")}
        )


mlflow.models.set_model(TextClassifierModel())
