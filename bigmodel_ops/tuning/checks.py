"""Checks the tune stage runs before any trial: each names the setting or file to fix.

A search that fails on its first trial wastes a worker start at best; one that fails on its
twentieth (a LoRA draw, a pooling draw) wastes hours. Everything that can be checked from the
inputs and the search space is checked here, before the study is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna

from bigmodel_ops.classification.inputs import TokenizedSplit
from bigmodel_ops.classification.training import HyperParams, prepare_model
from bigmodel_ops.config import SearchSpace
from bigmodel_ops.contract import CONFIG_FILE, TOKENIZER_FILE, load_tokenizer
from bigmodel_ops.errors import CheckpointError, ConfigError, DataError
from bigmodel_ops.model import read_exported_config


def check_vocabulary(model_dir: Path) -> None:
    """CheckpointError naming both files when the tokenizer's vocabulary size differs from the
    backbone's ``vocab_size`` (a backbone pretrained with another tokenizer: token ids would
    index the wrong, or missing, embedding rows)."""
    config, _ = read_exported_config(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE, error=CheckpointError)
    size = tokenizer.get_vocab_size()
    if size != config.vocab_size:
        raise CheckpointError(
            f"{model_dir / TOKENIZER_FILE}: vocabulary of {size} tokens, but the backbone "
            f"{model_dir / CONFIG_FILE} has vocab_size {config.vocab_size}: the model was pretrained "
            "with another tokenizer (re-run the tokenize and pretrain stages together)"
        )


def check_classes(train: TokenizedSplit, labels: Sequence[str], *, source: Path) -> None:
    """DataError naming ``prepare.labels`` and the class when a declared label has no row in the
    training split (a classifier cannot learn a class it never sees)."""
    counts = np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(labels))
    missing = [labels[i] for i in np.flatnonzero(counts[: len(labels)] == 0)]
    if missing:
        raise DataError(
            f"{source}: no training row has label {', '.join(repr(m) for m in missing)} of "
            f"prepare.labels {list(labels)}; drop it from prepare.labels or add examples and re-run prepare"
        )


def check_searchable_models(
    model_dir: Path, *, num_labels: int, base: HyperParams, space: SearchSpace
) -> None:
    """Build the model of every discrete variant a trial can draw that changes its structure:
    the base settings, and ``method: lora`` when the space can draw it (so LoRA targets that match
    nothing fail now, as ConfigError naming ``finetune.lora.target_modules``), and every
    categorical ``pooling`` choice."""
    prepare_model(model_dir, num_labels=num_labels, hparams=base)
    variants: list[dict] = []
    for key, dist in space.items():
        if dist.type == "categorical" and key in ("method", "pooling"):
            variants += [{key: choice} for choice in dist.choices if choice != getattr(base, key)]
    for variant in variants:
        prepare_model(model_dir, num_labels=num_labels, hparams=base.override(variant))


def check_direction(study: optuna.Study, direction: str, *, metric: str) -> None:
    """ConfigError naming ``tune.metric`` when the study already exists with another direction."""
    existing = study.direction.name.lower()
    if existing != direction:
        raise ConfigError(
            f"tune.metric = {metric!r}: study {study.study_name!r} already exists in the storage and "
            f"is {existing}d, but {metric} is {direction}d; use another storage (tune.storage) or "
            "delete that study"
        )
