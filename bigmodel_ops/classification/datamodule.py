"""The train / val loaders of fine-tuning, sharded by rank (Lightning, DDP-exact validation).

:class:`ClassificationDataModule` serves already tokenised splits (tokenise once, reuse across
trials); :func:`collate_rows` adds each example's row number, with which
:class:`~.training.ClassifierModule` counts every validation row once under DDP;
:class:`LengthGroupedSampler` batches training texts of similar length (``group_by_length``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import torch

from bigmodel_ops.classification.inputs import TokenizedSplit, collate


class _SplitDataset(torch.utils.data.Dataset):
    """The split's examples with their row numbers; ``by_length``: longest first, so each batch holds
    texts of similar length and pads little (the row number still names the split's row)."""

    def __init__(self, split: TokenizedSplit, *, by_length: bool = False) -> None:
        self.split = split
        rows = range(len(split))
        self.rows = sorted(rows, key=lambda row: -len(split.ids[row])) if by_length else list(rows)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[int], int, int]:
        row = self.rows[index]
        return self.split.ids[row], int(self.split.labels[row]), row


def collate_rows(batch: Sequence[tuple[list[int], int, int]]) -> dict[str, torch.Tensor]:
    """:func:`~bigmodel_ops.classification.inputs.collate` plus ``rows`` (B,): each example's row
    number in its split (how DDP validation counts every row once)."""
    out = collate([(ids, label) for ids, label, _ in batch])
    out["rows"] = torch.tensor([row for _, _, row in batch], dtype=torch.long)
    return out


# Batches per length-sorted group of LengthGroupedSampler.
GROUP_BATCHES = 8


class LengthGroupedSampler(torch.utils.data.DistributedSampler):
    """Training batches of texts of similar length, in a random order (``finetune.group_by_length``).

    Each epoch (seeded by ``seed + epoch``, the same on every rank): a random permutation of the
    rows is cut into groups of ``group_batches`` global batches (``batch_size x num_replicas``
    rows each), each group is sorted longest first (ties keep their random order) and cut into
    its global batches, and those batches are shuffled within the group. Rank r then takes the
    positions ``r, r + W, ...`` as :class:`~torch.utils.data.DistributedSampler` does, so step i's
    batches on W ranks are together the global batch i, as with plain shuffling.

    A batch is padded to its longest text, so on texts of mixed lengths a grouped epoch computes
    fewer padding tokens. The Hugging Face Trainer's ``group_by_length`` sorts groups of 50
    batches and walks each longest first; here the groups are smaller (8 batches: on IMDb at 256
    tokens, 5-6% padding instead of 16-17%, against 1% with 50) and their batches come in a random
    order, because each batch is then less alike: fine-tuned on 2,000 reviews, 50-batch groups
    read 0.6 points below plain shuffling on test over six paired runs and 8-batch groups 0.3
    above, both about 20% faster (docs/pretraining-value.md).

    A split smaller than one group is one group. With W > 1 the last global batch is topped up
    with rows from the start of the epoch, as DistributedSampler does (``drop_last`` is off).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        group_batches: int = GROUP_BATCHES,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} rows")
        self.lengths = list(lengths)
        self.global_batch = batch_size * num_replicas
        self.group = self.global_batch * group_batches

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        grouped: list[int] = []
        for start in range(0, len(order), self.group):
            chunk = sorted(order[start : start + self.group], key=lambda row: -self.lengths[row])
            batches = [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            for index in torch.randperm(len(batches), generator=generator).tolist():
                grouped.extend(batches[index])
        while len(grouped) < self.total_size:  # even out the ranks (W - 1 rows at most, but for a tiny split)
            grouped += grouped[: self.total_size - len(grouped)]
        return iter(grouped[self.rank : self.total_size : self.num_replicas])


class ClassificationDataModule(L.LightningDataModule):
    """Train / val loaders over already tokenised splits (tokenise once, reuse across trials).

    Both loaders shard by rank with our own :class:`~torch.utils.data.DistributedSampler`
    (Lightning keeps a DistributedSampler it is given), one process included (1 replica):

    - train: one permutation of the split per epoch (seeded by ``seed + epoch``, the same on every
      rank and with any rank count), rank r taking its positions ``r, r + W, ...``; so with W
      ranks of ``batch_size`` B, step i's batches together are exactly the batch i of one process
      with batch size ``B x W`` when the split size is a multiple of ``B x W`` (otherwise the
      sampler repeats up to W - 1 rows to even out the ranks, and the last step differs);
    - val: longest texts first (batches of similar lengths pad little; the metrics do not depend
      on the order), sharded the same way; the module counts each row once
      (:meth:`~.training.ClassifierModule.on_validation_epoch_end`).
    """

    def __init__(
        self,
        splits: Mapping[str, TokenizedSplit],
        *,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.group_by_length = group_by_length

    def _loader(self, split: str, *, shuffle: bool) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        dataset = _SplitDataset(self.splits[split], by_length=not shuffle)
        if shuffle and self.group_by_length:
            sampler = LengthGroupedSampler(
                dataset,
                lengths=[len(ids) for ids in self.splits[split].ids],
                batch_size=self.batch_size,
                num_replicas=world,
                rank=rank,
                seed=self.seed,
            )
        else:
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=False
            )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,  # Lightning sets its epoch before each training epoch
            collate_fn=collate_rows,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", shuffle=False)
