"""Packing: every document of the pool encoded, followed by the sep id, into train/val token shards."""

from __future__ import annotations

import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from bigmodel_ops.contract import SPECIAL_IDS
from bigmodel_ops.progress import progress_bar
from bigmodel_ops.shards import ShardIndex, ShardWriter, dtype_for_vocab
from bigmodel_ops.tokenizer.encode import BatchEncoder
from bigmodel_ops.tokenizer.pool import TextPool, byte_lengths, document_mask
from bigmodel_ops.tokenizer.split import SplitPlan


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    raw_bytes: int = 0
    unk_tokens: int = 0
    shards: int = 0


@dataclass
class PackStats:
    dtype: str
    vocab_size: int
    seconds: float
    splits: dict[str, SplitStats] = field(default_factory=dict)
    # Documents encoded by the light twin (see tokenizer.encode) and by the full tokenizer.
    light_documents: int = 0
    full_documents: int = 0

    @property
    def raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.raw_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    light: pa.Array
    heavy: pa.Array
    full: np.ndarray
    is_val: np.ndarray
    raw_bytes: np.ndarray


def _prepare(start: int, array: pa.Array, plan: SplitPlan, encoder: BatchEncoder) -> _Batch | None:
    mask = document_mask(array)
    if not mask.any():
        return None
    lengths = byte_lengths(array)
    if mask.all():
        rows = np.arange(start, start + len(array))
    else:
        array = array.filter(pa.array(mask))
        rows = np.flatnonzero(mask) + start
        lengths = lengths[mask]
    light, heavy, full = encoder.split(array)
    return _Batch(light=light, heavy=heavy, full=full, is_val=plan.is_val(rows), raw_bytes=lengths)


def pack_shards(
    tokenizer: Tokenizer,
    *,
    pool: TextPool,
    out_dir: Path,
    plan: SplitPlan,
    batch_rows: int,
    shard_tokens: int,
    tokenizer_sha: str = "",
    pipelined: bool = True,
    fast_path: bool = True,
    quiet: bool = True,
) -> tuple[ShardIndex, PackStats]:
    """Encode every document (no post-processor) + the sep id into `train_*.bin` / `val_*.bin`.

    Streams `batch_rows` documents at a time (memory holds one batch and a bounded word cache,
    whatever the corpus size). With `fast_path` (see ``tokenizer.encode``), documents the BERT
    normalizer leaves alone (up to deleting control characters) are cut into words by Arrow and
    each distinct word is encoded once, by a copy of the tokenizer with a cheaper, equivalent
    normalizer; the rest go through ``encode_batch_fast`` (Rust thread pool, no offsets). Same ids
    either way. With `pipelined` (the default), a worker thread takes the heavy documents and a
    share of the light ones while this thread encodes the rest; both sides release the GIL for
    most of their work, and the split adapts to their measured speeds (1.5x one thread on the
    2-core machine we measured on: benchmarks/tokenize_throughput.py reports both).

    Writes index.json (special ids, dtype, sha256 of the tokenizer file) and returns the index and
    the per-split counts. The dtype is uint16 when every id fits, else uint32.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    id_bound = max(vocab.values()) + 1  # not len(vocab): ids of a hand-made vocab may be sparse
    dtype = dtype_for_vocab(id_bound)
    sep, unk = SPECIAL_IDS["sep"], SPECIAL_IDS["unk"]
    encoder = BatchEncoder(tokenizer, sep=sep, dtype=dtype, fast_path=fast_path)
    writers = {
        name: ShardWriter(out_dir, split=name, dtype=dtype, shard_tokens=shard_tokens)
        for name in ("train", "val")
    }
    stats = {name: SplitStats() for name in writers}
    counts = {"light": 0, "full": 0}
    bar = progress_bar(desc="tokenize: encode", total=plan.raw_bytes, unit="B", quiet=quiet)

    def encode(batch: _Batch, executor: Executor | None) -> tuple[np.ndarray, np.ndarray]:
        return encoder.encode(batch.light, batch.heavy, batch.full, executor=executor)

    def write(name: str, ids: np.ndarray, documents: int, raw_bytes: int) -> None:
        if not documents:
            return
        writers[name].append(ids, documents=documents)
        split = stats[name]
        split.documents += documents
        split.tokens += int(ids.size)
        split.raw_bytes += raw_bytes
        split.unk_tokens += int(np.count_nonzero(ids == unk))

    def consume(encoded: tuple[np.ndarray, np.ndarray], batch: _Batch) -> None:
        ids, lengths = encoded
        counts["light"] += len(batch.light)
        counts["full"] += len(batch.heavy)
        val = batch.is_val
        if val.any():
            in_val = np.repeat(val, lengths)
            write("val", ids[in_val], int(val.sum()), int(batch.raw_bytes[val].sum()))
            write("train", ids[~in_val], int((~val).sum()), int(batch.raw_bytes[~val].sum()))
        else:
            write("train", ids, len(val), int(batch.raw_bytes.sum()))
        bar.update(int(batch.raw_bytes.sum()))

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as executor:
            for start, array in pool.batches(batch_rows):
                batch = _prepare(start, array, plan, encoder)
                if batch is not None:
                    consume(encode(batch, executor if pipelined else None), batch)
        infos = {name: writer.close() for name, writer in writers.items()}
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    seconds = time.perf_counter() - began
    for name, split in stats.items():
        split.shards = len(infos[name])
    index = ShardIndex(
        directory=out_dir,
        dtype=dtype.name,
        vocab_size=id_bound,
        special_ids=dict(SPECIAL_IDS),
        tokenizer_sha256=tokenizer_sha,
        splits={name: infos[name] for name in ("train", "val")},
    )
    index.write()
    return index, PackStats(
        dtype=dtype.name,
        vocab_size=id_bound,
        seconds=seconds,
        splits=stats,
        light_documents=counts["light"],
        full_documents=counts["full"],
    )
