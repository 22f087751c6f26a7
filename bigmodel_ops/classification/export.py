"""Export and inference: a fine-tuned classifier as safetensors + config.json + tokenizer.json.

:func:`save_classifier` writes the folder, :func:`load_classifier` reads it back (never pickle) into
a :class:`TextClassifier` used by the evaluate stage and the MLflow pyfunc model (serving.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel_ops.classification.inputs import collate, tokenize_texts
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.contract import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Truncation,
    check_model_dir,
    load_tokenizer,
)
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.model import ModelConfig, TransformerLM, load_weights

CLASSIFIER_FORMAT = "bigmodel_ops.classifier/1"


def save_classifier(
    model: SequenceClassifier,
    directory: Path,
    *,
    labels: Sequence[str],
    max_length: int,
    tokenizer_file: Path,
    truncation: str = "head",
    head_tokens: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model.safetensors (backbone + head), config.json and tokenizer.json into directory.

    config.json records how long texts were cut (:class:`~bigmodel_ops.contract.Truncation`), so
    every consumer of the folder cuts them the same way."""
    import shutil

    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE))  # handles the tied embedding / LM head
    payload = {
        "format": CLASSIFIER_FORMAT,
        "config": model.backbone.config.to_dict(),
        "num_labels": model.num_labels,
        "labels": list(labels),
        **Truncation(int(max_length), truncation, int(head_tokens)).as_config(),
        "pooling": model.pooling,
        "head_dropout": float(model.dropout.p),
        **dict(extra or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


def read_classifier_config(directory: Path) -> dict[str, Any]:
    """The classifier's config.json; CheckpointError naming the file when absent or invalid."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: classifier not found (run the finetune stage first)")
    if not path.is_file():
        raise CheckpointError(f"{path}: classifier config not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"{path}: not a classifier export (format {found!r}, expected {CLASSIFIER_FORMAT!r})"
        )
    for key in ("config", "labels", "max_length", "pooling"):
        if key not in payload:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return payload


@dataclass
class TextClassifier:
    """A loaded classifier: texts in, label ids / scores out (eval mode, no grad)."""

    model: SequenceClassifier
    tokenizer: Any
    labels: list[str]
    config: dict[str, Any]
    truncation: Truncation  # which tokens of a long text it reads

    @property
    def max_length(self) -> int:
        return self.truncation.max_length

    def logits(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) float32 logits, in the order of ``texts``. They are computed in batches
        of batch_size texts of similar length (longest first), so a batch pads little."""
        self.model.eval()
        objective = self.model.backbone.config.objective
        ids = tokenize_texts(
            self.tokenizer, [str(t) for t in texts], objective=objective, truncation=self.truncation
        )
        order = sorted(range(len(ids)), key=lambda row: -len(ids[row]))
        out = torch.empty(len(ids), len(self.labels))
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([(ids[row], 0) for row in rows])
                logits = self.model(batch["idx"].to(device), batch["lengths"].to(device))
                out[rows] = logits.float().cpu()
        return out

    def predict(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[list[str], list[float]]:
        """Predicted label and its softmax probability per text."""
        probs = torch.softmax(self.logits(texts, batch_size=batch_size), dim=-1)
        scores, ids = probs.max(dim=-1) if len(probs) else (torch.empty(0), torch.empty(0, dtype=torch.long))
        return [self.labels[i] for i in ids.tolist()], [float(s) for s in scores.tolist()]


def load_classifier(directory: Path | str) -> TextClassifier:
    """Load an exported classifier (safetensors; no pickle). CheckpointError on bad files."""
    directory = Path(directory)
    check_model_dir(directory, what="classifier", stage="finetune")
    payload = read_classifier_config(directory)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config: {error}") from None
    labels = [str(label) for label in payload["labels"]]
    try:
        # The pooling the classifier was trained with (cls / last / mean / mean_max), never re-derived.
        model = SequenceClassifier(
            TransformerLM(config), num_labels=len(labels), dropout=0.0, pooling=str(payload["pooling"])
        )
    except ValueError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from None
    load_weights(model, directory, what="classifier")
    model.eval()
    return text_classifier(model, directory, payload)


def text_classifier(model: SequenceClassifier, directory: Path, payload: dict[str, Any]) -> TextClassifier:
    """``model`` with the folder's labels, tokenizer and the truncation its config.json records."""
    truncation = Truncation.from_config(payload, source=directory / CONFIG_FILE)
    tokenizer = load_tokenizer(
        directory / TOKENIZER_FILE, max_length=truncation.tokenizer_max_length, error=CheckpointError
    )
    return TextClassifier(
        model=model,
        tokenizer=tokenizer,
        labels=[str(label) for label in payload["labels"]],
        config=payload,
        truncation=truncation,
    )
