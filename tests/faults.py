"""Faults that tests inject into the pretrain stage, as Lightning callbacks (nothing in production).

- :class:`KillAfterCheckpoint`: SIGKILL the process once the checkpoint of a step is durable
  (a crash between two checkpoints);
- :class:`PoisonAtStep`: make the parameters NaN just before the given optimizer step, so that
  step's loss is NaN (the divergence path end to end);
- :class:`SigtermDuringStep`: send the process a real SIGTERM (``os.kill``) while a given
  optimizer step is being computed (a preemption that lands mid-step).

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

from tests.conftest import RANK_VARS


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


class SigtermDuringStep(pl.Callback):
    """``os.kill(getpid(), SIGTERM)`` at the start of the batch of optimizer step ``step`` (1-based:
    the checkpoint of a graceful stop is the one of step ``step``). Fires once, on global rank 0."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step - 1 and not self.fired and trainer.is_global_zero:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)


def stage_command(stage: str = "pretrain", *faults: str) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a stage's process as dvc.yaml runs it (``python -m stages.<stage>``), or with
    fault options through this module (pretrain only), reading ./params.yaml quietly."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    module = ["-m", "tests.faults", *faults] if faults else ["-m", f"stages.{stage}"]
    return [sys.executable, *module, "--params", "params.yaml", "--quiet"], env


def run_stage_process(root: Path, stage: str = "pretrain", *faults: str, timeout: float = 600) -> Any:
    """Run the stage's process in ``root``; the CompletedProcess (text stdout / stderr)."""
    import subprocess

    command, env = stage_command(stage, *faults)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    from bigmodel_ops.cli import run_stage
    from bigmodel_ops.pipeline import pretrain

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kill-after-checkpoint-step", type=int)
    parser.add_argument("--nan-at-step", type=int)
    parser.add_argument("--sigterm-during-step", type=int)
    faults, rest = parser.parse_known_args(argv)
    callbacks: list[pl.Callback] = []
    if faults.kill_after_checkpoint_step is not None:
        callbacks.append(KillAfterCheckpoint(faults.kill_after_checkpoint_step))
    if faults.nan_at_step is not None:
        callbacks.append(PoisonAtStep(faults.nan_at_step))
    if faults.sigterm_during_step is not None:
        callbacks.append(SigtermDuringStep(faults.sigterm_during_step))

    def run(params: Any, *, paths: Any, quiet: bool = False) -> dict[str, Any]:
        return pretrain.run(params, paths=paths, quiet=quiet, callbacks=callbacks)

    run.__doc__ = pretrain.run.__doc__
    # The stage's module with the faults bound in: run_stage gives it the real CLI around it.
    stage = types.ModuleType(pretrain.__name__)
    stage.run = run
    return run_stage(stage, rest)


if __name__ == "__main__":
    sys.exit(main())
