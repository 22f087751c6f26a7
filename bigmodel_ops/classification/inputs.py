"""Classifier inputs: labeled splits, tokenisation and batching (no Lightning, no pydantic).

- :func:`read_labeled_split` and :func:`load_splits` (labeled Parquet -> token ids, with the
  pretrained model's tokenizer), :func:`tokenize_texts`, :func:`truncation_for`;
- :func:`collate`: right padding, shared by training and inference.

Token ids follow :mod:`bigmodel_ops.contract` (pad=0, cls=2, and a ``[CLS] $A [SEP]``
post-processor). The served model imports this module, so it stays free of training libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigmodel_ops.contract import (
    CLS_ID,
    PAD_ID,
    TOKENIZER_FILE,
    Truncation,
    check_model_dir,
    load_tokenizer,
)
from bigmodel_ops.errors import CheckpointError, ConfigError, DataError
from bigmodel_ops.model import ModelConfig, read_exported_config

SPLITS = ("train", "val", "test")
LABELED_COLUMNS = ("text", "label", "label_id")


def effective_max_length(max_length: int, config: ModelConfig) -> int:
    """The requested max_length, capped by the backbone's context."""
    return min(max_length, config.block_size)


def truncation_for(
    max_length: int, config: ModelConfig, *, keep: str = "head", head_tokens: int = 0
) -> Truncation:
    """The finetune settings' :class:`Truncation`, its max_length capped by the backbone's context;
    ConfigError naming finetune.head_tokens when the cap leaves no room for the tail."""
    length = effective_max_length(max_length, config)
    try:
        return Truncation(length, keep, head_tokens)
    except ValueError as error:
        raise ConfigError(
            f"finetune.head_tokens / finetune.max_length (capped at the backbone's block_size "
            f"{config.block_size}): {error}"
        ) from None


def read_labeled_split(path: Path, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Texts and class ids of one labeled Parquet split, checked against ``labels``.

    Raises DataError naming the file (and the row) when the file is missing or empty, lacks a
    column, has a label outside ``labels`` or a label_id that disagrees with the label's index.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: labeled split not found (run the prepare stage first)")
    try:
        table = pq.read_table(path, columns=list(LABELED_COLUMNS))
    except (pa.ArrowInvalid, OSError, KeyError) as error:
        raise DataError(f"{path}: cannot read columns {list(LABELED_COLUMNS)}: {error}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    for column in ("text", "label"):
        if table[column].null_count:
            row = pc.index(pc.is_null(table[column]), True).as_py()
            raise DataError(f"{path}: row {row}: column {column!r} is null")
    label_col = table["label"].cast(pa.string())
    known = pa.array(list(labels), type=pa.string())
    expected = pc.index_in(label_col, value_set=known)
    if expected.null_count:
        row = pc.index(pc.is_null(expected), True).as_py()
        value = label_col[row].as_py()
        raise DataError(
            f"{path}: row {row}: label {value!r} is not in prepare.labels {list(labels)} "
            "(the data was prepared with other labels: re-run the prepare stage)"
        )
    ids = table["label_id"].cast(pa.int64())
    mismatch = pc.not_equal(ids, expected.cast(pa.int64()))
    if pc.any(pc.fill_null(mismatch, True)).as_py():
        row = pc.index(pc.fill_null(mismatch, True), True).as_py()
        raise DataError(
            f"{path}: row {row}: label_id {ids[row].as_py()} does not match label "
            f"{label_col[row].as_py()!r} (index {expected[row].as_py()} in prepare.labels {list(labels)})"
        )
    return table["text"].to_pylist(), expected.to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class TokenizedSplit:
    ids: list[list[int]]
    labels: np.ndarray  # (N,) int64 class ids

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    objective: str,
    truncation: Truncation | None = None,
    source: str = "tokenizer",
) -> list[list[int]]:
    """Token ids per text, cut by ``truncation`` (None: as the tokenizer cuts them); checks once
    that a masked backbone's inputs start with [CLS]."""
    ids = [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
    if truncation is not None:
        ids = [truncation.apply(row) for row in ids]
    if objective == "masked" and ids and (not ids[0] or ids[0][0] != CLS_ID):
        raise CheckpointError(
            f"{source}: the tokenizer does not put [CLS] (id {CLS_ID}) first; a masked backbone "
            "pools the [CLS] state, so the tokenizer needs its '[CLS] $A [SEP]' post-processor"
        )
    return ids


def load_splits(
    *,
    prepared: Path,
    model_dir: Path,
    labels: Sequence[str],
    max_length: int,
    truncation: str = "head",
    head_tokens: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> dict[str, TokenizedSplit]:
    """Check the inputs and tokenise the named labeled splits with the pretrained model's tokenizer.

    Texts are truncated to ``max_length`` tokens, capped by the backbone's context, keeping their
    head, tail or both (:func:`truncation_for`).
    """
    check_model_dir(model_dir)
    config, _ = read_exported_config(model_dir)
    cut = truncation_for(max_length, config, keep=truncation, head_tokens=head_tokens)
    tokenizer = load_tokenizer(
        model_dir / TOKENIZER_FILE, max_length=cut.tokenizer_max_length, error=CheckpointError
    )
    result: dict[str, TokenizedSplit] = {}
    for split in splits:
        texts, label_ids = read_labeled_split(prepared / f"{split}.parquet", labels)
        ids = tokenize_texts(
            tokenizer,
            texts,
            objective=config.objective,
            truncation=cut,
            source=str(model_dir / TOKENIZER_FILE),
        )
        result[split] = TokenizedSplit(ids=ids, labels=label_ids)
    return result


def collate(batch: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest sequence: idx (B, T), lengths (B,), labels (B,)."""
    lengths = [max(len(ids), 1) for ids, _ in batch]  # an empty text becomes one pad token
    idx = torch.full((len(batch), max(lengths)), PAD_ID, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        if ids:
            idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {
        "idx": idx,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
    }
