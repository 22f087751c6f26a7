"""The `tokenize` stage: train a tokenizer on the pretraining pool and pack the pool into token shards.

Reads ``<prepared>/pretrain.parquet`` (column ``text``), writes

- ``tokenizer.json``: a Hugging Face ``tokenizers`` file (WordPiece, BERT-like, or byte-level BPE)
  with the special tokens at fixed ids pad=0, unk=1, cls=2, sep=3, mask=4, a ``[CLS] $A [SEP]``
  post-processor for fine-tuning, and padding/truncation off (consumers set their own);
- token shards (``bigmodel_ops.shards``): every document encoded WITHOUT the post-processor and
  followed by the ``sep`` id, split ``train`` / ``val`` by a seeded hash of the document's row;
- a JSON report (vocab size, documents/tokens/bytes per split, throughput, unk rate).

Everything is streamed in Parquet batches, so memory does not grow with the corpus. All outputs are
written into one staging folder under ``outputs/`` and moved into place only after everything
(MLflow logging included) succeeded; a failure leaves the previous outputs untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import (
    Encoding,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from bigmodel_ops.config import Params, TokenizerParams
from bigmodel_ops.errors import ConfigError, DataError
from bigmodel_ops.fsutil import sha256_file
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.progress import progress_bar
from bigmodel_ops.shards import ShardIndex, ShardWriter, dtype_for_vocab

POOL_FILE = "pretrain.parquet"
TEXT_COLUMN = "text"
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
# Fixed ids, in the order of SpecialTokens.as_list(): every consumer may rely on them.
SPECIAL_IDS = {name: index for index, name in enumerate(SPECIAL_NAMES)}
# Byte-level BPE starts from all 256 byte symbols, whatever the corpus.
BYTE_ALPHABET = 256

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Small public helpers (used by the pretrain / finetune stages)
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a tokenizer.json; DataError when it is missing or not a tokenizers file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (run the tokenize stage first)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: not a valid tokenizers file: {error}") from None


def tokenizer_sha256(path: Path | str) -> str:
    """Hex sha256 of the file's bytes (index.json records it so shards and tokenizer cannot drift)."""
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------
# The pretraining pool
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPool:
    """The `text` column of a Parquet file, read batch by batch."""

    path: Path
    rows: int

    @classmethod
    def open(cls, path: Path | str, *, column: str = TEXT_COLUMN) -> TextPool:
        """Check the file exists, is Parquet and has a string column `column`.

        Raises DataError naming the file (and the column) otherwise. Row counts come from the
        Parquet footer; no text is read here.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: pretraining pool not found (run the prepare stage first)")
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file: {error}") from None
        schema = parquet.schema_arrow
        if column not in schema.names:
            raise DataError(
                f"{path}: no column {column!r} (columns: {schema.names}); "
                "the pretraining pool needs one document per row in a string column 'text'"
            )
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise DataError(f"{path}: column {column!r} has type {kind}, expected strings")
        return cls(path=path, rows=parquet.metadata.num_rows)

    def batches(self, batch_rows: int) -> Iterator[tuple[int, pa.Array]]:
        """(first row index, string array) per batch, in file order.

        Column chunks are read through a 1 MiB stream buffer instead of whole: without it, memory
        would grow with the writer's row-group size (pyarrow's default is up to 1M rows).
        """
        parquet = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        start = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[TEXT_COLUMN]):
            array = batch.column(0)
            yield start, array
            start += len(array)


def _document_mask(array: pa.Array) -> np.ndarray:
    """True for rows that are documents: not null, not empty, not only whitespace."""
    has_text = pc.and_(pc.greater(pc.binary_length(array), 0), pc.invert(pc.utf8_is_space(array)))
    return pc.fill_null(has_text, False).to_numpy(zero_copy_only=False)


def _byte_lengths(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Train / val assignment
# ---------------------------------------------------------------------------------------------


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
        mask = _document_mask(array)
        rows = np.flatnonzero(mask) + start
        if rows.size == 0:
            continue
        u = unit_hash(rows, seed=seed)
        documents += int(rows.size)
        val += int(np.count_nonzero(u < val_fraction))
        raw_bytes += int(_byte_lengths(array)[mask].sum())
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def build_tokenizer(params: TokenizerParams, *, show_progress: bool = False) -> tuple[Tokenizer, Any]:
    """An untrained tokenizer and its trainer, configured from params."""
    specials = params.special_tokens.as_list()
    if params.kind == "wordpiece":
        tokenizer = Tokenizer(
            models.WordPiece(unk_token=params.special_tokens.unk, max_input_chars_per_word=100)
        )
        # BertNormalizer: control-char cleanup, spaces around CJK, NFD + accent stripping and
        # lowercasing per params, in one Rust pass.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=params.strip_accents,
            lowercase=params.lowercase,
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=params.vocab_size,
            min_frequency=params.min_frequency,
            special_tokens=specials,
            limit_alphabet=params.limit_alphabet,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
    else:
        tokenizer = Tokenizer(models.BPE())  # byte-level: every input is covered, no unk needed
        steps: list[normalizers.Normalizer] = []
        if params.strip_accents:
            steps += [normalizers.NFD(), normalizers.StripAccents()]
        if params.lowercase:
            steps.append(normalizers.Lowercase())
        if steps:
            tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=params.vocab_size,
            min_frequency=params.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    return tokenizer, trainer


def check_vocab_size(params: TokenizerParams) -> None:
    """Fail before reading any data when the vocab cannot even hold the fixed alphabet."""
    needed = len(SPECIAL_NAMES) + BYTE_ALPHABET
    if params.kind == "bpe" and params.vocab_size < needed:
        raise ConfigError(
            f"tokenizer.vocab_size = {params.vocab_size} is too small for byte-level BPE: the "
            f"{len(SPECIAL_NAMES)} special tokens and the {BYTE_ALPHABET}-byte alphabet need {needed} ids"
        )


def train_tokenizer(
    params: TokenizerParams, *, pool: TextPool, plan: SplitPlan, batch_rows: int, quiet: bool = False
) -> Tokenizer:
    """Train on the TRAIN documents only (val stays fully held out), streamed in batches.

    Raises DataError when the trained vocab exceeds `vocab_size` (the trainer never drops the
    alphabet, so a too-small vocab shows up as a bigger one). A vocab smaller than asked is fine:
    the corpus simply has fewer mergeable pieces; the report records the actual size.
    """
    tokenizer, trainer = build_tokenizer(params)
    bar = progress_bar(desc="tokenize: train", total=plan.train_documents, unit="doc", quiet=quiet)

    def texts() -> Iterator[list[str]]:
        for start, array in pool.batches(batch_rows):
            mask = _document_mask(array)
            rows = np.arange(start, start + len(array))
            mask &= ~plan.is_val(rows)
            if mask.any():
                batch = array.filter(pa.array(mask)).to_pylist()
                bar.update(len(batch))
                yield batch

    try:
        tokenizer.train_from_iterator(texts(), trainer=trainer, length=plan.train_documents)
    finally:
        bar.close()
    specials = params.special_tokens.as_list()
    got = [tokenizer.token_to_id(token) for token in specials]
    if got != list(range(len(specials))):  # a tokenizers behaviour change, not a user error
        raise RuntimeError(f"special tokens {specials} got ids {got}, expected 0..{len(specials) - 1}")
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual > params.vocab_size:
        raise DataError(
            f"tokenizer.vocab_size = {params.vocab_size} is too small for the special tokens and the "
            f"alphabet of {pool.path} column {TEXT_COLUMN!r}: the trainer needed {actual} ids; raise "
            f"tokenizer.vocab_size to well above {actual}"
            + (" or lower tokenizer.limit_alphabet" if params.kind == "wordpiece" else "")
        )
    cls_token, sep_token = params.special_tokens.cls, params.special_tokens.sep
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls_token} $A {sep_token}",
        pair=f"{cls_token} $A {sep_token} $B:1 {sep_token}:1",
        special_tokens=[(cls_token, 2), (sep_token, 3)],
    )
    # The consumer (pretrain windows, finetune max_length) decides; nothing hidden in the file.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


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

    @property
    def raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.raw_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    texts: list[str]
    is_val: np.ndarray
    raw_bytes: np.ndarray


def _prepare(start: int, array: pa.Array, plan: SplitPlan) -> _Batch | None:
    mask = _document_mask(array)
    if not mask.any():
        return None
    lengths = _byte_lengths(array)
    if mask.all():
        texts = array.to_pylist()
        rows = np.arange(start, start + len(array))
    else:
        texts = array.filter(pa.array(mask)).to_pylist()
        rows = np.flatnonzero(mask) + start
        lengths = lengths[mask]
    return _Batch(texts=texts, is_val=plan.is_val(rows), raw_bytes=lengths)


def _flatten(encodings: list[Encoding], sep: int) -> list[int]:
    # Growing one list with += is the fastest pure-Python concatenation measured here (faster
    # than np.fromiter over itertools.chain and than per-document np.asarray + np.concatenate).
    flat: list[int] = []
    extend, append = flat.extend, flat.append
    for encoding in encodings:
        extend(encoding.ids)
        append(sep)
    return flat


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
    quiet: bool = True,
) -> tuple[ShardIndex, PackStats]:
    """Encode every document (no post-processor) + the sep id into `train_*.bin` / `val_*.bin`.

    Streams `batch_rows` documents at a time through ``encode_batch_fast`` (Rust thread pool, no
    offsets). With `pipelined`, the next batch is encoded on a worker thread (tokenizers releases
    the GIL) while this thread turns the previous batch into a numpy array and writes it, so the
    Python share of the work overlaps with the Rust share. Memory holds at most two batches.
    On 2 cores the Python share is ~4% and the overlap measured no gain (ratio 0.99-1.09, see
    benchmarks/tokenize_throughput.py); it matters on many cores, where Rust scales and Python does not.

    Writes index.json (special ids, dtype, sha256 of the tokenizer file) and returns the index and
    the per-split counts. The dtype is uint16 when every id fits, else uint32.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    id_bound = max(vocab.values()) + 1  # not len(vocab): ids of a hand-made vocab may be sparse
    dtype = dtype_for_vocab(id_bound)
    sep, unk = SPECIAL_IDS["sep"], SPECIAL_IDS["unk"]
    writers = {
        name: ShardWriter(out_dir, split=name, dtype=dtype, shard_tokens=shard_tokens)
        for name in ("train", "val")
    }
    stats = {name: SplitStats() for name in writers}
    bar = progress_bar(desc="tokenize: encode", total=plan.raw_bytes, unit="B", quiet=quiet)

    # encode_batch_fast (tokenizers >= 0.21) skips computing offsets, which shards do not need.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode(texts: list[str]) -> list[Encoding]:
        return encode_batch(texts, add_special_tokens=False)

    def write(name: str, encodings: list[Encoding], raw_bytes: int) -> None:
        if not encodings:
            return
        ids = np.asarray(_flatten(encodings, sep), dtype=dtype)
        writers[name].append(ids, documents=len(encodings))
        split = stats[name]
        split.documents += len(encodings)
        split.tokens += int(ids.size)
        split.raw_bytes += raw_bytes
        split.unk_tokens += int(np.count_nonzero(ids == unk))

    def consume(encodings: list[Encoding], batch: _Batch) -> None:
        if batch.is_val.any():
            picks = batch.is_val.tolist()
            write(
                "val",
                [e for e, v in zip(encodings, picks, strict=True) if v],
                int(batch.raw_bytes[batch.is_val].sum()),
            )
            write(
                "train",
                [e for e, v in zip(encodings, picks, strict=True) if not v],
                int(batch.raw_bytes[~batch.is_val].sum()),
            )
        else:
            write("train", encodings, int(batch.raw_bytes.sum()))
        bar.update(int(batch.raw_bytes.sum()))

    began = time.perf_counter()
    try:
        batches = (_prepare(start, array, plan) for start, array in pool.batches(batch_rows))
        if pipelined:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as executor:
                pending: tuple[Future[list[Encoding]], _Batch] | None = None
                for batch in batches:
                    if batch is None:
                        continue
                    future = executor.submit(encode, batch.texts)
                    if pending is not None:
                        consume(pending[0].result(), pending[1])
                    pending = (future, batch)
                if pending is not None:
                    consume(pending[0].result(), pending[1])
        else:
            for batch in batches:
                if batch is not None:
                    consume(encode(batch.texts), batch)
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
    return index, PackStats(dtype=dtype.name, vocab_size=id_bound, seconds=seconds, splits=stats)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    """A temp folder next to the outputs; removed on failure (and after the moves on success)."""
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenize.tmp-", dir=parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if empty: we made it, and nothing else landed there
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staged: Path, target: Path) -> None:
    """Replace `target` by `staged` (same filesystem); the old target is removed only afterwards."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staged, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staged, target)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _report(
    params: TokenizerParams,
    *,
    vocab_size: int,
    plan: SplitPlan,
    stats: PackStats,
    train_seconds: float,
    sha: str,
    skipped: int,
) -> dict[str, Any]:
    splits = stats.splits
    documents = sum(s.documents for s in splits.values())
    tokens = sum(s.tokens for s in splits.values())
    content_tokens = tokens - documents  # without the sep after each document
    unk = sum(s.unk_tokens for s in splits.values())
    return {
        "kind": params.kind,
        "vocab_size": vocab_size,
        "vocab_size_requested": params.vocab_size,
        "dtype": stats.dtype,
        "tokenizer_sha256": sha,
        "documents": {name: s.documents for name, s in splits.items()},
        "tokens": {name: s.tokens for name, s in splits.items()},
        "raw_bytes": {name: s.raw_bytes for name, s in splits.items()},
        "shards": {name: s.shards for name, s in splits.items()},
        "skipped_blank_rows": skipped,
        "total_documents": documents,
        "total_tokens": tokens,
        "total_raw_bytes": stats.raw_bytes,
        # Share of [UNK] among content tokens (the sep after each document not counted).
        "unk_rate": unk / content_tokens if content_tokens else 0.0,
        "mean_tokens_per_doc": content_tokens / documents if documents else 0.0,
        "bytes_per_token": stats.raw_bytes / content_tokens if content_tokens else 0.0,
        "train_seconds": train_seconds,
        "encode_seconds": stats.seconds,
        "encode_mb_per_s": stats.mb_per_s,
    }


def _numeric(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numeric(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def run_tokenize(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Train the tokenizer, pack the shards, write the report; returns the report.

    Bad input raises DataError before any output exists: a missing pool ("run the prepare stage
    first"), no `text` column, no documents (or only one), a vocab too small for the alphabet.
    """
    from bigmodel_ops.tracking import stage_run

    tp = params.tokenizer
    check_vocab_size(tp)
    pool = TextPool.open(paths.prepared / POOL_FILE)
    plan = plan_split(pool, seed=params.project.seed, val_fraction=tp.val_fraction)

    with stage_run(params, stage="tokenize") as run, _staging(paths.outputs) as staging:
        began = time.perf_counter()
        tokenizer = train_tokenizer(tp, pool=pool, plan=plan, batch_rows=tp.encode_batch_size, quiet=quiet)
        train_seconds = time.perf_counter() - began
        tokenizer_dir = staging / "tokenizer"
        tokenizer_dir.mkdir()
        tokenizer_file = tokenizer_dir / paths.tokenizer_file.name
        tokenizer.save(str(tokenizer_file))
        sha = tokenizer_sha256(tokenizer_file)

        shards_dir = staging / "shards"
        index, stats = pack_shards(
            tokenizer,
            pool=pool,
            out_dir=shards_dir,
            plan=plan,
            batch_rows=tp.encode_batch_size,
            shard_tokens=tp.shard_tokens,
            tokenizer_sha=sha,
            quiet=quiet,
        )
        ShardIndex.load(shards_dir)  # the consumer's own checks, before anything is published
        report = _report(
            tp,
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            plan=plan,
            stats=stats,
            train_seconds=train_seconds,
            sha=sha,
            skipped=plan.rows - plan.documents,
        )
        report_file = staging / paths.tokenize_report.name
        report_file.write_text(json.dumps(report, indent=2) + "\n")

        run.log_params({"tokenizer": tp.model_dump(mode="json")})
        run.log_params({"tokenize.vocab_size_actual": report["vocab_size"], "tokenize.dtype": stats.dtype})
        run.set_tags({"bigmodel_ops.tokenizer_sha256": sha})
        run.log_metrics(_numeric({k: v for k, v in report.items() if k != "vocab_size_requested"}), step=0)
        run.log_artifact(tokenizer_file, "tokenizer")
        run.log_artifact(index.directory / "index.json", "shards")
        run.log_artifact(report_file, "metrics")
        run.flush()

        _move_into_place(tokenizer_dir, paths.tokenizer_dir)
        _move_into_place(shards_dir, paths.shards)
        _move_into_place(report_file, paths.tokenize_report)
    return report
