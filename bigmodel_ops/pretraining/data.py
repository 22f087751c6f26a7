"""Pretraining batches cut straight from memory-mapped token shards.

Every training row is a pure function of (seed, epoch, global row number): its random window
and its masks come from a NumPy generator seeded with that tuple, never from a global RNG. So
the data position is just two integers, and a resumed run continues with exactly the batches
an uninterrupted run would have seen, whatever happened in between (worker processes,
prefetching, a SIGKILL).

Ranks (DDP, multi-node) share one sequence of global batches of ``batch_size x world_size``
rows: at step ``i``, rank ``r`` takes rows ``[(i * W + r) * B, (i * W + r + 1) * B)`` of the
epoch (:class:`TrainBatches`). Because a row does not depend on which rank or batch holds it,
the union of the ranks' batches at step ``i`` is exactly the batch a single process with batch
size ``B x W`` gets at step ``i`` (same windows, same masks, same epoch length): DDP with W
processes and one process with the global batch train on the same data, step for step.

The train loader counts the batches it has handed to the training loop (not those its
workers have prefetched) and exposes ``state_dict``/``load_state_dict``; Lightning finds
it stateful (``_Stateful``) and stores its position in every checkpoint. The loader has a
length (one pass over the split), which also stops Lightning from prefetching a batch
ahead of the one being trained on.

The masking of the masked objective is :mod:`bigmodel_ops.pretraining.masking`.

Nothing here imports pydantic or MLflow: the GPU benchmark uses this module bare.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bigmodel_ops.errors import CheckpointError, DataError
from bigmodel_ops.pretraining.masking import mask_tokens_from_uniforms, mask_uniforms
from bigmodel_ops.shards import ShardIndex

Objective = Literal["causal", "masked"]


# ---------------------------------------------------------------------------------------------
# Token windows over one split
# ---------------------------------------------------------------------------------------------


class TokenStream:
    """One split of a shards folder as a single virtual token array (zero-copy memmaps).

    Windows may straddle a shard boundary; they are gathered piecewise. The memmaps are
    opened lazily and dropped when pickled, so worker processes never copy the data.
    """

    def __init__(self, files: list[Path], sizes: list[int], dtype: str) -> None:
        self.files = [Path(f) for f in files]
        self.sizes = [int(s) for s in sizes]
        self.dtype = dtype
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._maps: list[np.memmap] | None = None

    @classmethod
    def from_index(cls, index: ShardIndex, split: str) -> TokenStream:
        if split not in index.splits:
            raise DataError(
                f"{index.directory / 'index.json'}: no split {split!r}; has {sorted(index.splits)}"
            )
        infos = index.splits[split]
        return cls([index.directory / i.file for i in infos], [i.tokens for i in infos], index.dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))
                for f, n in zip(self.files, self.sizes, strict=True)
            ]
        return self._maps

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """Token windows [offset, offset + length) as an int64 array (len(offsets), length)."""
        idx = offsets.astype(np.int64)[:, None] + np.arange(length, dtype=np.int64)[None, :]
        if len(self.maps) == 1:
            return self.maps[0][idx].astype(np.int64)
        out = np.empty(idx.shape, dtype=np.int64)
        shard_of = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            where = shard_of == s
            out[where] = self.maps[s][idx[where] - self.starts[s]]
        return out


def unigram_entropy(tokens: np.ndarray, vocab_size: int, *, ignore_ids: Sequence[int] = ()) -> float:
    """Entropy (nats) of the token frequencies of ``tokens``: the loss of the best predictor that
    ignores context, so a language model's val loss must go below it to have learned anything
    beyond word counts.

    Pass the tokens at the positions the model predicts: for the masked objective, drop the ids
    that are never predicted (``ignore_ids``: the separator, pad, cls); for the causal objective,
    every token is a target. Empty input gives 0.0.
    """
    tokens = np.asarray(tokens).ravel()
    if len(ignore_ids):
        tokens = tokens[~np.isin(tokens, np.asarray(ignore_ids))]
    if tokens.size == 0:
        return 0.0
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides which tokens form which batch."""

    objective: Objective
    block_size: int
    batch_size: int  # per rank and micro-batch
    seed: int
    sampling: Literal["random", "sequential"] = "random"
    mask_rate: float = 0.15
    val_mask_rate: float = 0.15  # the fixed validation batches' masking rate
    mask_id: int = 4
    vocab_size: int = 0
    special_ids: tuple[int, ...] = ()  # never masked nor used as random replacements
    protected_ids: tuple[int, ...] = ()  # never predicted (in packed pretraining: the separator)
    # Whole-word masking: the ids of tokens that continue a word (empty: each token on its own).
    continuation_ids: tuple[int, ...] = ()

    @property
    def span(self) -> int:
        """Tokens read per window: causal needs one more for the shifted targets."""
        return self.block_size + 1


