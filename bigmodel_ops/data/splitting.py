"""Deterministic, streaming split assignment and exact-duplicate detection.

One keyed BLAKE2b digest of the normalised text serves both jobs:

* dedup: the 16-byte digests of kept texts are remembered (not the texts), so
  memory grows by about 100 bytes per unique document, never by its length;
* splitting: the first 8 bytes, read as a number in [0, 1), are compared with
  the cumulative fractions train, train+val. Every label uses the same
  thresholds, so each label is split in the configured proportions in
  expectation (stratified), independent of row order and of the other rows:
  adding data never moves an existing text to another split. The key is
  `project.seed`, so another seed gives another (equally stratified) split.
"""

from __future__ import annotations

import hashlib

from bigmodel_ops.config import SplitParams

SPLITS = ("train", "val", "test")
_SCALE = float(2**64)


class TextHasher:
    """Keyed 16-byte BLAKE2b digests of normalised texts."""

    def __init__(self, seed: int) -> None:
        self._key = seed.to_bytes(8, "little", signed=False)

    def digest(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16, key=self._key).digest()


class SplitAssigner:
    """Map a text digest to 'train', 'val' or 'test' by the configured fractions."""

    def __init__(self, split: SplitParams) -> None:
        self._train = split.train
        self._train_val = split.train + split.val

    def assign(self, digest: bytes) -> str:
        u = int.from_bytes(digest[:8], "little") / _SCALE
        if u < self._train:
            return "train"
        if u < self._train_val:
            return "val"
        return "test"


class Deduper:
    """Remember kept texts by digest; report duplicates and label conflicts.

    The first occurrence wins. A later labeled copy with a different label counts
    as a conflicting duplicate too; copies where one side is unlabeled do not.
    """

    def __init__(self) -> None:
        # digest -> label id of the kept copy (-1 = unlabeled). Small ints are shared objects.
        self._seen: dict[bytes, int] = {}
        self.duplicates = 0
        self.conflicting = 0

    def add(self, digest: bytes, label_id: int) -> bool:
        """Return True if the text is new (keep it), False for a duplicate."""
        kept = self._seen.get(digest)
        if kept is None:
            self._seen[digest] = label_id
            return True
        self.duplicates += 1
        if kept != label_id and kept >= 0 and label_id >= 0:
            self.conflicting += 1
        return False

    def __len__(self) -> int:
        return len(self._seen)
