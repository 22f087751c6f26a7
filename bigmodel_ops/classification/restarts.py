"""Fine-tuning restarts: the same recipe from several seeds, the run with the best val accuracy kept.

On a few thousand labelled texts one fine-tuning run is noisy: the seed (the head's init, dropout
and the batch order) moves test accuracy by several points. BERT's authors fine-tuned small tasks
several times and kept the run that did best on the dev set; ``finetune.restarts`` does the same.
Restart ``k`` (0 = the first run, the one a single run would train) uses seed
``seed + 1000 * k``, far from the neighbouring project seeds a seed sweep uses.

Selection reads val only, never test: the kept run's val accuracy is therefore an optimistic
estimate (val chose it), and the evaluate stage's test accuracy is the one to quote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEED_STRIDE = 1000


def restart_seed(seed: int, restart: int) -> int:
    """The seed of restart ``restart`` (0-based) of a run seeded ``seed``; restart 0 keeps ``seed``."""
    if restart < 0:
        raise ValueError(f"restart must be >= 0, got {restart}")
    return seed + SEED_STRIDE * restart


@dataclass(frozen=True)
class Restart:
    """What one fine-tuning run reached: its seed and its best epoch's val metrics."""

    index: int  # 0-based
    seed: int
    val: dict[str, float]  # the best epoch's val_acc / val_loss / val_f1 ({} if it never validated)
    best_epoch: int
    epochs: int
    global_step: int
    stopped_early: bool

    @property
    def val_acc(self) -> float:
        return float(self.val.get("val_acc", math.nan))

    @classmethod
    def of_fit(cls, module: Any, trainer: Any, *, index: int, seed: int) -> Restart:
        """From a finished :func:`~bigmodel_ops.classification.training.fit_classifier`: the
        module's best epoch (non-finite val metrics left out) and the trainer's counters."""
        return cls(
            index=index,
            seed=seed,
            val={key: float(v) for key, v in module.best_val.items() if math.isfinite(v)},
            best_epoch=int(module.best_epoch or 0),
            epochs=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            stopped_early=bool(module.stopped_early),
        )


def pick_best(restarts: Sequence[Restart]) -> int:
    """Position in ``restarts`` of the run with the highest val accuracy.

    The first of equals wins, so a tie keeps the earliest run (the single run's seed). A run
    without a finite val accuracy is chosen only when no run has one (then the first). Raises
    ValueError on an empty sequence.
    """
    if not restarts:
        raise ValueError("pick_best: no restarts")
    best = 0
    for i, run in enumerate(restarts):
        if math.isfinite(run.val_acc) and (
            not math.isfinite(restarts[best].val_acc) or run.val_acc > restarts[best].val_acc
        ):
            best = i
    return best


__all__ = ["SEED_STRIDE", "Restart", "pick_best", "restart_seed"]
