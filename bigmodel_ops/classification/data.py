"""Classifier inputs: checks, tokenisation and the train / val loaders.

- input checks and tokenisation: :func:`check_pretrained_dir`, :func:`read_labeled_split`,
  :func:`load_splits` (labeled Parquet -> token ids, with the pretrained model's tokenizer);
- batching: :func:`collate` (right padding) and :class:`ClassificationDataModule`.

Token ids follow the tokenizer contract of the tokenize stage: pad=0, unk=1, cls=2, sep=3,
mask=4, and a ``[CLS] $A [SEP]`` post-processor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from bigmodel_ops.config import Params
from bigmodel_ops.errors import CheckpointError, DataError
from bigmodel_ops.model import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, read_exported_config

PAD_ID = 0
CLS_ID = 2
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val", "test")
LABELED_COLUMNS = ("text", "label", "label_id")


# ---------------------------------------------------------------------------------------------
# inputs


def check_pretrained_dir(directory: Path) -> None:
    """CheckpointError naming the path when the pretrained model folder is incomplete."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: pretrained model not found (run the pretrain stage first)")
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing from the pretrained model folder")


def load_tokenizer(path: Path, *, max_length: int):
    """The saved HF tokenizer with truncation to max_length tokens (special tokens included)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: not a valid tokenizer file: {error}") from None
    tokenizer.no_padding()  # batches are padded by the collate function, to the batch's longest
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def effective_max_length(params: Params, config: ModelConfig) -> int:
    """finetune.max_length, capped by the backbone's context."""
    return min(params.finetune.max_length, config.block_size)


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
    tokenizer, texts: Sequence[str], *, objective: str, source: str = "tokenizer"
) -> list[list[int]]:
    """Token ids per text; checks once that a masked backbone's inputs start with [CLS]."""
    ids = [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
    if objective == "masked" and ids and (not ids[0] or ids[0][0] != CLS_ID):
        raise CheckpointError(
            f"{source}: the tokenizer does not put [CLS] (id {CLS_ID}) first; a masked backbone "
            "pools the [CLS] state, so the tokenizer needs its '[CLS] $A [SEP]' post-processor"
        )
    return ids


def load_splits(
    params: Params, *, prepared: Path, model_dir: Path, splits: Sequence[str] = ("train", "val")
) -> dict[str, TokenizedSplit]:
    """Check the inputs and tokenise the named labeled splits with the pretrained model's tokenizer."""
    check_pretrained_dir(model_dir)
    config, _ = read_exported_config(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE, max_length=effective_max_length(params, config))
    result: dict[str, TokenizedSplit] = {}
    for split in splits:
        texts, labels = read_labeled_split(prepared / f"{split}.parquet", params.prepare.labels)
        ids = tokenize_texts(
            tokenizer, texts, objective=config.objective, source=str(model_dir / TOKENIZER_FILE)
        )
        result[split] = TokenizedSplit(ids=ids, labels=labels)
    return result


# ---------------------------------------------------------------------------------------------
# batches


class _SplitDataset(torch.utils.data.Dataset):
    def __init__(self, split: TokenizedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.split.ids[index], int(self.split.labels[index])


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


class ClassificationDataModule(L.LightningDataModule):
    """Train / val loaders over already tokenised splits (tokenise once, reuse across trials)."""

    def __init__(
        self, splits: Mapping[str, TokenizedSplit], *, batch_size: int, seed: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, split: str, *, shuffle: bool) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return torch.utils.data.DataLoader(
            _SplitDataset(self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", shuffle=False)
