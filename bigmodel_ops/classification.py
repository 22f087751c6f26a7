"""Sequence classification on top of the pretrained transformer.

Four pieces, shared by the tune, finetune and evaluate stages:

- :class:`SequenceClassifier`: the pretrained :class:`~bigmodel_ops.model.TransformerLM` plus a
  dropout + Linear head over one pooled vector per text: the ``[CLS]`` state (position 0) for a
  masked (bidirectional) backbone, the last real token for a causal one (the only position that
  has seen the whole text);
- input checks and tokenisation: :func:`check_pretrained_dir`, :func:`read_labeled_split`,
  :func:`load_splits` (labeled Parquet -> token ids, with the pretrained model's tokenizer);
- training: :class:`ClassifierModule` (Lightning: AdamW, linear warmup + linear decay, optional
  frozen backbone, val loss / accuracy / macro F1 per epoch), :class:`ClassificationDataModule`,
  :func:`build_trainer` and :func:`fit_classifier`;
- export and inference: :func:`save_classifier` writes safetensors + config.json + tokenizer.json,
  :func:`load_classifier` reads them back (never pickle) into a :class:`TextClassifier` used by
  the evaluate stage and the MLflow pyfunc model (serving.py).

Token ids follow the tokenizer contract of the tokenize stage: pad=0, unk=1, cls=2, sep=3,
mask=4, and a ``[CLS] $A [SEP]`` post-processor.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel_ops.config import Params
from bigmodel_ops.errors import CheckpointError, DataError
from bigmodel_ops.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    TransformerLM,
    load_pretrained,
    load_weights,
    parameter_groups,
    read_exported_config,
)
from bigmodel_ops.training import engine

PAD_ID = 0
CLS_ID = 2
TOKENIZER_FILE = "tokenizer.json"
CLASSIFIER_FORMAT = "bigmodel_ops.classifier/1"
SPLITS = ("train", "val", "test")
LABELED_COLUMNS = ("text", "label", "label_id")


# ---------------------------------------------------------------------------------------------
# the model


def pooling_for(objective: str) -> str:
    """'cls' for a masked (bidirectional) backbone, 'last' for a causal one."""
    return "cls" if objective == "masked" else "last"


class SequenceClassifier(nn.Module):
    """A pretrained backbone plus a classification head over one pooled vector per sequence.

    Inputs are right-padded: ``idx`` (B, T) token ids and ``lengths`` (B,) real-token counts.
    For a masked backbone the padding is hidden from attention with a key padding mask, so a
    text's logits do not depend on how much padding its batch has. A causal backbone gets no
    mask: its attention already never looks right, so right padding cannot reach the last real
    token (and a mask would switch off the causal flag in SelfAttention).
    """

    def __init__(self, backbone: TransformerLM, *, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.pooling = pooling_for(backbone.config.objective)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        if self.backbone.lm_head.weight is not self.backbone.wte.weight:
            # An untied LM head takes no part in classification: keep it out of the optimizer
            # (and out of DDP's unused-parameter check).
            self.backbone.lm_head.weight.requires_grad_(False)

    def pool(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The pooled representation (B, C)."""
        if self.pooling == "cls":
            T = idx.size(1)
            mask = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            h = self.backbone.hidden(idx, key_padding_mask=mask)  # (B, T, C)
            return h[:, 0]
        h = self.backbone.hidden(idx)  # (B, T, C)
        last = (lengths - 1).clamp(min=0)
        return h[torch.arange(idx.size(0), device=idx.device), last]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_labels)."""
        return self.head(self.dropout(self.pool(idx, lengths)))


# ---------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts; rows are true labels, columns predictions."""
    flat = targets.long() * num_labels + preds.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, Any]:
    """accuracy, macro_f1 and per-class precision / recall (lists, in label order).

    A class that is never predicted has precision 0, one that never occurs recall 0 (and F1 0),
    as scikit-learn does with zero_division=0. An empty matrix gives accuracy 0.
    """
    cm = cm.double()
    tp = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
    }


# ---------------------------------------------------------------------------------------------
# inputs


def check_pretrained_dir(directory: Path) -> None:
    """CheckpointError naming the path when the pretrained model folder is incomplete."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: pretrained model not found (run the pretrain stage first)")
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing from the pretrained model folder")


def load_tokenizer(path: Path, *, max_length: int):
    """The saved HF tokenizer with truncation to max_length tokens (special tokens included)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: not a valid tokenizer file: {error}") from None
    tokenizer.no_padding()  # batches are padded by the collate function, to the batch's longest
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def effective_max_length(params: Params, config: ModelConfig) -> int:
    """finetune.max_length, capped by the backbone's context."""
    return min(params.finetune.max_length, config.block_size)


