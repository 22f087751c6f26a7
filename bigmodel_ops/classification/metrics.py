"""Classification metrics from a confusion matrix (training validation, soups and the evaluate stage)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts; rows are true labels, columns predictions."""
    flat = targets.long() * num_labels + preds.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, Any]:
    """accuracy, macro_f1 and per-class precision / recall (lists, in label order).

    A class that is never predicted has precision 0, one that never occurs recall 0 (and F1 0),
    as scikit-learn does with zero_division=0. An empty matrix gives accuracy 0.
    """
    cm = cm.double()
    tp = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
    }


def val_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """``val_loss`` (plain cross-entropy: no smoothing, no class weights, comparable across
    settings), ``val_acc`` and ``val_f1`` (macro) of (n, num_labels) logits against n labels: what
    fine-tuning's validation and a soup's scorer report."""
    summary = metrics_from_confusion(confusion_matrix(logits.argmax(-1), labels, num_labels))
    return {
        "val_loss": float(F.cross_entropy(logits.float(), labels)),
        "val_acc": summary["accuracy"],
        "val_f1": summary["macro_f1"],
    }
