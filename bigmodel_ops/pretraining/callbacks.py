"""Checkpoints of the pretrain stage (metrics go through :class:`bigmodel_ops.trainer.MetricsCallback`).

`GuardedCheckpoint` is a ModelCheckpoint that (1) refuses to write a checkpoint of a
diverged (NaN/inf) state, raising TrainingDiverged instead, (2) makes ``last.ckpt`` an
atomic hard link of the step checkpoint just written instead of serialising the state a
second time, (3) always saves at the end of training, (4) writes every checkpoint to a
temporary file beside its final name and renames it into place (:class:`AtomicCheckpointIO`:
a full disk or a kill never leaves a torn file under a checkpoint's name) and (5) on SIGTERM
(preemption) finishes the optimizer step in progress, checkpoints it and then stops the stage
the way the stage's own SIGTERM handler does (exit status 143, MLflow run KILLED), so the next
run resumes from that step.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.fsutil import publish, sha256_file

CHECKPOINT_FILENAME = "step-{step:08d}"

_logger = logging.getLogger(__name__)


def _write_error(path: Path | str, error: OSError) -> CheckpointError:
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    reason = cause.strerror or str(cause)
    return CheckpointError(
        f"{path}: cannot write the checkpoint ({reason}); nothing was written under that name and the "
        "earlier checkpoints are intact. Free space (or fix the folder) and run the stage again: it "
        "resumes from the last complete checkpoint."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written in place atomically: torch.save, written to a temporary file in the
    same folder, fsync, rename over the final name (:func:`bigmodel_ops.fsutil.publish`).

    Lightning's own writer stages the file in the system temp folder and moves it, which is a
    copy (not atomic) when the checkpoint folder is on another file system. An OSError (a full
    disk) becomes a CheckpointError naming the file, and the temporary file is removed.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        sidecar = digest_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with publish(target, sidecar) as pub:
                staged = pub.staged(target)
                # Serialised in memory first (as Lightning does): torch's zip writer turns a failed
                # write into an opaque RuntimeError, a plain file write gives the real OSError.
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                with open(staged, "wb") as handle:
                    handle.write(buffer.getbuffer())
                    del buffer
                    handle.flush()
                    os.fsync(handle.fileno())
                pub.staged(sidecar).write_text(f"{sha256_file(staged)}  {target.name}\n")
        except OSError as error:
            raise _write_error(target, error) from error

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        digest_path(Path(path)).unlink(missing_ok=True)


def digest_path(checkpoint: Path | str) -> Path:
    """The sha256 sidecar of a checkpoint (``sha256sum -c`` format), checked before resuming."""
    return Path(f"{checkpoint}.sha256")


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
        # What SIGTERM did before training started (the stage run's handler: KILLED, exit 143).
        self._stop_handler = signal.getsignal(signal.SIGTERM)
        self._handler_during_fit: Any = None
        self._term_requested = False
        self._step_at_batch_end = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # The folder is per configuration and a rerun resumes from it: not being empty is the design.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # -- preemption (SIGTERM) ---------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_at_batch_end = trainer.global_step
        self._term_requested = False
        # Installed after Lightning's own handler (which would stop at its next check, possibly in
        # the middle of a validation, without a checkpoint): ours lets the step finish.
        if threading_is_main():
            self._handler_during_fit = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._term_requested:  # a second SIGTERM: stop now (the last checkpoint stays valid)
            self._stop(signum)
        self._term_requested = True
        _logger.warning("SIGTERM: checkpointing at the end of the current optimizer step, then stopping")

    @property
    def term_requested(self) -> bool:
        """A SIGTERM arrived while training (the stage must stop: see :meth:`stop`)."""
        return self._term_requested

    def stop(self) -> None:
        """Stop the stage as its SIGTERM handler does (for a SIGTERM that arrived after the last
        step, when the final checkpoint is already written)."""
        self._stop()

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        handler = self._stop_handler
        if callable(handler):
            handler(signum, None)  # the stage run's guard raises here (run KILLED, exit 143)
        raise SystemExit(128 + signum)

    def _restore_handler(self) -> None:
        if threading_is_main() and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            previous = self._handler_during_fit
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stepped = trainer.global_step != self._step_at_batch_end  # not in the middle of accumulation
        self._step_at_batch_end = trainer.global_step
        requested = self._term_requested
        if trainer.world_size > 1:  # every rank stops at the same step (saving is collective)
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not (requested and stepped):
            return
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_none_monitor_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        _logger.warning(
            "stopped by SIGTERM after step %d; checkpoint %s written (run the stage again to resume)",
            trainer.global_step,
            self.best_model_path or self.last_model_path,
        )
        self._restore_handler()
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        super().on_exception(trainer, pl_module, exception)

    # -- writing ------------------------------------------------------------------------------

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
                _link_atomically(source, last)
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


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _link_atomically(source: str, last: str) -> None:
    """last.ckpt as a hard link of source (a copy where links are impossible), renamed into place
    so that last.ckpt is always a complete file; nothing is left behind on failure."""
    tmp = f"{last}.tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, last)
        digest = digest_path(source)
        if digest.is_file():
            with publish(digest_path(last)) as pub:
                pub.staged(digest_path(last)).write_text(
                    digest.read_text().split()[0] + f"  {Path(last).name}\n"
                )
        else:
            digest_path(last).unlink(missing_ok=True)
    except OSError as error:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise _write_error(last, error) from error
