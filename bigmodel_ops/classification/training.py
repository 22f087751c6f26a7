"""Fine-tuning a :class:`~bigmodel_ops.classification.model.SequenceClassifier` with Lightning.

:class:`ClassifierModule` (AdamW with per-layer groups, linear warmup + linear decay, label
smoothing, class weights, val loss / accuracy / macro F1 per epoch, best-epoch tracking and early
stopping), :func:`prepare_model` (pretrained or from-scratch backbone, pooling, LoRA, freezing) and
:func:`fit_classifier`, shared by the tune and finetune stages. The pieces they assemble are
their own modules: :mod:`.optimization` (parameter groups, LR schedule, freezing),
:mod:`.class_weights`, :mod:`.early_stopping` (best epoch), :mod:`.datamodule` (the loaders) and
:mod:`.lora` (adapters).
Plain objects in (:class:`FitConfig`, :class:`HyperParams`): the params schema stays in the
stage modules. The Trainer is :func:`bigmodel_ops.trainer.build_trainer`, the same builder
pretraining uses.

Errors name the ``finetune.*`` setting at fault: HyperParams' fields are the ``finetune`` params'
keys (``lora_<key>`` for ``finetune.lora.<key>``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel_ops.classification.averaging import WeightAverage
from bigmodel_ops.classification.class_weights import class_weight_tensor
from bigmodel_ops.classification.datamodule import ClassificationDataModule
from bigmodel_ops.classification.early_stopping import BestEpoch
from bigmodel_ops.classification.inputs import TokenizedSplit
from bigmodel_ops.classification.lora import DEFAULT_LORA_TARGETS, apply_lora, merge_lora
from bigmodel_ops.classification.metrics import val_metrics
from bigmodel_ops.classification.model import SequenceClassifier, resolve_pooling
from bigmodel_ops.classification.optimization import freeze, linear_warmup_decay, optimizer_groups
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.model import TransformerLM, load_pretrained, read_exported_config
from bigmodel_ops.trainer import build_trainer


@dataclass(frozen=True)
class FitConfig:
    """The run's fixed setup: label count, seed and hardware (never searched)."""

    num_labels: int
    seed: int
    accelerator: str = "cpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0


