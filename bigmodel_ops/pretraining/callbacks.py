"""Checkpoints of the pretrain stage (metrics go through :class:`bigmodel_ops.trainer.MetricsCallback`).

`GuardedCheckpoint` is a ModelCheckpoint that (1) refuses to write a checkpoint of a
diverged (NaN/inf) state, raising TrainingDiverged instead, (2) makes ``last.ckpt`` an
atomic hard link of the step checkpoint just written instead of serialising the state a
second time, and (3) always saves at the end of training.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

CHECKPOINT_FILENAME = "step-{step:08d}"


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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # The folder is per configuration and a rerun resumes from it: not being empty is the design.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if not os.path.exists(self.format_checkpoint_name(candidates)):
                self._save_none_monitor_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