def read_labeled_split(path: Path, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Texts and class ids of one labeled Parquet split, checked against ``labels``.

    Raises DataError naming the file (and the row) when the file is missing or empty, lacks a
    column, has a label outside ``labels`` or a label_id that disagrees with the label's index.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: labeled split not found (run the prepare stage first)")
    try:
        table = pq.read_table(path, columns=list(LABELED_COLUMNS))
    except (pa.ArrowInvalid, OSError, KeyError) as error:
        raise DataError(f"{path}: cannot read columns {list(LABELED_COLUMNS)}: {error}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    for column in ("text", "label"):
        if table[column].null_count:
            row = pc.index(pc.is_null(table[column]), True).as_py()
            raise DataError(f"{path}: row {row}: column {column!r} is null")
    label_col = table["label"].cast(pa.string())
    known = pa.array(list(labels), type=pa.string())
    expected = pc.index_in(label_col, value_set=known)
    if expected.null_count:
        row = pc.index(pc.is_null(expected), True).as_py()
        value = label_col[row].as_py()
        raise DataError(
            f"{path}: row {row}: label {value!r} is not in prepare.labels {list(labels)} "
            "(the data was prepared with other labels: re-run the prepare stage)"
        )
    ids = table["label_id"].cast(pa.int64())
    mismatch = pc.not_equal(ids, expected.cast(pa.int64()))
    if pc.any(pc.fill_null(mismatch, True)).as_py():
        row = pc.index(pc.fill_null(mismatch, True), True).as_py()
        raise DataError(
            f"{path}: row {row}: label_id {ids[row].as_py()} does not match label "
            f"{label_col[row].as_py()!r} (index {expected[row].as_py()} in prepare.labels {list(labels)})"
        )
    return table["text"].to_pylist(), expected.to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class TokenizedSplit:
    ids: list[list[int]]
    labels: np.ndarray  # (N,) int64 class ids

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_texts(
    tokenizer, texts: Sequence[str], *, objective: str, source: str = "tokenizer"
) -> list[list[int]]:
    """Token ids per text; checks once that a masked backbone's inputs start with [CLS]."""
    ids = [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
    if objective == "masked" and ids and (not ids[0] or ids[0][0] != CLS_ID):
        raise CheckpointError(
            f"{source}: the tokenizer does not put [CLS] (id {CLS_ID}) first; a masked backbone "
            "pools the [CLS] state, so the tokenizer needs its '[CLS] $A [SEP]' post-processor"
        )
    return ids


def load_splits(
    params: Params, *, prepared: Path, model_dir: Path, splits: Sequence[str] = ("train", "val")
) -> dict[str, TokenizedSplit]:
    """Check the inputs and tokenise the named labeled splits with the pretrained model's tokenizer."""
    check_pretrained_dir(model_dir)
    config, _ = read_exported_config(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE, max_length=effective_max_length(params, config))
    result: dict[str, TokenizedSplit] = {}
    for split in splits:
        texts, labels = read_labeled_split(prepared / f"{split}.parquet", params.prepare.labels)
        ids = tokenize_texts(
            tokenizer, texts, objective=config.objective, source=str(model_dir / TOKENIZER_FILE)
        )
        result[split] = TokenizedSplit(ids=ids, labels=labels)
    return result


# ---------------------------------------------------------------------------------------------
# data


class _SplitDataset(torch.utils.data.Dataset):
    def __init__(self, split: TokenizedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.split.ids[index], int(self.split.labels[index])


def collate(batch: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest sequence: idx (B, T), lengths (B,), labels (B,)."""
    lengths = [max(len(ids), 1) for ids, _ in batch]  # an empty text becomes one pad token
    idx = torch.full((len(batch), max(lengths)), PAD_ID, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        if ids:
            idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {
        "idx": idx,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
    }


class ClassificationDataModule(L.LightningDataModule):
    """Train / val loaders over already tokenised splits (tokenise once, reuse across trials)."""

    def __init__(
        self, splits: Mapping[str, TokenizedSplit], *, batch_size: int, seed: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, split: str, *, shuffle: bool) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return torch.utils.data.DataLoader(
            _SplitDataset(self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", shuffle=False)


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class HyperParams:
    """The tuned fine-tuning hyperparameters."""

    lr: float
    dropout: float
    weight_decay: float
    batch_size: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lr": self.lr,
            "dropout": self.dropout,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
        }


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear ramp over warmup_steps (never 0 at step 0), then linear decay to 0."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class ClassifierModule(L.LightningModule):
    """Fine-tunes a SequenceClassifier; logs ``val_loss``, ``val_acc`` and ``val_f1`` per epoch.

    Validation metrics are computed over the whole validation set at epoch end (gathered
    across ranks under DDP; a DistributedSampler may repeat a few samples to even out ranks).
    """

    def __init__(
        self,
        model: SequenceClassifier,
        *,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.model.backbone.requires_grad_(False)
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self.last_val: dict[str, float] = {}

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(idx, lengths)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["idx"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=batch["labels"].numel())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_logits.clear()
        self._val_labels.clear()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_logits.append(self(batch["idx"], batch["lengths"]).float())
        self._val_labels.append(batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        labels = torch.cat(self._val_labels)
        if self.trainer.world_size > 1:
            logits = self.all_gather(logits).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        loss = F.cross_entropy(logits, labels)
        summary = metrics_from_confusion(confusion_matrix(logits.argmax(-1), labels, self.model.num_labels))
        self.last_val = {
            "val_loss": float(loss),
            "val_acc": summary["accuracy"],
            "val_f1": summary["macro_f1"],
        }
        for key, value in self.last_val.items():
            # Already global: no sync_dist.
            self.log(key, value, prog_bar=key == "val_acc")

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in parameter_groups(self.model, weight_decay=self.weight_decay) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MetricsLogger(L.Callback):
    """Send training metrics to an MLflow run (rank zero only).

    - ``train_loss`` every ``every_n_steps`` optimizer steps, at the global step;
    - after each validation epoch (not the sanity check): ``val_loss``, ``val_acc``, ``val_f1`` at
      the global step plus an ``epoch`` metric (``step="global"``), or at the epoch number
      (``step="epoch"``, as Optuna trials are reported).
    """

    def __init__(self, run: Any, *, every_n_steps: int, step: str = "global") -> None:
        self.run = run
        self.every_n_steps = every_n_steps
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self.step != "global":
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0 and isinstance(outputs, Mapping) and "loss" in outputs:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.run.log_metrics({"train_loss": float(outputs["loss"]), "lr": lr}, step=step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = dict(getattr(pl_module, "last_val", {}))
        if not values:
            return
        if self.step == "epoch":
            self.run.log_metrics(values, step=trainer.current_epoch)
        else:
            self.run.log_metrics(values, step=trainer.global_step, epoch=trainer.current_epoch)


def resolve_precision(params: Params) -> str:
    """The sizing profile's precision; auto = bf16-mixed on CUDA, 32-true elsewhere."""
    return engine.resolve_precision(params.sizing.precision, params.sizing.accelerator)


def build_trainer(
    params: Params,
    *,
    max_epochs: int,
    callbacks: Sequence[L.Callback] = (),
    quiet: bool = False,
    single_device: bool = False,
    train_fraction: float = 1.0,
) -> L.Trainer:
    """A Trainer sized by the active profile (single_device: one device, no distributed strategy)."""
    import sys

    sizing = params.sizing
    distributed = (
        {}
        if single_device
        else {
            "devices": sizing.devices,
            "num_nodes": sizing.num_nodes,
            "strategy": sizing.strategy,
        }
    )
    return L.Trainer(
        accelerator=sizing.accelerator,
        precision=resolve_precision(params),
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,  # metrics go to MLflow through MetricsLogger / the stage run
        enable_checkpointing=False,  # a few epochs of fine-tuning: the export is the checkpoint
        enable_model_summary=False,
        enable_progress_bar=not quiet and sys.stderr.isatty(),
        num_sanity_val_steps=0,
        gradient_clip_val=params.finetune.grad_clip or None,
        log_every_n_steps=params.tracking.log_every_n_steps,
        limit_train_batches=train_fraction,
        **({"devices": 1} if single_device else distributed),
    )


def build_classifier(model_dir: Path, *, num_labels: int, dropout: float) -> SequenceClassifier:
    """The pretrained backbone (safetensors) with a fresh head; dropout applies to both."""
    backbone = load_pretrained(model_dir, dropout=dropout)
    return SequenceClassifier(backbone, num_labels=num_labels, dropout=dropout)


def fit_classifier(
    params: Params,
    *,
    model_dir: Path,
    splits: Mapping[str, TokenizedSplit],
    hparams: HyperParams,
    max_epochs: int,
    callbacks: Sequence[L.Callback] = (),
    quiet: bool = False,
    single_device: bool = False,
    train_fraction: float = 1.0,
) -> tuple[ClassifierModule, L.Trainer]:
    """Seed, build the classifier from the pretrained model and fine-tune it (train + val)."""
    L.seed_everything(params.project.seed, workers=True, verbose=False)
    model = build_classifier(model_dir, num_labels=len(params.prepare.labels), dropout=hparams.dropout)
    module = ClassifierModule(
        model,
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        warmup_ratio=params.finetune.warmup_ratio,
        freeze_backbone=params.finetune.freeze_backbone,
    )
    data = ClassificationDataModule(
        splits, batch_size=hparams.batch_size, seed=params.project.seed, num_workers=params.sizing.num_workers
    )
    trainer = build_trainer(
        params,
        max_epochs=max_epochs,
        callbacks=callbacks,
        quiet=quiet,
        single_device=single_device,
        train_fraction=train_fraction,
    )
    with warnings.catch_warnings():
        # Small in-memory datasets: worker processes would cost more than they save.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings(
            "ignore", message=".*number of training batches.*smaller than the logging interval.*"
        )
        trainer.fit(module, datamodule=data)
    return module, trainer


# ---------------------------------------------------------------------------------------------
# export and inference


def save_classifier(
    model: SequenceClassifier,
    directory: Path,
    *,
    labels: Sequence[str],
    max_length: int,
    tokenizer_file: Path,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model.safetensors (backbone + head), config.json and tokenizer.json into directory."""
    import shutil

    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE))  # handles the tied embedding / LM head
    payload = {
        "format": CLASSIFIER_FORMAT,
        "config": model.backbone.config.to_dict(),
        "num_labels": model.num_labels,
        "labels": list(labels),
        "max_length": int(max_length),
        "pooling": model.pooling,
        "head_dropout": float(model.dropout.p),
        **dict(extra or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


def read_classifier_config(directory: Path) -> dict[str, Any]:
    """The classifier's config.json; CheckpointError naming the file when absent or invalid."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: classifier not found (run the finetune stage first)")
    if not path.is_file():
        raise CheckpointError(f"{path}: classifier config not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"{path}: not a classifier export (format {found!r}, expected {CLASSIFIER_FORMAT!r})"
        )
    for key in ("config", "labels", "max_length", "pooling"):
        if key not in payload:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return payload


@dataclass
class TextClassifier:
    """A loaded classifier: texts in, label ids / scores out (eval mode, no grad)."""

    model: SequenceClassifier
    tokenizer: Any
    labels: list[str]
    max_length: int
    config: dict[str, Any]

    def logits(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) float32 logits, computed in batches of batch_size texts."""
        self.model.eval()
        objective = self.model.backbone.config.objective
        out: list[torch.Tensor] = []
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = [str(t) for t in texts[start : start + batch_size]]
                ids = tokenize_texts(self.tokenizer, chunk, objective=objective)
                batch = collate([(row, 0) for row in ids])
                out.append(self.model(batch["idx"].to(device), batch["lengths"].to(device)).float().cpu())
        if not out:
            return torch.empty(0, len(self.labels))
        return torch.cat(out)

    def predict(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[list[str], list[float]]:
        """Predicted label and its softmax probability per text."""
        probs = torch.softmax(self.logits(texts, batch_size=batch_size), dim=-1)
        scores, ids = probs.max(dim=-1) if len(probs) else (torch.empty(0), torch.empty(0, dtype=torch.long))
        return [self.labels[i] for i in ids.tolist()], [float(s) for s in scores.tolist()]


def load_classifier(directory: Path | str) -> TextClassifier:
    """Load an exported classifier (safetensors; no pickle). CheckpointError on bad files."""
    directory = Path(directory)
    payload = read_classifier_config(directory)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config: {error}") from None
    labels = [str(label) for label in payload["labels"]]
    model = SequenceClassifier(TransformerLM(config), num_labels=len(labels), dropout=0.0)
    if payload["pooling"] != model.pooling:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: pooling {payload['pooling']!r} does not fit a {config.objective} backbone"
        )
    load_weights(model, directory, what="classifier")
    model.eval()
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE, max_length=int(payload["max_length"]))
    return TextClassifier(
        model=model, tokenizer=tokenizer, labels=labels, max_length=int(payload["max_length"]), config=payload
    )
