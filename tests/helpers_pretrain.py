"""A tiny, real pretraining project: WordPiece tokenizer, packed shards, params.yaml.

Built the way the tokenize stage builds its outputs (tokenizers WordPiece, ShardWriter,
ShardIndex), only small: a few thousand tokens, a vocabulary of ~100.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bigmodel_ops.config import Params, parse_params
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.shards import ShardIndex, ShardWriter, dtype_for_vocab
from tests.tiny import merge, tiny_params

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"]
_VERBS = ["sees", "likes", "finds", "follows", "watches", "hears"]
_OBJECTS = ["the ball", "a red house", "the river", "some bread", "the green tree", "a book"]


def sentences(n: int, *, seed: int) -> list[str]:
    """Simple subject-verb-object sentences: structured enough that the loss drops quickly."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} ." for _ in range(n)]


def train_tokenizer(path: Path) -> Any:
    """The test tokenizer, trained once per session and written to ``path``.

    Training it per project would not give the same tokenizer twice: the WordPiece trainer of
    HF tokenizers assigns the ids of continuing-subword tokens in hash-map order and breaks merge
    ties by id (huggingface/tokenizers#1794), so two projects built from the same sentences could
    get different vocabularies, and a resumed run would be compared with a differently tokenized
    reference.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_trained_tokenizer_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, min_frequency=1, special_tokens=SPECIALS)
    tokenizer.train_from_iterator(sentences(200, seed=0), trainer=trainer)
    return tokenizer.to_str()


def write_shards(
    paths: ProjectPaths,
    *,
    train_docs: int = 400,
    val_docs: int = 40,
    shard_tokens: int = 1024,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
) -> ShardIndex:
    """Tokenize sentences into train/val shards (several shard files per split) + index.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.tokenizer_file))
    vocab = tokenizer.get_vocab_size()
    sep = tokenizer.token_to_id("[SEP]")
    dtype = dtype_for_vocab(vocab)
    out = paths.shards
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n, seed in (("train", train_docs, 1), ("val", val_docs, 2)):
        writer = ShardWriter(out, split=split, dtype=dtype, shard_tokens=shard_tokens)
        for text in sentences(n, seed=seed):
            ids = tokenizer.encode(text, add_special_tokens=False).ids + [sep]
            writer.append(np.asarray(ids, dtype=dtype), documents=1)
        splits[split] = writer.close()
    index = ShardIndex(
        directory=out,
        dtype=dtype.name,
        vocab_size=vocab if vocab_size is None else vocab_size,
        special_ids={
            name: tokenizer.token_to_id(tok)
            for name, tok in zip(["pad", "unk", "cls", "sep", "mask"], SPECIALS, strict=True)
        },
        tokenizer_sha256=tokenizer_sha256
        if tokenizer_sha256 is not None
        else hashlib.sha256(paths.tokenizer_file.read_bytes()).hexdigest(),
        splits=splits,
    )
    index.write()
    return index


def write_params(root: Path, **overrides: Any) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params(**overrides), sort_keys=False))
    return path


def raw_params(**overrides: Any) -> dict[str, Any]:
    """The tiny params (tests/tiny.py) of a pretraining test; sections can be overridden."""
    raw = tiny_params(
        project={"name": "pt-test"},
        tracking={"spool_dir": "spool"},
        pretrain={
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "val_every_n_steps": 4,
            "val_batches": 2,
            "checkpoint_every_n_steps": 4,
            "register_model": True,
        },
    )
    return merge(raw, overrides)


def make_project(
    root: Path, *, train_docs: int = 400, val_docs: int = 40, **overrides: Any
) -> tuple[Params, ProjectPaths, Path]:
    """Tokenizer + shards under root/outputs and root/params.yaml; returns (params, paths, params file)."""
    paths = ProjectPaths(root=root)
    train_tokenizer(paths.tokenizer_file)
    write_shards(paths, train_docs=train_docs, val_docs=val_docs)
    raw = raw_params(**overrides)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw), paths, params_file


def ckpt_dir(paths) -> Path:
    """The one configuration folder under paths.pretrain_checkpoints (checkpoints are kept per configuration)."""
    (folder,) = sorted(paths.pretrain_checkpoints.glob("config-*"))
    return folder
