"""Lightning callbacks of the pretrain stage: tracking metrics and guarded checkpoints.

`TrainingMetrics` logs through any object with ``log_metrics(mapping, *, step)`` (our
StageRun, or None to log nothing), so this module never imports MLflow. It reads the
device-side loss accumulator only every `log_every_n_steps` optimizer steps: one host
sync per logging interval, none per step.

`GuardedCheckpoint` is a ModelCheckpoint that (1) refuses to write a checkpoint of a
diverged (NaN/inf) state, raising TrainingDiverged instead, (2) makes ``last.ckpt`` an
atomic hard link of the step checkpoint just written instead of serialising the state a
second time, (3) always saves at the end of training, and (4) supports a test-only
SIGKILL right after a checkpoint (``BIGMODEL_OPS_TEST_KILL_AT_STEP``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from bigmodel_ops.training.data import ResumableBatchLoader
from bigmodel_ops.training.flops import mfu

_logger = logging.getLogger(__name__)

# Test-only hook: SIGKILL the process right after the checkpoint of this global step has
# been written (simulates a crash with a durable checkpoint). Never set it outside tests.
KILL_AT_STEP_ENV = "BIGMODEL_OPS_TEST_KILL_AT_STEP"
CHECKPOINT_FILENAME = "step-{step:08d}"


class MetricSink(Protocol):
    def log_metrics(self, values: dict[str, float], *, step: int) -> None: ...


class TrainingMetrics(Callback):
    """Train loss, lr, throughput, MFU, memory and val metrics at global steps.

    tokens_per_step: tokens of one optimizer step over all ranks. flops_per_token and
    peak_flops (per device; None when unknown) give MFU. Its counters (tokens, training
    wall time) are part of the checkpoint, so they continue across a resume.
    """

    def __init__(
        self,
        sink: MetricSink | None,
        *,
        log_every_n_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float | None,
        world_size: int = 1,
    ) -> None:
        self.sink = sink
        self.every = log_every_n_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.train_seconds = 0.0  # training wall time, validation excluded, across resumes
        self.last: dict[str, float] = {}  # the latest value of every metric (for the report)
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

    def _log(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        self.last.update(values)
        if self.sink is not None and trainer.is_global_zero:
            self.sink.log_metrics(values, step=trainer.global_step)

    def _fetch_seconds(self, trainer: pl.Trainer) -> float:
        loader = trainer.fit_loop._combined_loader
        if loader is None:
            return 0.0
        return sum(item.fetch_seconds for item in loader.flattened if isinstance(item, ResumableBatchLoader))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._mark_step = trainer.global_step
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
        loss = pl_module.take_train_loss()  # the one host sync of the interval
        now = time.perf_counter()
        elapsed = max(now - self._mark_time - self._val_seconds, 1e-9)
        steps = step - self._mark_step
        fetch = self._fetch_seconds(trainer)
        self.train_seconds += elapsed
        tokens_per_s = steps * self.tokens_per_step / elapsed
        values: dict[str, float] = {
            "train/lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            "train/tokens": float(step * self.tokens_per_step),
            "train/epoch": float(trainer.current_epoch),
            "perf/tokens_per_s": tokens_per_s,
            "perf/step_ms": 1000.0 * elapsed / max(steps, 1),
            "perf/data_wait_frac": (fetch - self._mark_fetch) / elapsed,
            "perf/train_seconds": self.train_seconds,
        }
        if loss is not None:
            values["train/loss"] = loss
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
        self._mark_time, self._mark_step, self._mark_fetch = now, step, fetch
        self._val_seconds = 0.0
        pl_module.assert_finite()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_seconds += time.perf_counter() - self._val_started
        loss = getattr(pl_module, "last_val_loss", None)
        if loss is None:
            return
        self.last_val_step = trainer.global_step
        self._log(
            trainer,
            {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))},  # exp(50) ~ 5e21: no overflow
        )


class GuardedCheckpoint(ModelCheckpoint):
    """Step checkpoints every `every_n_steps` and at the end, plus last.ckpt; see module doc.

    after_save is called on global rank zero after every completed checkpoint (the stage
    flushes its tracking there, so logged metrics are durable whenever a checkpoint is).
    """

    def __init__(
        self, dirpath: str, *, every_n_steps: int, after_save: Callable[[], None] | None = None
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=CHECKPOINT_FILENAME,
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_top_k=1,  # no monitor: keeps the newest step file (the previous one goes after)
            save_last=True,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.after_save = after_save
        kill = os.environ.get(KILL_AT_STEP_ENV)
        self._kill_at = int(kill) if kill else None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Never persist a diverged state: raise before anything is written.
        assert_finite = getattr(trainer.lightning_module, "assert_finite", None)
        if assert_finite is not None:
            assert_finite()
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self.save_last:
            return
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        source = self._last_checkpoint_saved
        if source and source != last and self._last_global_step_saved == trainer.global_step:
            # The state was serialised a moment ago: link it instead of writing it again.
            if trainer.is_global_zero:
                tmp = f"{last}.tmp"
                if os.path.lexists(tmp):
                    os.remove(tmp)
                try:
                    os.link(source, tmp)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(source, tmp)
                os.replace(tmp, last)  # atomic: last.ckpt is always a complete file
            trainer.strategy.barrier()
            self.last_model_path = last
        else:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        if trainer.is_global_zero and self.after_save is not None:
            self.after_save()
        if self._kill_at is not None and trainer.global_step == self._kill_at:
            _logger.warning("%s=%d: killing the process (test hook)", KILL_AT_STEP_ENV, self._kill_at)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if not os.path.exists(self.format_checkpoint_name(candidates)):
                self._save_none_monitor_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class StepTimer(Callback):
    """Wall time between the end of optimizer step `start` and of step `stop` (benchmarks).

    Synchronises CUDA at both marks so queued kernels are counted.
    """

    def __init__(self, *, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.t_start = self.t_stop = 0.0
        self.fetch_start = self.fetch_stop = 0.0

    def _mark(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, float]:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        loader = trainer.fit_loop._combined_loader
        fetch = sum(item.fetch_seconds for item in loader.flattened if isinstance(item, ResumableBatchLoader))
        return time.perf_counter(), fetch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.start and self.t_start == 0.0:
            self.t_start, self.fetch_start = self._mark(trainer, pl_module)
        elif trainer.global_step == self.stop and self.t_stop == 0.0:
            self.t_stop, self.fetch_stop = self._mark(trainer, pl_module)

    @property
    def seconds(self) -> float:
        return self.t_stop - self.t_start

    @property
    def data_wait_fraction(self) -> float:
        return (self.fetch_stop - self.fetch_start) / max(self.seconds, 1e-12)
