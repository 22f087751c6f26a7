"""Training the tokenizer (WordPiece, BERT-like, or byte-level BPE) on the train documents."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bigmodel_ops.config import TokenizerParams
from bigmodel_ops.contract import CLS_ID, SEP_ID, SPECIAL_NAMES
from bigmodel_ops.errors import ConfigError, DataError
from bigmodel_ops.fsutil import sha256_file
from bigmodel_ops.progress import progress_bar
from bigmodel_ops.tokenizer.pool import TEXT_COLUMN, TextPool, document_mask
from bigmodel_ops.tokenizer.split import SplitPlan

# Byte-level BPE starts from all 256 byte symbols, whatever the corpus.
BYTE_ALPHABET = 256
# WordPiece marks a piece that continues a word: "play", "##ing".
SUBWORD_PREFIX = "##"


def tokenizer_sha256(path: Path | str) -> str:
    """Hex sha256 of the file's bytes (index.json records it so shards and tokenizer cannot drift)."""
    return sha256_file(path)


def build_tokenizer(
    params: TokenizerParams,
    *,
    show_progress: bool = False,
    pieces: list[str] | tuple[str, ...] = (),
    vocab_size: int | None = None,
) -> tuple[Tokenizer, Any]:
    """An untrained tokenizer and its trainer, configured from params.

    WordPiece only: ``pieces`` (``##`` pieces, see :func:`continuing_pieces`) get their ids before
    training, after the special tokens, in the order given; ``vocab_size`` replaces the params'.
    """
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
        tokenizer.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
        trainer = trainers.WordPieceTrainer(
            vocab_size=params.vocab_size if vocab_size is None else vocab_size,
            min_frequency=params.min_frequency,
            special_tokens=specials + list(pieces),
            limit_alphabet=params.limit_alphabet,
            continuing_subword_prefix=SUBWORD_PREFIX,
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


def continuing_pieces(params: TokenizerParams, batches: Iterable[list[str]]) -> list[str]:
    """The ``##`` pieces of single characters that WordPiece training on ``batches`` creates, sorted.

    The trainer creates them while it walks its word counts, a hash map whose order changes from
    one process to the next (huggingface/tokenizers issue #1794), and numbers them in that order.
    Where two candidate merges tie on count, the lower pair of ids wins, so the order decides which
    pieces are merged: on a small corpus (a few thousand sentences) the same data gave a different
    vocabulary, and so different shards and a different model, on every run. Registered before
    training, in sorted order, they get the same ids every time. This is a training run that
    stops before the first merge (the cost of counting the words once more). Edge case: with more
    distinct characters than ``limit_alphabet``, those tied on count at the cut are still
    chosen in hash order.
    """
    tokenizer, trainer = build_tokenizer(params, vocab_size=0)
    tokenizer.train_from_iterator(batches, trainer=trainer)
    return sorted(
        t for t in tokenizer.get_vocab() if t.startswith(SUBWORD_PREFIX) and len(t) == len(SUBWORD_PREFIX) + 1
    )


def canonical_ids(tokenizer: Tokenizer, *, keep: int) -> Tokenizer:
    """The WordPiece tokenizer with its ids renumbered in a fixed order: the first ``keep`` (the
    special tokens) unchanged, then single characters, then ``##`` characters, then longer pieces,
    each group sorted by text. Only the first ``keep`` stay added (special) tokens: pieces given to
    the trainer as special tokens (:func:`continuing_pieces`) become plain vocabulary.

    WordPiece encodes by longest match over the vocabulary, never by id, so the renumbering
    changes no tokenization, only makes the ids a function of the vocabulary.
    """
    import json

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    ordered = sorted(vocab, key=vocab.__getitem__)
    head, rest = ordered[:keep], ordered[keep:]
    rest.sort(key=lambda t: (len(t.removeprefix(SUBWORD_PREFIX)) > 1, t.startswith(SUBWORD_PREFIX), t))
    data["model"]["vocab"] = {token: index for index, token in enumerate(head + rest)}
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] in head]
    return Tokenizer.from_str(json.dumps(data))


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
    bar = progress_bar(desc="tokenize: train", total=plan.train_documents, unit="doc", quiet=quiet)

    def texts(count: bool = True) -> Iterator[list[str]]:
        for start, array in pool.batches(batch_rows):
            mask = document_mask(array)
            rows = np.arange(start, start + len(array))
            mask &= ~plan.is_val(rows)
            if mask.any():
                batch = array.filter(pa.array(mask)).to_pylist()
                if count:
                    bar.update(len(batch))
                yield batch

    try:
        pieces = continuing_pieces(params, texts(count=False)) if params.kind == "wordpiece" else []
        tokenizer, trainer = build_tokenizer(params, pieces=pieces)
        tokenizer.train_from_iterator(texts(), trainer=trainer, length=plan.train_documents)
    finally:
        bar.close()
    specials = params.special_tokens.as_list()
    if params.kind == "wordpiece":
        tokenizer = canonical_ids(tokenizer, keep=len(specials))
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
        special_tokens=[(cls_token, CLS_ID), (sep_token, SEP_ID)],
    )
    # The consumer (pretrain windows, finetune max_length) decides; nothing hidden in the file.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