@dataclass(frozen=True)
class HyperParams:
    """Every fine-tuning setting a trial may override (the ``finetune`` params' training keys).

    Built from params with :meth:`from_dict` (``bigmodel_ops.pipeline._finetuning.hyperparams``);
    a trial or ``best_params.yaml`` changes any of them with :meth:`override` (``lora.rank`` and
    ``lora_rank`` both name :attr:`lora_rank`). Defaults are the schema's defaults.
    """

    lr: float = 2e-3
    dropout: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    max_epochs: int = 3
    warmup_ratio: float = 0.1
    head_lr_mult: float = 1.0  # the head's LR = lr * head_lr_mult
    layer_lr_decay: float = 1.0  # block i's LR = lr * decay ** (n_layer - i); embeddings one more
    grad_clip: float = 1.0
    pooling: str = "auto"  # auto | cls | mean | last | mean_max
    freeze_backbone: bool = False
    freeze_layers: int = 0  # >0: freeze the embeddings and the first k blocks
    label_smoothing: float = 0.0
    class_weights: str | tuple[float, ...] = "none"  # none | balanced | one weight per label
    from_scratch: bool = False
    method: str = "full"  # full | lora
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    early_stopping_patience: int = 0  # epochs without a better val_acc; 0 = off
    weight_averaging: str = "none"  # none | ema | swa: validate and export the run's averaged weights
    ema_decay: float = 0.9  # ema: avg = decay * avg + (1 - decay) * weights, after each optimizer step
    swa_start: float = 0.34  # swa: the uniform mean of the weights from this fraction of the steps on
    group_by_length: bool = True  # training batches of texts of similar length (LengthGroupedSampler)

    def __post_init__(self) -> None:
        # Lists (from YAML / JSON) become tuples: the dataclass stays hashable and comparable.
        if isinstance(self.class_weights, list):
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if isinstance(self.lora_target_modules, list | str):
            targets = self.lora_target_modules
            object.__setattr__(
                self, "lora_target_modules", (targets,) if isinstance(targets, str) else tuple(targets)
            )

    @staticmethod
    def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if key == "lora" and isinstance(value, Mapping):
                flat.update({f"lora_{k}": v for k, v in value.items()})
            else:
                flat[key.replace(".", "_") if key.startswith("lora.") else key] = value
        return flat

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HyperParams:
        """From a mapping shaped like the ``finetune`` params (a nested ``lora`` section allowed);
        keys that are not hyperparameters (use_tuned, control, max_length, truncation) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cls._flatten(values).items() if k in names and v is not None})

    def override(self, values: Mapping[str, Any]) -> HyperParams:
        """A copy with values replaced; ValueError naming unknown keys."""
        flat = self._flatten(values)
        unknown = sorted(set(flat) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"not fine-tuning settings: {unknown}")
        return _replace(self, **flat)

    def replace(self, **values: Any) -> HyperParams:
        return self.override(values)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ClassifierModule(L.LightningModule):
    """Fine-tunes a SequenceClassifier (or its LoRA-wrapped form); logs ``val_loss``, ``val_acc``
    and ``val_f1`` per epoch.

    Validation metrics are computed over the whole validation set at epoch end, exactly: under
    DDP each rank scores its shard, the logits are gathered with their row numbers, and the few
    rows a DistributedSampler repeats to even out the ranks are counted once (so the metrics are
    those of one process scoring the whole split, up to float rounding).
    ``val_loss`` is the plain cross-entropy (no smoothing, no class weights), comparable across
    settings; the training loss is the objective (label smoothing and class weights applied).

    Best epoch (:class:`~.early_stopping.BestEpoch`): the epoch with the highest ``val_acc`` (the
    first of equals) is kept in ``best_val`` / ``best_epoch`` with a CPU copy of its trainable
    weights; :meth:`restore_best` puts them back and :meth:`export_model` returns the plain
    classifier (best weights, adapters merged). With ``early_stopping_patience`` > 0, training
    stops after that many epochs without a better ``val_acc`` (``stopped_early``).

    Weight averaging (``weight_averaging``: ema | swa, :class:`~.averaging.WeightAverage`): the
    average is updated after every optimizer step; validation scores it, and the best epoch keeps
    its weights, so the export is the averaged classifier.
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: HyperParams,
        *,
        num_labels: int,
        n_layer: int,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.hp = hparams
        self.num_labels = num_labels
        self.n_layer = n_layer
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_rows: list[torch.Tensor] = []
        self.last_val: dict[str, float] = {}
        self.best = BestEpoch(hparams.early_stopping_patience)
        self._train_loss_sum: torch.Tensor | None = None
        self._train_loss_count = 0
        self.diverged_at_step: int | None = None  # the optimizer step whose train loss was NaN/inf
        # Not an nn.Module attribute: the average's copy stays out of the optimizer, DDP and state_dict.
        self.averaging = WeightAverage(
            hparams.weight_averaging, decay=hparams.ema_decay, start=hparams.swa_start
        )

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(idx, lengths)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective: cross-entropy with label smoothing and class weights."""
        return F.cross_entropy(
            logits.float(), labels, weight=self.class_weights, label_smoothing=self.hp.label_smoothing
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["idx"], batch["lengths"])
        loss = self.loss(logits, batch["labels"])
        detached = loss.detach()
        if self.diverged_at_step is None and not bool(torch.isfinite(detached)):
            # Stop at the end of this step: nothing later can be trusted (the caller raises).
            self.diverged_at_step = int(self.global_step) + 1
            self.trainer.should_stop = True
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_loss_count += 1
        return loss

    def take_train_loss(self) -> float | None:
        """Mean train loss since the last call (one device sync), or None without steps.

        Under DDP, the mean over the ranks (one all-reduce; MetricsCallback calls this on every
        rank at the same steps): the loss of the global batch.
        """
        if self._train_loss_sum is None or not self._train_loss_count:
            return None
        mean = self._train_loss_sum.float() / self._train_loss_count
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        value = float(mean.item())
        self._train_loss_sum, self._train_loss_count = None, 0
        return value

    def on_fit_start(self) -> None:
        self.averaging.begin(self.model, total_steps=int(self.trainer.estimated_stepping_batches))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.averaging.update(self.model, step=int(self.global_step))

    def on_validation_epoch_start(self) -> None:
        self._val_logits.clear()
        self._val_labels.clear()
        self._val_rows.clear()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scored = self.averaging.model(self.model)
        self._val_logits.append(scored(batch["idx"], batch["lengths"]).float())
        self._val_labels.append(batch["labels"])
        if "rows" in batch:
            self._val_rows.append(batch["rows"])

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        labels = torch.cat(self._val_labels)
        if self.trainer.world_size > 1:
            logits = self.all_gather(logits).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
            if len(self._val_rows) == len(self._val_logits):
                # Each row once, in split order: drop the sampler's padding repeats.
                rows = self.all_gather(torch.cat(self._val_rows)).flatten(0, 1)
                order = torch.argsort(rows, stable=True)
                keep = torch.ones_like(order, dtype=torch.bool)
                keep[1:] = rows[order][1:] != rows[order][:-1]
                logits, labels = logits[order[keep]], labels[order[keep]]
        self.last_val = val_metrics(logits, labels, self.num_labels)
        # Already global: no sync_dist. Shown on the progress bar and seen by Optuna's pruner.
        self.log_dict(self.last_val, prog_bar=True)
        if not self.trainer.sanity_checking and self.best.update(
            self.last_val, epoch=self.current_epoch, model=self.averaging.model(self.model)
        ):
            self.trainer.should_stop = True

    @property
    def best_val(self) -> dict[str, float]:
        """The best epoch's val metrics ({} before any validation)."""
        return self.best.metrics

    @property
    def best_epoch(self) -> int | None:
        return self.best.epoch

    @property
    def stopped_early(self) -> bool:
        return self.best.stopped_early

    def restore_best(self) -> None:
        """Put the best epoch's weights back into the model (no-op before any validation)."""
        self.best.restore(self.model)

    def export_model(self) -> SequenceClassifier:
        """The plain classifier with the best epoch's weights, LoRA adapters merged."""
        self.restore_best()
        merged = merge_lora(self.model)
        self.model = merged
        return merged

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        groups = optimizer_groups(
            self.model,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            head_lr_mult=hp.head_lr_mult,
            layer_lr_decay=hp.layer_lr_decay,
            n_layer=self.n_layer,
        )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_classifier(
    model_dir: Path,
    *,
    num_labels: int,
    dropout: float,
    pooling: str = "auto",
    from_scratch: bool = False,
) -> SequenceClassifier:
    """The backbone with a fresh head; dropout applies to both.

    Pretrained: the weights of model_dir (safetensors). ``from_scratch``: the same architecture
    (model_dir's config.json) with random init from the current torch seed. A pooling that does
    not fit the backbone's objective is a ConfigError naming ``finetune.pooling``.
    """
    if from_scratch:
        config, _ = read_exported_config(model_dir)
        backbone = TransformerLM(_replace(config, dropout=dropout))
    else:
        backbone = load_pretrained(model_dir, dropout=dropout)
    try:
        return SequenceClassifier(backbone, num_labels=num_labels, dropout=dropout, pooling=pooling)
    except ValueError as error:
        if "pooling" in str(error):
            raise ConfigError(f"finetune.pooling: {error} ({model_dir})") from None
        raise


