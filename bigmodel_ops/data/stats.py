"""Streaming statistics for the data report: counts and text-length percentiles.

Length percentiles come from a histogram, not from the lengths themselves:
lengths below 10,000 characters are counted exactly; longer ones are rounded
to three significant digits (error < 0.5 %). The histogram therefore holds at
most ~900 bins per decade of length, whatever the number of rows, and the
result is deterministic (unlike a random reservoir).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

_EXACT_BELOW = 10_000


def _bin(length: int) -> int:
    if length < _EXACT_BELOW:
        return length
    scale = 10 ** (int(math.log10(length)) - 2)
    return round(length / scale) * scale


class LengthStats:
    """min/mean/max exactly, p50/p95 from a bounded histogram."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None
        self._hist: Counter[int] = Counter()

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.min = length if self.min is None or length < self.min else self.min
        self.max = length if self.max is None or length > self.max else self.max
        self._hist[_bin(length)] += 1

    def percentile(self, q: float) -> int:
        """The smallest binned length with at least q of the rows at or below it (nearest rank)."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for length in sorted(self._hist):
            seen += self._hist[length]
            if seen >= rank:
                return length
        return self.max or 0  # pragma: no cover - ranks never exceed count

    def as_dict(self) -> dict[str, Any]:
        return {
            "min": self.min or 0,
            "mean": round(self.total / self.count, 2) if self.count else 0.0,
            "max": self.max or 0,
            "p50": self.percentile(0.50),
            "p95": self.percentile(0.95),
        }
