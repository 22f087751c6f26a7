"""The tokenizer library of the `tokenize` stage: train a tokenizer on the pretraining pool and pack the pool into token shards.

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

Modules: ``pool`` (reading the Parquet pool), ``split`` (seeded train/val assignment), ``train``
(building and training the tokenizer), ``encode`` (exact ids with a cheaper normalizer where it is
equivalent), ``pack`` (encoding into shards). The stage itself is :mod:`bigmodel_ops.pipeline.tokenize`;
the special ids and file names are the contract of :mod:`bigmodel_ops.contract`.
"""

from bigmodel_ops.contract import SPECIAL_IDS, SPECIAL_NAMES, load_tokenizer
from bigmodel_ops.tokenizer.encode import SAFE_CHARS, BatchEncoder, light_twin, needs_full_normalizer
from bigmodel_ops.tokenizer.pack import PackStats, SplitStats, pack_shards
from bigmodel_ops.tokenizer.pool import POOL_FILE, TEXT_COLUMN, TextPool
from bigmodel_ops.tokenizer.split import SplitPlan, plan_split, unit_hash
from bigmodel_ops.tokenizer.train import (
    BYTE_ALPHABET,
    build_tokenizer,
    check_vocab_size,
    tokenizer_sha256,
    train_tokenizer,
)

__all__ = [
    "BYTE_ALPHABET",
    "POOL_FILE",
    "SAFE_CHARS",
    "SPECIAL_IDS",
    "SPECIAL_NAMES",
    "TEXT_COLUMN",
    "BatchEncoder",
    "PackStats",
    "SplitPlan",
    "SplitStats",
    "TextPool",
    "build_tokenizer",
    "check_vocab_size",
    "light_twin",
    "load_tokenizer",
    "needs_full_normalizer",
    "pack_shards",
    "plan_split",
    "tokenizer_sha256",
    "train_tokenizer",
    "unit_hash",
]
