"""Scoring a classifier on a labeled split: predictions, metrics, confusion plot, predictions table.

The library of the ``evaluate`` stage (:mod:`bigmodel_ops.pipeline.evaluate`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bigmodel_ops.classification.metrics import confusion_matrix, metrics_from_confusion
from bigmodel_ops.progress import progress


def metric_key(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def evaluate_texts(
    classifier: Any, texts: list[str], targets: torch.Tensor, *, batch_size: int, quiet: bool
) -> dict[str, Any]:
    """Predictions and metrics for texts with true class ids ``targets``."""
    chunks = []
    for start in progress(
        range(0, len(texts), batch_size),
        desc="evaluate",
        total=-(-len(texts) // batch_size),
        unit="batch",
        quiet=quiet,
    ):
        chunks.append(classifier.logits(texts[start : start + batch_size], batch_size=batch_size))
    logits = torch.cat(chunks)
    probs = torch.softmax(logits, dim=-1)
    scores, preds = probs.max(dim=-1)
    cm = confusion_matrix(preds, targets, len(classifier.labels))
    summary = metrics_from_confusion(cm)
    metrics: dict[str, float] = {
        "test_acc": summary["accuracy"],
        "test_f1": summary["macro_f1"],
        "test_loss": float(F.cross_entropy(logits, targets)),
    }
    for label, precision, recall in zip(
        classifier.labels, summary["precision"], summary["recall"], strict=True
    ):
        metrics[f"test_precision_{metric_key(label)}"] = precision
        metrics[f"test_recall_{metric_key(label)}"] = recall
    return {"metrics": metrics, "confusion": cm, "preds": preds, "scores": scores}


def plot_confusion(cm: torch.Tensor, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    try:
        axes.imshow(cm.numpy(), cmap="Blues")
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        peak = int(cm.max()) if cm.numel() else 0
        for (i, j), count in zip(
            ((i, j) for i in range(len(labels)) for j in range(len(labels))),
            cm.flatten().tolist(),
            strict=True,
        ):
            axes.text(
                j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black"
            )
        axes.set_title("confusion matrix (test)")
        figure.savefig(path, bbox_inches="tight", dpi=100)
    finally:
        plt.close(figure)


def write_predictions(
    path: Path,
    texts: list[str],
    labels: list[str],
    targets: torch.Tensor,
    preds: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array([labels[i] for i in targets.tolist()], pa.string()),
            "pred": pa.array([labels[i] for i in preds.tolist()], pa.string()),
            "score": pa.array(scores.tolist(), pa.float32()),
        }
    )
    pq.write_table(table, path)
