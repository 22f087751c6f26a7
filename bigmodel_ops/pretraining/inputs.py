"""Checks of the pretrain stage's inputs, and its step budget: cheap, before any training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bigmodel_ops.contract import load_tokenizer
from bigmodel_ops.errors import DataError
from bigmodel_ops.fsutil import sha256_file
from bigmodel_ops.pretraining.masking import word_continuation_ids
from bigmodel_ops.shards import ShardIndex

# Tokens of each shard checked for out-of-range ids (a full scan of a huge corpus would
# cost minutes; the tokenize stage writes only valid ids, this catches foreign shards).
_ID_CHECK_TOKENS = 2_000_000


def check_tokenizer(tokenizer_file: Path, index: ShardIndex) -> tuple[str, int]:
    """(sha256, vocab size) of tokenizer.json after checking it against the shards index."""
    if not tokenizer_file.is_file():
        raise DataError(f"{tokenizer_file}: tokenizer not found (run the tokenize stage first)")
    sha = sha256_file(tokenizer_file)
    if index.tokenizer_sha256 and index.tokenizer_sha256 != sha:
        raise DataError(
            f"{tokenizer_file}: sha256 {sha[:12]}... differs from the tokenizer the shards in "
            f"{index.directory} were made with ({index.tokenizer_sha256[:12]}...); re-run the tokenize stage"
        )
    vocab = load_tokenizer(tokenizer_file).get_vocab_size()
    if vocab != index.vocab_size:
        raise DataError(
            f"{index.directory / 'index.json'}: vocab_size {index.vocab_size} does not match the tokenizer "
            f"{tokenizer_file} ({vocab} tokens); re-run the tokenize stage"
        )
    return sha, vocab


def continuation_ids(tokenizer_file: Path) -> tuple[int, ...]:
    """For whole-word masking: the ids of the tokenizer's pieces that continue a word (none for a
    tokenizer whose model has no word pieces, where whole-word masking is token masking)."""
    tokenizer = load_tokenizer(tokenizer_file)
    model = json.loads(tokenizer.to_str())["model"]["type"]
    return tuple(int(i) for i in word_continuation_ids(tokenizer.get_vocab(), model=model))


def check_token_ids(index: ShardIndex, *, vocab_size: int) -> None:
    """DataError if a shard holds ids outside the model vocabulary (checks each shard's head)."""
    for split, infos in index.splits.items():
        for info, tokens in zip(infos, index.open_split(split), strict=True):
            head = np.asarray(tokens[:_ID_CHECK_TOKENS])
            top = int(head.max()) if head.size else 0
            if top >= vocab_size:
                raise DataError(
                    f"{index.directory / info.file}: token id {top} is outside the model vocabulary "
                    f"(vocab_size {vocab_size}); the shards do not belong to this tokenizer"
                )


def special_ids(index: ShardIndex, *, objective: str) -> dict[str, int]:
    """The shards' special token ids; DataError when the objective needs one that is missing."""
    needed = ["sep"] + (["mask"] if objective == "masked" else [])
    missing = [name for name in needed if name not in index.special_ids]
    if missing:
        raise DataError(
            f"{index.directory / 'index.json'}: special_ids lacks {missing} (needed for {objective} LM)"
        )
    return index.special_ids


def budget_steps(*, max_steps: int | None, max_tokens: int | None, tokens_per_step: int) -> int:
    """Optimizer steps of the budget: the smaller of max_steps and ceil(max_tokens / tokens_per_step)."""
    candidates = []
    if max_steps is not None:
        candidates.append(max_steps)
    if max_tokens is not None:
        candidates.append(-(-max_tokens // tokens_per_step))
    return max(1, min(candidates))