class BatchMaker:
    """Builds a batch dict of CPU tensors for a batch key; shared by train and val."""

    def __init__(self, stream: TokenStream, spec: DataSpec) -> None:
        self.stream = stream
        self.spec = spec
        specials = np.asarray(sorted(set(spec.special_ids)), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(spec.vocab_size, dtype=np.int64), specials)
        self.protected_ids = np.asarray(sorted(set(spec.protected_ids)), dtype=np.int64)
        self.continuation_ids = np.asarray(sorted(set(spec.continuation_ids)), dtype=np.int64)

    def build_rows(self, offsets: np.ndarray, uniforms: np.ndarray | None) -> dict[str, torch.Tensor]:
        """The batch of windows at ``offsets``, each row masked with its own uniforms
        (``(B, mask_uniforms(...))``; unused, may be None, for the causal objective)."""
        spec = self.spec
        tokens = self.stream.windows(offsets, spec.span)
        if spec.objective == "causal":
            return {"tokens": torch.from_numpy(tokens)}
        assert uniforms is not None
        masked = mask_tokens_from_uniforms(
            tokens[:, : spec.block_size],
            uniforms,
            mask_rate=spec.mask_rate,
            mask_id=spec.mask_id,
            protected_ids=self.protected_ids,
            random_ids=self.random_ids,
            continuation_ids=self.continuation_ids,
        )
        return self._masked(masked)

    @staticmethod
    def _masked(masked: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        inputs, positions, labels = masked
        return {
            "input_ids": torch.from_numpy(inputs),
            "positions": torch.from_numpy(positions),
            "labels": torch.from_numpy(labels),
        }


def check_split_length(stream: TokenStream, spec: DataSpec, *, split: str, where: Path | str) -> None:
    """DataError when a split cannot hold one window of block_size + 1 tokens."""
    if len(stream) < spec.span:
        raise DataError(
            f"{where}: split {split!r} has {len(stream)} tokens, fewer than block_size + 1 = {spec.span} "
            f"(model.block_size is {spec.block_size}); lower model.block_size or add data"
        )


class TrainBatches(Dataset):
    """Train batches addressed by (epoch, index); see the module docstring for determinism.

    What the sharding guarantees, for ``world_size`` W and per-rank ``batch_size`` B (G = B x W):

    - rank r's batch ``index`` i of an epoch holds the epoch's global rows
      ``(i * W + r) * B ... (i * W + r + 1) * B - 1`` (:meth:`rows`): no two ranks (and no two
      steps) of an epoch ever share a row;
    - a row's window and masks depend on (seed, epoch, row) only, so the ranks' batches of step
      i together are exactly the batch i of one process with batch size G, and an epoch has the
      same number of steps either way (``n_windows // G``);
    - ``sampling: sequential``: row k is the contiguous window starting at token ``k * block_size``,
      so the windows of all ranks are disjoint and an epoch covers windows ``0 .. steps * G - 1``
      once each; ``sampling: random``: row k's window starts at an independent uniform offset
      (windows of different rows may overlap by chance, on one rank or across ranks, as with one
      process).
    """

    def __init__(self, stream: TokenStream, spec: DataSpec, *, rank: int = 0, world_size: int = 1) -> None:
        self.maker = BatchMaker(stream, spec)
        self.stream = stream
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.n_windows = (len(stream) - 1) // spec.block_size  # contiguous windows (sequential)
        if spec.sampling == "sequential":
            self.batches_per_epoch = self.n_windows // (spec.batch_size * world_size)
        else:
            self.batches_per_epoch = max(1, self.n_windows // (spec.batch_size * world_size))
        # Uniforms per row: a window offset (random sampling), then the masks (masked objective).
        self._offset_uniforms = int(spec.sampling != "sequential")
        self._row_uniforms = self._offset_uniforms + (
            mask_uniforms(spec.block_size, spec.mask_rate) if spec.objective == "masked" else 0
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rows(self, index: int) -> np.ndarray:
        """The epoch's global row numbers that this rank's batch ``index`` holds."""
        # Ranks interleave global batches of batch_size rows, so no two share a row.
        g = index * self.world_size + self.rank
        return np.arange(g * self.spec.batch_size, (g + 1) * self.spec.batch_size, dtype=np.int64)

    def row_uniforms(self, epoch: int, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), k) uniforms in [0, 1), row k's from a generator seeded (seed, epoch, k)."""
        if not self._row_uniforms:
            return None
        seed, n = self.spec.seed, self._row_uniforms
        return np.stack([np.random.default_rng([seed, epoch, int(row)]).random(n) for row in rows])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        spec = self.spec
        rows = self.rows(index)
        uniforms = self.row_uniforms(epoch, rows)
        if spec.sampling == "sequential":
            offsets = rows * spec.block_size
        else:
            assert uniforms is not None
            starts = len(self.stream) - spec.span + 1
            offsets = np.minimum((uniforms[:, 0] * starts).astype(np.int64), starts - 1)
        masks = uniforms[:, self._offset_uniforms :] if uniforms is not None else None
        return self.maker.build_rows(offsets, masks)


class ValBatches(Dataset):
    """A fixed set of val batches: windows spread evenly over the split, fixed masks.

    ``n_batches`` global batches of ``batch_size x world_size`` rows (windows evenly spaced over
    the split, identical every time); rank r scores rows ``r * B .. (r + 1) * B - 1`` of each,
    and a row's masks depend on (seed, row) only. So the ranks together score exactly the rows one
    process with batch size ``B x W`` scores, and the mean of the ranks' losses is its loss.
    """

    def __init__(
        self, stream: TokenStream, spec: DataSpec, *, n_batches: int, rank: int = 0, world_size: int = 1
    ) -> None:
        # Token masking at val_mask_rate whatever the training masking: val losses compare.
        spec = dataclasses.replace(spec, mask_rate=spec.val_mask_rate, continuation_ids=())
        self.maker = BatchMaker(stream, spec)
        self.spec = spec
        B, W = spec.batch_size, world_size
        n = n_batches * B * W
        last = len(stream) - spec.span
        # Evenly spaced (overlapping only when the split is small) and identical every time.
        offsets = np.linspace(0, last, num=n).round().astype(np.int64).reshape(n_batches, W, B)
        self.offsets = offsets[:, rank]
        self.rows = np.arange(n, dtype=np.int64).reshape(n_batches, W, B)[:, rank]
        self._uniforms = mask_uniforms(spec.block_size, spec.mask_rate) if spec.objective == "masked" else 0

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        uniforms = None
        if self._uniforms:
            seed, n = self.spec.seed, self._uniforms
            uniforms = np.stack(
                [np.random.default_rng([seed, 2**31 - 1, int(row)]).random(n) for row in self.rows[i]]
            )
        return self.maker.build_rows(self.offsets[i], uniforms)


class _PositionSampler(Sampler):
    """Yields batch keys (epoch, index) from the loader's current position to the epoch's end."""

    def __init__(self, loader: ResumableBatchLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.loader.epoch, self.loader.position
        return iter([(epoch, i) for i in range(start, self.loader.batches_per_epoch)])


class ResumableBatchLoader(DataLoader):
    """A DataLoader over TrainBatches whose position is saved in Lightning checkpoints.

    State is (epoch, position): the batches already handed to the training loop. It is
    advanced when a batch is returned to the consumer, so worker prefetching does not
    move it. `fetch_seconds` accumulates the time the consumer waited for batches (the
    data-wait figure of the benchmark).
    """

    def __init__(
        self, dataset: TrainBatches, *, num_workers: int = 0, pin_memory: bool = False, seed: int = 0
    ) -> None:
        self.batches_per_epoch = len(dataset)
        self.epoch = 0
        self.position = 0
        self.fetch_seconds = 0.0
        super().__init__(
            dataset,
            batch_size=None,
            sampler=_PositionSampler(self),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # Own generator: creating an iterator must not draw from the global torch RNG,
            # or a resumed run's dropout stream would differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        inner = super().__iter__()
        clock = time.perf_counter
        while True:
            t0 = clock()
            try:
                batch = next(inner)
            except StopIteration:
                return
            self.fetch_seconds += clock() - t0
            self.position += 1
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["batches_per_epoch"]) != self.batches_per_epoch:
            raise CheckpointError(
                f"the checkpoint's data position is for {state['batches_per_epoch']} batches per epoch, "
                f"the current data and sizing give {self.batches_per_epoch} (shards, batch size or device "
                "count changed); restore them or delete the pretrain checkpoints to start over"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------
# The LightningDataModule
# ---------------------------------------------------------------------------------------------


class PretrainDataModule(pl.LightningDataModule):
    """Train/val loaders over a shards folder for one DataSpec.

    The rank and world size come from the trainer when the loaders are made, so the same module
    works for one process, DDP and multi-node runs: each rank reads its own rows of every global
    train and val batch (:class:`TrainBatches`, :class:`ValBatches`).
    """

    def __init__(
        self,
        shards: ShardIndex,
        spec: DataSpec,
        *,
        val_batches: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.index = shards
        self.spec = spec
        self.val_batches = val_batches
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_stream = TokenStream.from_index(shards, "train")
        self.val_stream = TokenStream.from_index(shards, "val")
        where = shards.directory
        check_split_length(self.train_stream, spec, split="train", where=where)
        check_split_length(self.val_stream, spec, split="val", where=where)
        self._train_loader: ResumableBatchLoader | None = None

    def batches_per_epoch(self, world_size: int) -> int:
        return len(TrainBatches(self.train_stream, self.spec, world_size=world_size))

    def check_enough_for_one_batch(self, world_size: int) -> None:
        """Sequential sampling needs at least one full batch per rank per epoch."""
        if self.batches_per_epoch(world_size) == 0:
            need = self.spec.batch_size * world_size * self.spec.block_size + 1
            raise DataError(
                f"{self.index.directory}: split 'train' has {len(self.train_stream)} tokens, fewer than one "
                f"sequential batch needs ({need} = batch_size {self.spec.batch_size} x {world_size} rank(s) x "
                f"block_size {self.spec.block_size} + 1); lower the batch size or use sampling: random"
            )

    def train_dataloader(self) -> ResumableBatchLoader:
        if self._train_loader is None:
            trainer = self.trainer
            rank = trainer.global_rank if trainer is not None else 0
            world = trainer.world_size if trainer is not None else 1
            self.check_enough_for_one_batch(world)
            dataset = TrainBatches(self.train_stream, self.spec, rank=rank, world_size=world)
            self._train_loader = ResumableBatchLoader(
                dataset, num_workers=self.num_workers, pin_memory=self.pin_memory, seed=self.spec.seed
            )
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return DataLoader(
            ValBatches(self.val_stream, self.spec, n_batches=self.val_batches, rank=rank, world_size=world),
            batch_size=None,
            shuffle=False,
            num_workers=0,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