def check_hparams(hparams: HyperParams, *, n_layer: int, num_labels: int, objective: str) -> None:
    """The checks that need the backbone or the labels; ConfigError naming the setting."""
    try:
        resolve_pooling(hparams.pooling, objective)
    except ValueError as error:
        raise ConfigError(f"finetune.pooling: {error}") from None
    if not 0 <= hparams.freeze_layers <= n_layer:
        raise ConfigError(
            f"finetune.freeze_layers = {hparams.freeze_layers}: the backbone has {n_layer} blocks "
            f"(0..{n_layer}; use finetune.freeze_backbone to freeze everything)"
        )
    if hparams.method not in ("full", "lora"):
        raise ConfigError(f"finetune.method: {hparams.method!r} is not full or lora")
    if not isinstance(hparams.class_weights, str) and len(hparams.class_weights) != num_labels:
        class_weight_tensor(hparams.class_weights, np.zeros(0), num_labels)  # raises, naming it


def prepare_model(
    model_dir: Path, *, num_labels: int, hparams: HyperParams, seed: int | None = None
) -> nn.Module:
    """The model as it will train: built (pretrained or from scratch), LoRA-wrapped for
    ``method: lora`` (ConfigError naming ``finetune.lora.target_modules`` when a target matches
    nothing), frozen as asked. Seeds torch first when ``seed`` is given."""
    if seed is not None:
        L.seed_everything(seed, workers=True, verbose=False)
    config, _ = read_exported_config(model_dir)
    check_hparams(hparams, n_layer=config.n_layer, num_labels=num_labels, objective=config.objective)
    model: nn.Module = build_classifier(
        model_dir,
        num_labels=num_labels,
        dropout=hparams.dropout,
        pooling=hparams.pooling,
        from_scratch=hparams.from_scratch,
    )
    if hparams.method == "lora":
        model = apply_lora(
            model,
            rank=hparams.lora_rank,
            alpha=hparams.lora_alpha,
            dropout=hparams.lora_dropout,
            targets=hparams.lora_target_modules,
        )
    freeze(model, freeze_backbone=hparams.freeze_backbone, freeze_layers=hparams.freeze_layers)
    return model


