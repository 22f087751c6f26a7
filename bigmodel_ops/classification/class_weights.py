"""Cross-entropy class weights of the ``finetune.class_weights`` setting.

``none`` (no weights), ``balanced`` (scikit-learn's n / (k * count_c) over the training split's
labels) or one weight per label, in label order; errors name the setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bigmodel_ops.errors import ConfigError, DataError


def balanced_class_weights(
    labels: np.ndarray, num_labels: int, names: Sequence[str] | None = None
) -> list[float]:
    """n / (k * count_c) per class (scikit-learn's "balanced"); DataError when a class is absent."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)[:num_labels]
    missing = [int(i) for i in np.flatnonzero(counts == 0)]
    if missing:
        shown = [names[i] if names and i < len(names) else i for i in missing]
        raise DataError(
            f"finetune.class_weights: balanced: class(es) {shown} have no example in the training split"
        )
    n = float(counts.sum())
    return [n / (num_labels * float(c)) for c in counts]


def class_weight_tensor(
    setting: str | Sequence[float], train_labels: np.ndarray, num_labels: int
) -> torch.Tensor | None:
    """The cross-entropy class weights of a ``class_weights`` setting (None for ``none``)."""
    if isinstance(setting, str):
        if setting == "none":
            return None
        if setting == "balanced":
            return torch.tensor(balanced_class_weights(train_labels, num_labels), dtype=torch.float32)
        raise ConfigError(f"finetune.class_weights: {setting!r} is not none, balanced or a list of weights")
    weights = [float(w) for w in setting]
    if len(weights) != num_labels:
        raise ConfigError(
            f"finetune.class_weights has {len(weights)} weight(s) but there are {num_labels} labels "
            "(prepare.labels): give one weight per label, in label order"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"finetune.class_weights: weights must be finite and > 0, got {weights}")
    return torch.tensor(weights, dtype=torch.float32)
