"""The LightningModule that pretrains a TransformerLM (causal or masked).

Design points:

- No host sync per step. The training loss is accumulated on the device (for logging)
  and a sticky non-finite flag is kept on the device; both are read only at logging and
  checkpoint steps (see callbacks.py).
- Checkpoints hold only weights_only-safe data: tensors, numbers, strings, lists and
  dicts. No `save_hyperparameters` (it would pickle arbitrary objects); our own metadata
  (model config, run id, data fingerprint) goes under ``checkpoint["bigmodel_ops"]``.
- The RNG states (torch CPU and CUDA, plus NumPy and Python for good measure) are saved
  and restored, because Lightning does not; dropout then continues bit-identically
  after a resume.

Nothing here imports pydantic or MLflow (the GPU benchmark runs this module bare).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel_ops.errors import TrainingDiverged
from bigmodel_ops.model import IGNORE_INDEX, ModelConfig, TransformerLM, parameter_groups
from bigmodel_ops.trainer import perplexity

CHECKPOINT_KEY = "bigmodel_ops"
CHECKPOINT_FORMAT = "bigmodel_ops.pretrain-ckpt/1"


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float = 0.9
    beta2: float = 0.95
    # None: fused on CUDA (one kernel for all parameters), the for-each path elsewhere.
    fused: bool | None = None


@dataclass(frozen=True)
class ElectraConfig:
    """Replaced-token detection (ELECTRA, Clark et al. 2020) for a masked backbone.

    A generator (a masked LM of ``generator_layers`` blocks that shares the backbone's token and
    position embeddings) predicts the masked positions; its samples replace them, and the
    backbone (the discriminator) learns at every position whether the token is the original.
    The loss is the generator's MLM loss plus ``rtd_weight`` times the discriminator's.
    """

    generator_layers: int = 1
    rtd_weight: float = 50.0


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `warmup_steps` steps, then cosine decay to
    `min_ratio * lr` at `total_steps`; constant at the minimum afterwards (a budget that
    was extended on resume keeps training at min_lr rather than rising again).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0 if step < total_steps else min_ratio
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def replace_with_samples(
    inputs: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    *,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELECTRA's corruption of a masked batch: (original (B, T), corrupted (B, T)).

    ``inputs`` (B, T) are the masked rows, ``positions`` / ``labels`` (B, M) the predicted slots
    and their original ids (IGNORE_INDEX for a slot a short row could not fill: left as it is),
    ``logits`` (B, M, V) the generator's predictions there. Each filled slot gets a token sampled
    from the generator (never a padding id at or above ``vocab_size``); every other position
    keeps its original token. No gradient flows through the sampling.
    """
    valid = labels != IGNORE_INDEX  # (B, M)
    at_slots = inputs.gather(1, positions)
    original = inputs.scatter(1, positions, torch.where(valid, labels, at_slots))
    with torch.no_grad():
        scores = logits.detach().float()
        scores[..., vocab_size:] = float("-inf")
        sampled = torch.distributions.Categorical(logits=scores).sample()  # (B, M)
    return original, original.scatter(1, positions, torch.where(valid, sampled, at_slots))


class _LRLambda:
    """The schedule as an object: LambdaLR saves its __dict__ (plain numbers) in checkpoints,
    so a resumed run keeps the schedule it started with even if the budget was extended."""

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(
            step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_ratio=self.min_ratio
        )


