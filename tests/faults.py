"""Faults that tests inject into the pretrain stage, as Lightning callbacks (nothing in production).

- :class:`KillAfterCheckpoint`: SIGKILL the process once the checkpoint of a step is durable
  (a crash between two checkpoints);
- :class:`PoisonAtStep`: make the parameters NaN just before the given optimizer step, so that
  step's loss is NaN (the divergence path end to end).

Run as a script, this is the pretrain stage's command with faults injected, for tests that need
the stage in its own process (a SIGKILL must not take pytest with it)::

    python -m tests.faults --kill-after-checkpoint-step 6 --params params.yaml --quiet

Every other argument and the exit codes are those of ``bigmodel-ops pretrain``
(:func:`bigmodel_ops.cli.run_stage`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


class KillAfterCheckpoint(Checkpoint):
    """SIGKILL the process right after the checkpoint of global step ``step`` is complete.

    A ``Checkpoint`` subclass on purpose: Lightning runs checkpoint callbacks after all others and
    in the order given, so with this one listed after the stage's GuardedCheckpoint its
    ``on_train_batch_end`` runs once that step's file is written, ``last.ckpt`` is linked to it and
    the tracking was flushed. It checks that on disk rather than trusting the order, and fails
    loudly (instead of killing too early or never) if the checkpoint is not there.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        (saver,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        folder = Path(saver.dirpath)
        step_file = folder / f"step-{self.step:08d}.ckpt"
        last = folder / "last.ckpt"
        if not (step_file.is_file() and last.is_file() and os.path.samefile(step_file, last)):
            raise RuntimeError(f"KillAfterCheckpoint: no complete checkpoint of step {self.step} in {folder}")
        os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(pl.Callback):
    """Multiply every parameter by NaN before the batch of global step ``step`` (0-based), so the
    loss of optimizer step ``step + 1`` is NaN. Stateless: nothing goes into checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.fired:
            self.fired = True
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.mul_(float("nan"))


def main(argv: list[str] | None = None) -> int:
    from bigmodel_ops.cli import run_stage
    from bigmodel_ops.pipeline import pretrain

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kill-after-checkpoint-step", type=int)
    parser.add_argument("--nan-at-step", type=int)
    faults, rest = parser.parse_known_args(argv)
    callbacks: list[pl.Callback] = []
    if faults.kill_after_checkpoint_step is not None:
        callbacks.append(KillAfterCheckpoint(faults.kill_after_checkpoint_step))
    if faults.nan_at_step is not None:
        callbacks.append(PoisonAtStep(faults.nan_at_step))

    def run(params: Any, *, paths: Any, quiet: bool = False) -> dict[str, Any]:
        return pretrain.run(params, paths=paths, quiet=quiet, callbacks=callbacks)

    run.__doc__ = pretrain.run.__doc__
    # The stage's module with the faults bound in: run_stage gives it the real CLI around it.
    stage = types.ModuleType(pretrain.__name__)
    stage.run = run
    return run_stage(stage, rest)


if __name__ == "__main__":
    sys.exit(main())
