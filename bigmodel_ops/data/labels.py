"""Mapping raw label values onto the declared label set (`prepare.labels`).

Rules, in order (the first that applies wins):

1. A value whose string form equals a declared label is that label
   (so declared labels "1".."5" match integer star ratings 1..5 directly).
2. An integer (or a string of digits, as CSV gives) is an index into the
   declared labels: with labels [negative, positive], 0 -> negative and
   1 -> positive, as in Hugging Face `imdb`. -1 means "unlabeled" (the HF
   convention for its `unsup` split): the row feeds only the pretraining pool.
3. Anything else is a LabelError; the caller adds where the value was found
   and raises a DataError.

Folder names of the aclImdb layout (`neg`, `pos`) are matched separately by
:func:`label_for_folder`, which also accepts a case-insensitive prefix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bigmodel_ops.errors import DataError

UNLABELED = -1
_INTEGER = re.compile(r"^[+-]?\d+$")


class LabelError(ValueError):
    """A raw label value that maps to no declared label (the message has no location)."""


class LabelMapper:
    """Resolve raw label values to class ids (index in `labels`) or UNLABELED."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self._by_name = {name: index for index, name in enumerate(self.labels)}
        # Raw values repeat millions of times; the cache keeps the per-row cost to one dict lookup.
        self._cache: dict[tuple[type, object], int] = {}

    def resolve(self, value: object) -> int:
        """Return the class id of `value`, or UNLABELED (-1).

        Raises LabelError (naming the value) for an empty value, a value that is
        not a declared label and an out-of-range integer index.
        """
        key = (type(value), value)
        try:
            return self._cache[key]
        except (KeyError, TypeError):
            pass
        label_id = self._resolve_uncached(value)
        try:
            self._cache[key] = label_id
        except TypeError:  # an unhashable value (a list in JSONL) was already refused above
            pass
        return label_id

    def _resolve_uncached(self, value: object) -> int:
        if value is None or (isinstance(value, float) and value != value) or value == "":
            raise LabelError(f"the label is empty (declared labels: {self.labels})")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise LabelError(
                f"label value {value!r} ({type(value).__name__}) is not one of the declared "
                f"labels {self.labels}"
            )
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        if text in self._by_name:
            return self._by_name[text]
        if isinstance(value, int) or _INTEGER.match(text):
            index = int(text)
            if index == UNLABELED:
                return UNLABELED
            if 0 <= index < len(self.labels):
                return index
            raise LabelError(
                f"integer label {index} is out of range: integer labels index the declared "
                f"labels {self.labels} (0..{len(self.labels) - 1}; -1 = unlabeled)"
            )
        raise LabelError(f"label value {value!r} is not one of the declared labels {self.labels}")


def label_for_folder(folder: str, labels: Sequence[str], *, where: str) -> int:
    """Map an aclImdb class folder (`neg`, `pos`) to a declared label id.

    Accepts the exact label or a case-insensitive prefix of exactly one declared
    label (`neg` -> `negative`). Raises DataError for no or several matches.
    """
    if folder in labels:
        return list(labels).index(folder)
    matches = [i for i, name in enumerate(labels) if name.lower().startswith(folder.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DataError(
            f"{where}: folder {folder!r} matches none of the declared labels {list(labels)} "
            "(a folder must equal a label or be a prefix of exactly one, e.g. neg -> negative)"
        )
    raise DataError(
        f"{where}: folder {folder!r} is a prefix of several declared labels "
        f"{[labels[i] for i in matches]}; rename the folder or the labels"
    )
