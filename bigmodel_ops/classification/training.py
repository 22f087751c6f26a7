"""Fine-tuning a :class:`~bigmodel_ops.classification.model.SequenceClassifier` with Lightning.

:class:`ClassifierModule` (AdamW, linear warmup + linear decay, optional frozen backbone, val loss /
accuracy / macro F1 per epoch), :class:`ClassificationDataModule` and :func:`fit_classifier`, shared
by the tune and finetune stages. Plain objects in (:class:`FitConfig`, :class:`HyperParams`): the
params schema stays in the stage modules. The Trainer is :func:`bigmodel_ops.trainer.build_trainer`,
the same builder pretraining uses.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from bigmodel_ops.classification.inputs import TokenizedSplit, collate
from bigmodel_ops.classification.metrics import confusion_matrix, metrics_from_confusion
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.model import load_pretrained, parameter_groups
from bigmodel_ops.trainer import build_trainer


@dataclass(frozen=True)
class FitConfig:
    """How a classifier is fine-tuned, apart from the searched hyperparameters."""

    num_labels: int
    seed: int
    warmup_ratio: float = 0.1
    freeze_backbone: bool = False
    grad_clip: float = 1.0
    accelerator: str = "cpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0


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
        self._train_loss_sum: torch.Tensor | None = None
        self._train_loss_count = 0

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(idx, lengths)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["idx"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        detached = loss.detach()
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_loss_count += 1
        return loss

    def take_train_loss(self) -> float | None:
        """Mean train loss since the last call (one device sync), or None without steps."""
        if self._train_loss_sum is None or not self._train_loss_count:
            return None
        value = float(self._train_loss_sum.item()) / self._train_loss_count
        self._train_loss_sum, self._train_loss_count = None, 0
        return value

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
        # Already global: no sync_dist. Shown on the progress bar and seen by Optuna's pruner.
        self.log_dict(self.last_val, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in parameter_groups(self.model, weight_decay=self.weight_decay) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _SplitDataset(torch.utils.data.Dataset):
    def __init__(self, split: TokenizedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.split.ids[index], int(self.split.labels[index])


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


def build_classifier(model_dir: Path, *, num_labels: int, dropout: float) -> SequenceClassifier:
    """The pretrained backbone (safetensors) with a fresh head; dropout applies to both."""
    backbone = load_pretrained(model_dir, dropout=dropout)
    return SequenceClassifier(backbone, num_labels=num_labels, dropout=dropout)


def fit_classifier(
    fit: FitConfig,
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
    """Seed, build the classifier from the pretrained model and fine-tune it (train + val).

    ``single_device`` ignores the devices / nodes / strategy of ``fit`` (one Optuna trial per
    process); ``train_fraction`` trains each epoch on that share of the batches.
    """
    L.seed_everything(fit.seed, workers=True, verbose=False)
    model = build_classifier(model_dir, num_labels=fit.num_labels, dropout=hparams.dropout)
    module = ClassifierModule(
        model,
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        warmup_ratio=fit.warmup_ratio,
        freeze_backbone=fit.freeze_backbone,
    )
    data = ClassificationDataModule(
        splits, batch_size=hparams.batch_size, seed=fit.seed, num_workers=fit.num_workers
    )
    distributed = (
        {"devices": 1}
        if single_device
        else {"devices": fit.devices, "num_nodes": fit.num_nodes, "strategy": fit.strategy}
    )
    trainer = build_trainer(
        accelerator=fit.accelerator,
        precision=fit.precision,
        max_epochs=max_epochs,
        gradient_clip_val=fit.grad_clip,
        validate="epoch",
        callbacks=callbacks,
        quiet=quiet or not sys.stderr.isatty(),
        limit_train_batches=train_fraction,
        **distributed,
    )
    with warnings.catch_warnings():
        # Small in-memory datasets: worker processes would cost more than they save.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data)
    return module, trainer
