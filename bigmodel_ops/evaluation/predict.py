"""Class probabilities of the exported classifier on a list of texts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmodel_ops.progress import progress


def predict_proba(classifier: Any, texts: list[str], *, batch_size: int, quiet: bool) -> np.ndarray:
    """(N, num_labels) float64 softmax probabilities, in batches of ``batch_size`` texts."""
    chunks = []
    for start in progress(
        range(0, len(texts), batch_size),
        desc="evaluate",
        total=-(-len(texts) // batch_size),
        unit="batch",
        quiet=quiet,
    ):
        chunks.append(classifier.logits(texts[start : start + batch_size], batch_size=batch_size))
    if not chunks:
        return np.empty((0, len(classifier.labels)))
    return torch.softmax(torch.cat(chunks).double(), dim=-1).numpy()
