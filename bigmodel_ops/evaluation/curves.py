"""Curves of the evaluate stage, as rows for DVC plots and as PNG figures for MLflow.

Each curve is computed once, as a list of dict rows (what DVC's ``simple`` / ``linear`` /
``confusion`` templates read from a JSON list), and the PNGs are drawn from the same rows.
Binary: the curves of the second label (the "positive" class). More classes: the micro-averaged
one-vs-rest curve (every (example, class) pair is one binary decision).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_ROWS = 1000  # longer curves are thinned evenly (the first and last points are kept)


def _binary_view(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if probs.shape[1] == 2:
        return (y_true == 1).astype(int), probs[:, 1]
    onehot = np.eye(probs.shape[1], dtype=int)[y_true]
    return onehot.ravel(), probs.ravel()


def _thin(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    if len(rows) <= MAX_ROWS:
        return rows
    keep = np.unique(np.linspace(0, len(rows) - 1, MAX_ROWS).round().astype(int))
    return [rows[i] for i in keep]


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 1.0  # sklearn's first ROC threshold is inf


def roc_rows(y_true: np.ndarray, probs: np.ndarray) -> list[dict[str, float]]:
    """Rows {fpr, tpr, threshold}; empty when only one class occurs."""
    from sklearn.metrics import roc_curve

    target, score = _binary_view(y_true, probs)
    if len(np.unique(target)) < 2:
        return []
    fpr, tpr, thresholds = roc_curve(target, score)
    return _thin(
        [
            {"fpr": float(f), "tpr": float(t), "threshold": _finite(h)}
            for f, t, h in zip(fpr, tpr, thresholds, strict=True)
        ]
    )


def pr_rows(y_true: np.ndarray, probs: np.ndarray) -> list[dict[str, float]]:
    """Rows {recall, precision, threshold}, by increasing recall."""
    from sklearn.metrics import precision_recall_curve

    target, score = _binary_view(y_true, probs)
    if not target.any():
        return []
    precision, recall, thresholds = precision_recall_curve(target, score)
    thresholds = np.append(thresholds, 1.0)  # the last point (recall 0, precision 1) has none
    rows = [
        {"recall": float(r), "precision": float(p), "threshold": float(t)}
        for r, p, t in zip(recall, precision, thresholds, strict=True)
    ]
    return _thin(rows[::-1])


def confusion_rows(y_true: np.ndarray, preds: np.ndarray, labels: Sequence[str]) -> list[dict[str, str]]:
    """Rows {actual, predicted} (label names), one per example: DVC's ``confusion`` template."""
    return [
        {"actual": labels[a], "predicted": labels[p]}
        for a, p in zip(y_true.tolist(), preds.tolist(), strict=True)
    ]


def confusion_counts(y_true: np.ndarray, preds: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) counts; rows are true labels, columns predictions."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, preds, labels=list(range(n_labels)))


def _figure(path: Path, draw, *, size: tuple[float, float] = (4.5, 4.0)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=size)
    try:
        draw(axes)
        figure.savefig(path, bbox_inches="tight", dpi=100)
    finally:
        plt.close(figure)


def plot_curve(
    path: Path,
    series: dict[str, list[dict[str, float]]],
    *,
    x: str,
    y: str,
    title: str,
    diagonal: bool = False,
) -> None:
    """A line per named series of rows (model, baseline), ``x`` against ``y``."""

    def draw(axes) -> None:
        for name, rows in series.items():
            axes.plot(
                [r[x] for r in rows], [r[y] for r in rows], marker="." if len(rows) < 30 else None, label=name
            )
        if diagonal:
            axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel(x)
        axes.set_ylabel(y)
        axes.set_title(title)
        axes.legend(loc="best")

    _figure(path, draw)


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    size = max(3.0, 0.6 * len(labels) + 2)

    def draw(axes) -> None:
        axes.imshow(cm, cmap="Blues")
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        peak = int(cm.max()) if cm.size else 0
        for i in range(len(labels)):
            for j in range(len(labels)):
                color = "white" if cm[i, j] > peak / 2 else "black"
                axes.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=color)
        axes.set_title("confusion matrix (test)")

    _figure(path, draw, size=(size, size))
