"""The one Trainer builder and the one metrics callback, shared by pretraining and fine-tuning.

Plain arguments only (no params schema, no MLflow), so the GPU benchmark can build exactly the
stages' Trainer on a machine without pydantic or MLflow.

- :func:`build_trainer`: accelerator / precision resolution, the clear FSDP-on-CPU error, DDP
  with bucket-view gradients, validation every N optimizer steps, each epoch, or never;
- :class:`MetricsCallback`: sends training metrics to any object with
  ``log_metrics(mapping, *, step)`` (a tracking StageRun) at the global step, from global rank 0;
- :class:`StepProgressBar`: the progress bar of a step budget (pretraining): optimizer steps
  against ``max_steps`` with a rate and an ETA, continuous across epochs and resumes.

:func:`build_trainer` also adds a :class:`~bigmodel_ops.cost_callback.CostCallback` (what each fit
cost, logged as ``cost/*`` through the MetricsCallback's sink) to every Trainer that has a
MetricsCallback (pretraining, each tuning trial, fine-tuning).

Lightning's console chatter that says nothing about this run (tips for Lightning's cloud products,
which accelerators exist, the loader it loads before every fit, a deprecation inside Lightning
itself) is silenced here, by exact message, for every Trainer built by :func:`build_trainer`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from bigmodel_ops.cost_callback import CostCallback
from bigmodel_ops.errors import FSDP_NEEDS_GPU, ConfigError
from bigmodel_ops.pretraining.flops import mfu


def resolve_accelerator(accelerator: str) -> str:
    """ "auto" becomes "gpu" when CUDA is available, else "cpu"."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def resolve_precision(precision: str, accelerator: str) -> str:
    """ "auto" is bf16-mixed on CUDA (Ampere and newer support it natively), 32-true elsewhere."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if resolve_accelerator(accelerator) == "gpu" else "32-true"


def devices_per_node(accelerator: str, devices: int | str) -> int:
    if isinstance(devices, int):
        return devices
    # Lightning's "auto": every visible GPU, one CPU process.
    return max(1, torch.cuda.device_count()) if resolve_accelerator(accelerator) == "gpu" else 1


def configure_torch(accelerator: str) -> None:
    """TF32 matmuls on Ampere+ for any fp32 work left under mixed precision (no effect on CPU)."""
    if resolve_accelerator(accelerator) == "gpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def _strategy(strategy: str, accelerator: str) -> object:
    if strategy == "fsdp" and resolve_accelerator(accelerator) != "gpu":
        # The schema refuses an explicit cpu; "auto" only resolves here, on a machine without CUDA.
        raise ConfigError(f"accelerator {accelerator!r} resolved to cpu: {FSDP_NEEDS_GPU}")
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Gradients are views into the all-reduce buckets: one copy fewer per step.
        # The backend follows the accelerator (gloo on CPU, nccl on GPU).
        return DDPStrategy(gradient_as_bucket_view=True)
    return strategy  # "auto" or "fsdp"


class _LightningChatter(logging.Filter):
    """Drops Lightning's info lines that are not about this run (rank_zero_info messages)."""

    PATTERN = re.compile(
        r"💡 Tip:"  # advertisements for litlogger / litmodels
        r"|[GTHI]PU available: "  # "GPU available: False, used: False", "TPU available: ..."
        r"|Loading `train_dataloader` to estimate number of stepping batches"  # before every fit
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.PATTERN.match(record.getMessage())


_chatter_filter = _LightningChatter()


def quiet_lightning() -> None:
    """Silence Lightning's chatter (see the module doc); idempotent.

    Lightning logs through whichever of its two rank-zero loggers was imported last, so the filter
    goes on both. Lightning 2.6 on torch >= 2.10 builds a ``torch.utils._pytree.LeafSpec``, which
    torch deprecates with a FutureWarning on every fit: ignored for that message from that module.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _chatter_filter not in logger.filters:
            logger.addFilter(_chatter_filter)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class StepProgressBar(TQDMProgressBar):
    """Optimizer steps against ``max_steps``, with a rate and an ETA, for a run with a step budget.

    Lightning's bar counts batches of the current epoch (``0/?`` for an iterable loader) and
    starts again at every epoch. This one counts ``trainer.global_step`` (optimizer steps, so
    gradient accumulation is accounted for), runs across epochs, and a resumed run starts at the
    resumed step with a rate (and so an ETA) measured on this process's steps only. The postfix
    shows the epoch and the latest train / validation loss that :class:`MetricsCallback` logged
    (no extra device sync). Validation keeps Lightning's own transient bar.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._metrics: MetricsCallback | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = next((c for c in trainer.callbacks if isinstance(c, MetricsCallback)), None)
        self.train_progress_bar = Tqdm(
            desc="Training",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,  # a resume starts where it left off; the rate counts from here
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # the rate (and ETA) is the average since the start
            mininterval=0.1 if sys.stdout.isatty() else 10.0,  # a log file: a line every 10 s at most
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable or step == bar.n:  # a micro-batch: no optimizer step yet
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.update(step - bar.n)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar goes on into the next epoch

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        values: dict[str, int | str | float] = {"epoch": trainer.current_epoch}
        last = self._metrics.last if self._metrics is not None else {}
        for key, label in (("train/loss", "loss"), ("val/loss", "val_loss")):
            if key in last:
                values[label] = f"{last[key]:.3f}"
        return values


def build_trainer(
    *,
    accelerator: str,
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str,
    max_steps: int = -1,
    max_epochs: int | None = None,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float = 0.0,
    validate: int | Literal["epoch"] | None = "epoch",
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
    enable_checkpointing: bool = False,
    default_root_dir: Path | str | None = None,
    progress_refresh: int = 10,
    limit_train_batches: float | int | None = None,
    use_distributed_sampler: bool = True,
    meter_cost: bool = True,
) -> pl.Trainer:
    """A Trainer for either stage.

    No Lightning logger (metrics go through :class:`MetricsCallback`), no sanity validation (the
    inputs were checked up front, and it would cost a startup delay on every resume).
    ``validate``: an int validates every that many optimizer steps regardless of epochs,
    ``"epoch"`` at the end of each epoch, None never. With ``max_steps`` and no ``max_epochs``
    training runs over as many epochs as the step budget needs. The pretraining loader shards
    batches by rank itself (``use_distributed_sampler=False``); fine-tuning's datamodule brings
    its own seeded ``DistributedSampler`` (Lightning keeps it).
    ``limit_train_batches``: Lightning's (None or 1.0: every batch). The progress bar counts
    optimizer steps against ``max_steps`` (:class:`StepProgressBar`) for a step budget without
    ``max_epochs``, batches per epoch otherwise. With ``meter_cost`` a Trainer that has a
    :class:`MetricsCallback` (and no :class:`~bigmodel_ops.cost_callback.CostCallback` yet) gets a
    CostCallback logging through it. Raises ConfigError for FSDP on a CPU-only machine.
    """
    quiet_lightning()
    callbacks = list(callbacks)
    metrics = next((c for c in callbacks if isinstance(c, MetricsCallback)), None)
    if meter_cost and metrics is not None and not any(isinstance(c, CostCallback) for c in callbacks):
        callbacks.append(CostCallback(metrics))
    if not quiet:
        step_budget = max_steps > 0 and max_epochs is None
        bar = StepProgressBar if step_budget else TQDMProgressBar
        callbacks.append(bar(refresh_rate=progress_refresh))
    if isinstance(limit_train_batches, float) and limit_train_batches == 1.0:
        limit_train_batches = None  # Lightning's default; an explicit 1.0 prints an info line
    val_kwargs: dict[str, Any]
    if validate is None:
        val_kwargs = {"limit_val_batches": 0}
    elif validate == "epoch":
        val_kwargs = {"check_val_every_n_epoch": 1}
    else:
        # Lightning counts training batches, not optimizer steps, here.
        val_kwargs = {
            "val_check_interval": validate * accumulate_grad_batches,
            "check_val_every_n_epoch": None,
        }
    return pl.Trainer(
        accelerator=resolve_accelerator(accelerator),
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(strategy, accelerator),
        precision=resolve_precision(precision, accelerator),
        max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else -1,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val if gradient_clip_val > 0 else None,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
        use_distributed_sampler=use_distributed_sampler,
        limit_train_batches=limit_train_batches,
        callbacks=callbacks,
        default_root_dir=str(default_root_dir) if default_root_dir is not None else None,
        **val_kwargs,
    )


class MetricSink(Protocol):
    def log_metrics(self, values: dict[str, float], *, step: int) -> None: ...


class MetricsCallback(Callback):
    """Train loss and learning rate every ``log_every_n_steps`` optimizer steps; the module's
    validation metrics after each validation; all at the global step, from global rank 0.

    What it reads of the LightningModule: ``take_train_loss()`` (the mean loss since the last
    call: one host sync per logging interval, none per step; under DDP an all-reduce, so it is
    called on every rank at the same steps, never on rank 0 alone) and ``last_val`` (a dict of the
    latest validation metrics, e.g. ``{"val/loss": ...}``). ``assert_finite()`` is called after
    each logging interval when the module has it (a NaN/inf loss stops training there).

    With ``tokens_per_step`` (tokens of one optimizer step over all ranks) it also logs tokens,
    throughput, step time and the data-wait fraction (from loaders with a ``fetch_seconds``
    attribute), and MFU when ``flops_per_token`` and ``peak_flops`` (per device) are known.
    Its counters (training wall time, the last validated step) are part of the checkpoint, so
    they continue across a resume. ``last`` holds the latest value of every metric (for reports).

    Validation metrics go at the global step, or with ``val_step="epoch"`` at the epoch number
    (how Optuna trials are reported); with ``epoch_key`` the epoch is logged beside them under
    that name (fine-tuning's ``epoch`` metric).
    """

    def __init__(
        self,
        sink: MetricSink | None,
        *,
        log_every_n_steps: int,
        loss_key: str = "train/loss",
        lr_key: str = "train/lr",
        tokens_per_step: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        val_step: Literal["global", "epoch"] = "global",
        epoch_key: str | None = None,
    ) -> None:
        self.sink = sink
        self.val_step = val_step
        self.epoch_key = epoch_key
        self.every = log_every_n_steps
        self.loss_key = loss_key
        self.lr_key = lr_key
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.train_seconds = 0.0  # training wall time, validation excluded, across resumes
        self.last: dict[str, float] = {}
        self.last_val_step = -1
        self._seen_step = -1
        self._mark_time = 0.0
        self._mark_step = 0
        self._mark_fetch = 0.0
        self._val_started = 0.0
        self._val_seconds = 0.0

    # Lightning stores this in checkpoints (plain numbers only: weights_only-safe).
    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "last_val_step": self.last_val_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.last_val_step = int(state.get("last_val_step", -1))

    def _log(self, trainer: pl.Trainer, values: dict[str, float], *, step: int | None = None) -> None:
        self.last.update(values)
        if self.sink is not None and trainer.is_global_zero:
            self.sink.log_metrics(values, step=trainer.global_step if step is None else step)

    @staticmethod
    def _fetch_seconds(trainer: pl.Trainer) -> float:
        loader = trainer.fit_loop._combined_loader
        if loader is None:
            return 0.0
        return sum(float(getattr(item, "fetch_seconds", 0.0)) for item in loader.flattened)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = self._mark_step = trainer.global_step
        self._mark_time = time.perf_counter()
        self._mark_fetch = self._fetch_seconds(trainer)
        self._val_seconds = 0.0
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of gradient accumulation, no optimizer step yet
            return
        self._seen_step = step
        if step % self.every and step != trainer.max_steps:
            return
        loss = pl_module.take_train_loss()
        now = time.perf_counter()
        elapsed = max(now - self._mark_time - self._val_seconds, 1e-9)
        steps = step - self._mark_step
        self.train_seconds += elapsed
        values: dict[str, float] = {
            self.lr_key: float(trainer.optimizers[0].param_groups[0]["lr"]),
            "train/epoch": float(trainer.current_epoch),
            "perf/step_ms": 1000.0 * elapsed / max(steps, 1),
            "perf/train_seconds": self.train_seconds,
        }
        if loss is not None:
            values[self.loss_key] = loss
        if self.tokens_per_step is not None:
            fetch = self._fetch_seconds(trainer)
            tokens_per_s = steps * self.tokens_per_step / elapsed
            values["train/tokens"] = float(step * self.tokens_per_step)
            values["perf/tokens_per_s"] = tokens_per_s
            values["perf/data_wait_frac"] = (fetch - self._mark_fetch) / elapsed
            self._mark_fetch = fetch
            if self.flops_per_token is not None:
                value = mfu(
                    tokens_per_s=tokens_per_s,
                    flops_per_token=self.flops_per_token,
                    peak=self.peak_flops,
                    devices=self.world_size,
                )
                if value is not None:
                    values["perf/mfu"] = value
        if pl_module.device.type == "cuda":
            values["perf/gpu_max_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self._log(trainer, values)
        self._mark_time, self._mark_step = now, step
        self._val_seconds = 0.0
        assert_finite = getattr(pl_module, "assert_finite", None)
        if assert_finite is not None:
            assert_finite()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_seconds += time.perf_counter() - self._val_started
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in dict(getattr(pl_module, "last_val", None) or {}).items()}
        if not values:
            return
        self.last_val_step = trainer.global_step
        if self.epoch_key is not None:
            values[self.epoch_key] = float(trainer.current_epoch)
        self._log(trainer, values, step=trainer.current_epoch if self.val_step == "epoch" else None)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) ~ 5e21 so a diverged loss cannot overflow."""
    return math.exp(min(loss, 50.0))