def build_optimizer(
    model: nn.Module, optim: OptimConfig, *, total_steps: int, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The pretrain stage's optimizer for ``model``: AdamW over :func:`parameter_groups` (weight decay
    on matrices only, never embeddings, norms or biases) and the warmup + cosine schedule of
    :func:`lr_factor` over ``total_steps``, to be stepped once per optimizer step. ``optim.fused``
    None means fused on CUDA and the for-each path elsewhere."""
    fused = optim.fused if optim.fused is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW(
        parameter_groups(model, weight_decay=optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        fused=fused,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _LRLambda(
            warmup_steps=optim.warmup_steps, total_steps=total_steps, min_ratio=optim.min_lr / optim.lr
        ),
    )
    return optimizer, schedule


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # NumPy and Python states as plain lists/ints: weights_only loading accepts them.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(obj: Any) -> Any:
    return [_to_lists(x) for x in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class LMModule(pl.LightningModule):
    """Pretraining of one TransformerLM.

    `meta` is a plain dict stored in every checkpoint (run id, data fingerprint, ...);
    `total_steps` sizes the LR schedule; `compile` wraps the model's forward with
    torch.compile in place (state-dict keys stay unprefixed). `unigram_entropy` (nats, of the
    val tokens the model predicts) is reported beside every val loss, with the gap between them.
    With `electra`, ``self.model`` is the discriminator (what is exported) and the val loss is the
    generator's MLM loss: the gap to unigram then measures the generator.
    """

    def __init__(
        self,
        config: ModelConfig,
        optim: OptimConfig,
        *,
        total_steps: int,
        compile: bool = False,
        meta: dict[str, Any] | None = None,
        unigram_entropy: float | None = None,
        electra: ElectraConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.optim = optim
        self.total_steps = total_steps
        self.meta: dict[str, Any] = dict(meta or {})
        self.model = TransformerLM(config)
        self.electra = electra
        if electra is not None:
            if config.objective != "masked":
                raise ValueError("replaced-token detection (electra) needs a masked backbone")
            self.generator = TransformerLM(replace(config, n_layer=electra.generator_layers))
            self.generator.wte = self.model.wte  # shared, as in ELECTRA: the generator's softmax
            self.generator.wpe = self.model.wpe  # trains every token's embedding
            self.generator.lm_head.weight = self.model.wte.weight
            self.rtd_head = nn.Linear(config.n_embd, 1)  # (B, T, C) -> replaced-or-not logit
        if compile:
            self.model.compile()
        self.train_loss_sum: torch.Tensor | None = None  # since the last log, on device
        self.train_loss_count = 0
        self._nonfinite: torch.Tensor | None = None  # sticky: any non-finite train loss so far
        self._val_sum: torch.Tensor | None = None
        self._val_count = 0
        self.last_val_loss: float | None = None
        self.unigram_entropy = unigram_entropy

    # -- steps -----------------------------------------------------------------------------

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "tokens" in batch:
            tokens = batch["tokens"]
            _, loss = self.model(tokens[:, :-1], tokens[:, 1:])
        elif self.electra is not None:
            _, loss = self.generator(batch["input_ids"], batch["labels"], positions=batch["positions"])
        else:
            _, loss = self.model(batch["input_ids"], batch["labels"], positions=batch["positions"])
        return loss

    def _electra_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's MLM loss + rtd_weight x the discriminator's replaced-token loss."""
        inputs, positions, labels = batch["input_ids"], batch["positions"], batch["labels"]
        logits, gen_loss = self.generator(inputs, labels, positions=positions)  # (B, M, V)
        original, corrupted = replace_with_samples(
            inputs, positions, labels, logits, vocab_size=self.config.vocab_size
        )
        h = self.model.hidden(corrupted)  # (B, T, C)
        replaced = (corrupted != original).float()  # a sample equal to the original is not replaced
        rtd_loss = F.binary_cross_entropy_with_logits(self.rtd_head(h).squeeze(-1).float(), replaced)
        return gen_loss + self.electra.rtd_weight * rtd_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._electra_loss(batch) if self.electra is not None else self._loss(batch)
        detached = loss.detach()
        if self.train_loss_sum is None:
            self.train_loss_sum = torch.zeros((), device=detached.device, dtype=torch.float32)
            self._nonfinite = torch.zeros((), device=detached.device, dtype=torch.bool)
        elif self.train_loss_sum.device != detached.device:  # restored from a checkpoint on CPU
            self.train_loss_sum = self.train_loss_sum.to(detached.device)
            self._nonfinite = self._nonfinite.to(detached.device)
        # Device-side bookkeeping only: no .item() here.
        self.train_loss_sum += detached.float()
        self.train_loss_count += 1
        torch.logical_or(self._nonfinite, ~torch.isfinite(detached), out=self._nonfinite)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch).detach().float()
        self._val_sum = loss if self._val_sum is None else self._val_sum + loss
        self._val_count += 1

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = None, 0

    def on_validation_epoch_end(self) -> None:
        if self._val_sum is None:
            return
        # One sync per validation: cheap next to the validation itself.
        mean = self.trainer.strategy.reduce(self._val_sum / self._val_count, reduce_op="mean")
        self.last_val_loss = float(mean.item())
        if not math.isfinite(self.last_val_loss):
            raise TrainingDiverged(
                f"validation loss is {self.last_val_loss} at step {self.global_step}; the last good "
                "checkpoint is kept (lower pretrain.lr or raise pretrain.warmup_steps)"
            )

    @property
    def last_val(self) -> dict[str, float]:
        """The latest validation metrics, as MetricsCallback logs them ({} before any)."""
        if self.last_val_loss is None:
            return {}
        values = {"val/loss": self.last_val_loss, "val/perplexity": perplexity(self.last_val_loss)}
        if self.unigram_entropy is not None:
            values["val/unigram_entropy"] = self.unigram_entropy
            # > 0: the model predicts better than token frequencies alone.
            values["val/gap_to_unigram"] = self.unigram_entropy - self.last_val_loss
        return values

    # -- divergence ------------------------------------------------------------------------

    def take_train_loss(self) -> float | None:
        """Mean train loss since the last call (syncs with the device), or None without steps.

        Under DDP it is the mean over all ranks (one all-reduce; every rank calls this at the
        same logging steps, from MetricsCallback): the loss of the global batch, as one process
        with that batch would report it.
        """
        if self.train_loss_sum is None or self.train_loss_count == 0:
            return None
        mean = self.train_loss_sum / self.train_loss_count
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        value = float(mean.item())
        self.train_loss_sum.zero_()
        self.train_loss_count = 0
        return value

    def assert_finite(self) -> None:
        """Raise TrainingDiverged if any rank saw a non-finite train loss (a sync point)."""
        flag = bool(self._nonfinite.item()) if self._nonfinite is not None else False
        if self.trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce_boolean_decision(flag, all=False)
        if flag:
            raise TrainingDiverged(
                f"the training loss became NaN/inf (detected at step {self.global_step}); training "
                "stopped and the last good checkpoint is kept (no checkpoint of the diverged state "
                "was written). Lower pretrain.lr, raise pretrain.warmup_steps or check the data."
            )

    # -- optimizer -------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        # Over the whole module: the generator and the RTD head too.
        optimizer, schedule = build_optimizer(
            self, self.optim, total_steps=self.total_steps, device=self.device
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.config.to_dict(),
            "meta": dict(self.meta),
            "rng": _rng_state(),
            "train_loss_sum": float(self.train_loss_sum.item()) if self.train_loss_sum is not None else 0.0,
            "train_loss_count": self.train_loss_count,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ours = checkpoint.get(CHECKPOINT_KEY, {})
        if "rng" in ours:
            _set_rng_state(ours["rng"])
        # The partial logging window, so the next logged mean equals an uninterrupted run's.
        self.train_loss_sum = torch.tensor(float(ours.get("train_loss_sum", 0.0)), dtype=torch.float32)
        self.train_loss_count = int(ours.get("train_loss_count", 0))
        self._nonfinite = torch.zeros((), dtype=torch.bool)