def fit_classifier(
    fit: FitConfig,
    *,
    model_dir: Path,
    splits: Mapping[str, TokenizedSplit],
    hparams: HyperParams,
    max_epochs: int | None = None,
    callbacks: Sequence[L.Callback] = (),
    quiet: bool = False,
    single_device: bool = False,
    train_fraction: float = 1.0,
) -> tuple[ClassifierModule, L.Trainer]:
    """Seed, build the classifier (:func:`prepare_model`) and fine-tune it (train + val).

    ``max_epochs`` overrides ``hparams.max_epochs`` (the tune stage's budget per trial).
    ``single_device`` ignores the devices / nodes / strategy of ``fit`` (one Optuna trial per
    process); ``train_fraction`` trains each epoch on that share of the batches. After training
    the module's model holds the last epoch's weights; ``module.export_model()`` gives the best.
    """
    model = prepare_model(model_dir, num_labels=fit.num_labels, hparams=hparams, seed=fit.seed)
    weights = class_weight_tensor(hparams.class_weights, splits["train"].labels, fit.num_labels)
    config, _ = read_exported_config(model_dir)
    module = ClassifierModule(
        model, hparams, num_labels=fit.num_labels, n_layer=config.n_layer, class_weights=weights
    )
    data = ClassificationDataModule(
        splits,
        batch_size=hparams.batch_size,
        seed=fit.seed,
        num_workers=fit.num_workers,
        group_by_length=hparams.group_by_length,
    )
    distributed = (
        {"devices": 1}
        if single_device
        else {"devices": fit.devices, "num_nodes": fit.num_nodes, "strategy": fit.strategy}
    )
    trainer = build_trainer(
        accelerator=fit.accelerator,
        precision=fit.precision,
        max_epochs=max_epochs or hparams.max_epochs,
        gradient_clip_val=hparams.grad_clip,
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


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ClassifierModule",
    "FitConfig",
    "HyperParams",
    "build_classifier",
    "fit_classifier",
    "prepare_model",
]
