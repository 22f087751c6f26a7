"""Test-split metrics from true class ids and predicted probabilities (scikit-learn).

Names (``prefix`` is ``test_`` for the model, ``baseline_test_`` for the baseline):
``<prefix>acc``, ``<prefix>f1`` (macro), ``<prefix>f1_micro``, ``<prefix>roc_auc`` (binary: of the
second label; more classes: one-vs-rest, macro average), ``<prefix>log_loss``, ``<prefix>ece``
(:func:`expected_calibration_error`), and for the model also ``test_<precision|recall|f1|support>_<label>``.
The list of names lives in :mod:`bigmodel_ops.config` (``evaluate_metric_names``), so that the params
schema can refuse a gate on a metric that is not computed; tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bigmodel_ops.config import metric_key

ECE_BINS = 15


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin of the top-class confidence (``n_bins`` equal-width bins over [0, 1],
    the last one closed): bin edges, mean confidence, accuracy and count."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    # bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 falls into the first bin
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        if count:
            rows.append(
                {
                    "bin_lower": i / n_bins,
                    "bin_upper": (i + 1) / n_bins,
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": count,
                }
            )
    return rows


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-class confidence, 15 equal-width bins (Guo et al., 2017):
    ``sum_b n_b / N * |accuracy_b - mean confidence_b|``. 0 for an empty set."""
    total = len(y_true)
    if not total:
        return 0.0
    bins = reliability_bins(y_true, probs, n_bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of the second class's probability; more classes: one-vs-rest, macro. NaN when a
    class is missing from ``y_true`` (the AUC is undefined then)."""
    from sklearn.metrics import roc_auc_score

    n_labels = probs.shape[1]
    if len(np.unique(y_true)) < n_labels:
        return math.nan
    if n_labels == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(n_labels)))


def summary_metrics(y_true: np.ndarray, probs: np.ndarray, *, prefix: str) -> dict[str, float]:
    """Accuracy, macro / micro F1, ROC-AUC, log loss and ECE of one model, named ``<prefix><name>``."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    labels = list(range(probs.shape[1]))
    preds = probs.argmax(axis=1)
    return {
        f"{prefix}acc": float(accuracy_score(y_true, preds)),
        f"{prefix}f1": float(f1_score(y_true, preds, labels=labels, average="macro", zero_division=0)),
        f"{prefix}f1_micro": float(f1_score(y_true, preds, labels=labels, average="micro", zero_division=0)),
        f"{prefix}roc_auc": roc_auc(y_true, probs),
        f"{prefix}log_loss": float(log_loss(y_true, probs, labels=labels)),
        f"{prefix}ece": expected_calibration_error(y_true, probs),
    }


def per_class(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> list[dict[str, float | str]]:
    """One row per label: precision, recall, F1 (0 where undefined) and support."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, probs.argmax(axis=1), labels=list(range(len(labels))), zero_division=0
    )
    return [
        {
            "label": label,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    ]


def per_class_metrics(rows: list[dict[str, float | str]]) -> dict[str, float]:
    """``test_<precision|recall|f1|support>_<label>`` from :func:`per_class` rows."""
    return {
        f"test_{kind}_{metric_key(str(row['label']))}": float(row[kind])
        for row in rows
        for kind in ("precision", "recall", "f1", "support")
    }


def versus_baseline(model: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``test_<m>_minus_baseline`` for accuracy, macro F1 and ROC-AUC."""
    return {
        f"test_{m}_minus_baseline": model[f"test_{m}"] - baseline[f"baseline_test_{m}"]
        for m in ("acc", "f1", "roc_auc")
    }
