"""Tables of the evaluate stage: per-class metrics, the most confident errors, all predictions."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def worst_errors(
    texts: Sequence[str], y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], *, limit: int
) -> list[dict[str, Any]]:
    """The ``limit`` misclassified examples with the highest confidence in their wrong prediction:
    rows {text, label, prediction, confidence, label_probability}, most confident first."""
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != y_true)
    confidence = probs.max(axis=1)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return [
        {
            "text": texts[i],
            "label": labels[y_true[i]],
            "prediction": labels[preds[i]],
            "confidence": round(float(confidence[i]), 6),
            "label_probability": round(float(probs[i, y_true[i]]), 6),
        }
        for i in order.tolist()
    ]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """CSV with a header, also when there are no rows."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_predictions(
    path: Path, texts: Sequence[str], y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]
) -> None:
    """Parquet: text, label, pred, score (the predicted label's probability), one prob_<label> column
    per label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    preds = probs.argmax(axis=1)
    columns = {
        "text": pa.array(list(texts), pa.string()),
        "label": pa.array([labels[i] for i in y_true.tolist()], pa.string()),
        "pred": pa.array([labels[i] for i in preds.tolist()], pa.string()),
        "score": pa.array(probs.max(axis=1).tolist(), pa.float32()),
    }
    for i, label in enumerate(labels):
        columns[f"prob_{label}"] = pa.array(probs[:, i].tolist(), pa.float32())
    pq.write_table(pa.table(columns), path)
