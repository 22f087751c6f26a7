"""CPU inference latency and size on disk of the exported classifier."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZES = (1, 32)


def measure_latency(
    classifier: Any,
    texts: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, float]:
    """``latency_b<B>_median_ms`` / ``latency_b<B>_p95_ms``: wall time of ``classifier.logits`` on
    B test texts (tokenisation included; texts repeat when the split is smaller than B), over
    ``repeats`` timed calls after ``warmup`` untimed ones, on the classifier's device (CPU here)."""
    if not texts:
        texts = ["an empty test split"]
    metrics: dict[str, float] = {}
    for size in batch_sizes:
        batch = [texts[i % len(texts)] for i in range(size)]
        for _ in range(warmup):
            classifier.logits(batch, batch_size=size)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            classifier.logits(batch, batch_size=size)
            times.append((time.perf_counter() - start) * 1000.0)
        metrics[f"latency_b{size}_median_ms"] = float(np.median(times))
        metrics[f"latency_b{size}_p95_ms"] = float(np.percentile(times, 95))
    return metrics


def size_on_disk_mb(directory: Path) -> float:
    """Bytes of every file under ``directory`` (weights, config, tokenizer), in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()) / 1e6
