"""Train / val assignment: a seeded hash of each document's row index."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bigmodel_ops.errors import DataError
from bigmodel_ops.tokenizer.pool import TEXT_COLUMN, TextPool, byte_lengths, document_mask

_MASK64 = (1 << 64) - 1


def unit_hash(rows: np.ndarray, *, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per row index: splitmix64 of (row, seed), vectorised.

    Depends only on the row index and the seed, so the split is the same however the file is
    batched, and adding documents at the end never moves earlier ones between splits.
    """
    offset = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    z = rows.astype(np.uint64) + offset  # uint64 array arithmetic wraps silently, as intended
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SplitPlan:
    """Which documents (by row index) go to `val`: those whose hash is below `val_fraction`.

    When that leaves a split empty, the document with the smallest hash is forced into val (or the
    one with the largest into train), so both splits are non-empty whenever there are >= 2 documents.
    """

    seed: int
    val_fraction: float
    rows: int
    documents: int
    val_documents: int
    raw_bytes: int
    force_val: int = -1
    force_train: int = -1

    @property
    def train_documents(self) -> int:
        return self.documents - self.val_documents

    def is_val(self, rows: np.ndarray) -> np.ndarray:
        chosen = unit_hash(rows, seed=self.seed) < self.val_fraction
        if self.force_val >= 0:
            chosen |= rows == self.force_val
        if self.force_train >= 0:
            chosen &= rows != self.force_train
        return chosen


def plan_split(pool: TextPool, *, seed: int, val_fraction: float, batch_rows: int = 4096) -> SplitPlan:
    """One cheap Arrow-only pass (no Python strings): count documents and fix the val set.

    `batch_rows` bounds the memory of this pass (a batch of long documents is megabytes of text).

    Raises DataError when the pool has no document, or only one (val would be empty).
    """
    documents = val = raw_bytes = 0
    low = (2.0, -1)  # (hash, row) of the document with the smallest hash
    high = (-1.0, -1)
    for start, array in pool.batches(batch_rows):
        mask = document_mask(array)
        rows = np.flatnonzero(mask) + start
        if rows.size == 0:
            continue
        u = unit_hash(rows, seed=seed)
        documents += int(rows.size)
        val += int(np.count_nonzero(u < val_fraction))
        raw_bytes += int(byte_lengths(array)[mask].sum())
        i, j = int(np.argmin(u)), int(np.argmax(u))
        low = min(low, (float(u[i]), int(rows[i])))
        high = max(high, (float(u[j]), int(rows[j])))
    if documents == 0:
        raise DataError(
            f"{pool.path}: the pretraining pool is empty: 0 documents in column {TEXT_COLUMN!r} "
            f"({pool.rows} rows, all null/blank)"
        )
    if documents < 2:
        raise DataError(
            f"{pool.path}: the pretraining pool has only {documents} document in column {TEXT_COLUMN!r}; "
            "at least 2 are needed for non-empty train and val splits"
        )
    plan = SplitPlan(
        seed=seed,
        val_fraction=val_fraction,
        rows=pool.rows,
        documents=documents,
        val_documents=val,
        raw_bytes=raw_bytes,
    )
    if val == 0:
        plan = SplitPlan(**{**asdict(plan), "val_documents": 1, "force_val": low[1]})
    elif val == documents:
        plan = SplitPlan(**{**asdict(plan), "val_documents": val - 1, "force_train": high[1]})
    return plan
