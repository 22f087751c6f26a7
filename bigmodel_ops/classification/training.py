"""Fine-tuning a :class:`~bigmodel_ops.classification.model.SequenceClassifier` with Lightning.

:class:`ClassifierModule` (AdamW, linear warmup + linear decay, optional frozen backbone, val loss /
accuracy / macro F1 per epoch), :class:`MetricsLogger` (metrics to an MLflow stage run),
:func:`build_trainer` and :func:`fit_classifier`, shared by the tune and finetune stages.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from bigmodel_ops.classification.data import ClassificationDataModule, TokenizedSplit
from bigmodel_ops.classification.metrics import confusion_matrix, metrics_from_confusion
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.config import Params
from bigmodel_ops.model import load_pretrained, parameter_groups
from bigmodel_ops.training import engine


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
