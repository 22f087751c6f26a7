"""Fabricated inputs of the tune / finetune / evaluate stages.

The real ones come from the prepare, tokenize and pretrain stages; these are built the same way
(real WordPiece tokenizer, real TransformerLM exported with save_pretrained, real Parquet files
with the prepare stage's schema), only tiny.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bigmodel_ops.config import Params, parse_params
from bigmodel_ops.model import TransformerLM, save_pretrained
from bigmodel_ops.paths import ProjectPaths
from tests.tiny import merge, tiny_model_config
from tests.tiny import tiny_params as base_params

LABELS = ["negative", "positive"]
_GOOD = ["great", "wonderful", "superb", "lovely", "brilliant", "moving"]
_BAD = ["awful", "boring", "terrible", "dull", "clumsy", "tedious"]
_FILL = ["the", "film", "movie", "plot", "acting", "was", "really", "quite", "and", "story", "a"]


def make_texts(n: int, *, seed: int) -> list[tuple[str, str]]:
    """(text, label) pairs; the label is decided by sentiment words, so it is learnable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = rng.choices(_FILL, k=rng.randint(3, 12))
        cue = _GOOD if label == "positive" else _BAD
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(cue))
        rows.append((" ".join(words), label))
    return rows


def write_split(path: Path, rows: list[tuple[str, str]], labels: list[str] = LABELS) -> None:
    """A labeled split with the prepare stage's schema: text, label, label_id (int32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [labels.index(label) if label in labels else 99 for _, label in rows]
    table = pa.table(
        {
            "text": pa.array([t for t, _ in rows], pa.string()),
            "label": pa.array([label for _, label in rows], pa.string()),
            "label_id": pa.array(ids, pa.int32()),
        }
    )
    pq.write_table(table, path)


def train_tokenizer(texts: list[str], path: Path) -> None:
    """A tiny WordPiece tokenizer with the tokenize stage's specials and [CLS] $A [SEP] post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, min_frequency=1, special_tokens=specials)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def make_pretrained(directory: Path, texts: list[str], *, objective: str, seed: int = 0) -> TransformerLM:
    """An untrained tiny TransformerLM exported like the pretrain stage does, plus tokenizer.json."""
    import torch
    from tokenizers import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, directory / "tokenizer.json")
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    model = TransformerLM(tiny_model_config(vocab_size=vocab, objective=objective))
    save_pretrained(model, directory)
    return model


def tiny_params(**overrides: Any) -> dict[str, Any]:
    """The tiny params (tests/tiny.py) of a tune / finetune / evaluate test; overrides are
    {section: {key: value}} merged in."""
    raw = base_params(project={"name": "ft-test"}, model={"objective": "masked"})
    raw["prepare"] = {"source": {"kind": "csv", "path": "unused.csv"}, "labels": list(LABELS)}
    raw["tune"] = {
        "n_trials": 2,
        "max_epochs": 1,
        "sampler": "random",
        "pruner": "none",
        "report_every_n_steps": 1,
        "search_space": {
            "lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.3},
            "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
            "batch_size": {"type": "categorical", "choices": [16]},
        },
    }
    raw["finetune"] = {"max_epochs": 2, "batch_size": 16, "lr": 3e-3, "max_length": 24, "use_tuned": False}
    raw["evaluate"] = {"batch_size": 32, "min_accuracy": 0.0}
    return merge(raw, overrides)


def make_project(
    root: Path, *, objective: str = "masked", n_train: int = 64, n_eval: int = 24, **overrides: Any
) -> tuple[Params, ProjectPaths, Path]:
    """Fabricate prepared splits + a pretrained model under root; write root/params.yaml.

    Returns (params, paths, params file). Paths are absolute under root.
    """
    paths = ProjectPaths(root=root)
    train = make_texts(n_train, seed=1)
    write_split(paths.prepared / "train.parquet", train)
    write_split(paths.prepared / "val.parquet", make_texts(n_eval, seed=2))
    write_split(paths.prepared / "test.parquet", make_texts(n_eval, seed=3))
    make_pretrained(paths.pretrained_model, [t for t, _ in train], objective=objective)
    raw = tiny_params(**overrides)
    raw["model"]["objective"] = objective
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw), paths, params_file


def card_of(params: Params, classifier_config: dict[str, Any]) -> str:
    """The model card of version 1 of a classifier with this config.json (no metrics, no promotion)."""
    from bigmodel_ops.evaluation.card import model_card

    return model_card(
        name="m",
        version=1,
        labels=list(LABELS),
        metrics={},
        promotion={},
        version_tags={},
        params=params,
        classifier_config=classifier_config,
    )


def refit_restarts(params: Params, paths: ProjectPaths, n: int) -> list[Any]:
    """The finetune stage's first ``n`` restarts fitted again (same seeds, same settings), each
    exported at its best epoch, on CPU."""
    import dataclasses

    from bigmodel_ops.classification.restarts import restart_seed
    from bigmodel_ops.classification.training import fit_classifier
    from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams, stage_splits

    fit, hparams, splits = fit_config(params), hyperparams(params), stage_splits(params, paths)
    runs = []
    for k in range(n):
        module, _ = fit_classifier(
            dataclasses.replace(fit, seed=restart_seed(fit.seed, k)),
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hparams,
            quiet=True,
        )
        runs.append(module.export_model().cpu())
    return runs
