"""Weight averaging along one fine-tuning run: an exponential moving average (EMA) or the uniform
mean of the late iterates (SWA, Izmailov et al., 2018), through :class:`torch.optim.swa_utils.AveragedModel`.

The average is what validation scores and what the best epoch keeps, so the exported classifier
is the averaged one. It costs one copy of the model's weights and one update per optimizer step,
no extra fine-tuning. No Lightning here: :class:`~.training.ClassifierModule` drives it.

Why not Lightning's ``WeightAveraging`` callback: it swaps the average back out in the callbacks'
``on_validation_epoch_end``, which runs before the module's, where the best epoch is recorded; the
best epoch would keep the live weights while its metrics were the average's.
"""

from __future__ import annotations

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

KINDS = ("none", "ema", "swa")


class WeightAverage:
    """A running average of a model's trainable weights (buffers are not averaged).

    ``kind``: ``none`` (:meth:`update` does nothing, :meth:`model` is the live model), ``ema``
    (``avg = decay * avg + (1 - decay) * live`` after every optimizer step from the first on; the
    first update copies) or ``swa`` (the uniform mean of the weights after each optimizer step
    after the first ``start`` fraction of the run's steps: with ``start`` 0.5 and 10 steps, the
    weights after steps 6 to 10).

    Edge cases: before the first update (``swa`` whose start is not reached yet, or no step
    taken) :meth:`model` is the live model, so validation scores what training has. ``swa`` always
    averages at least the last step's weights.
    """

    def __init__(self, kind: str = "none", *, decay: float = 0.9, start: float = 0.34) -> None:
        if kind not in KINDS:
            raise ValueError(f"weight averaging {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "ema" and not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay} is not between 0 and 1 (exclusive)")
        if kind == "swa" and not 0.0 <= start < 1.0:
            raise ValueError(f"swa start {start} is not a fraction of the steps in [0, 1)")
        self.kind = kind
        self.decay = decay
        self.start = start
        self.start_step = 1
        self._average: AveragedModel | None = None
        self._updates = 0  # counted here: reading the average's n_averaged would sync a GPU per batch

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def begin(self, model: nn.Module, *, total_steps: int) -> None:
        """Start a fresh average of ``model`` for a run of ``total_steps`` optimizer steps (no
        update yet). Call it once the model sits on its device: the copy is made there."""
        if not self.active:
            return
        self.start_step = (
            min(int(self.start * total_steps), max(total_steps - 1, 0)) + 1 if self.kind == "swa" else 1
        )
        multi_avg_fn = get_ema_multi_avg_fn(self.decay) if self.kind == "ema" else None
        self._average = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        self._updates = 0

    @property
    def updates(self) -> int:
        """How many iterates the average holds (0 before the first update)."""
        return self._updates

    def update(self, model: nn.Module, *, step: int) -> None:
        """Fold ``model``'s weights after optimizer step ``step`` (1-based) into the average."""
        if self._average is None or step < self.start_step:
            return
        self._average.update_parameters(model)
        self._updates += 1

    def model(self, live: nn.Module) -> nn.Module:
        """The model to score: the average once it holds an iterate, else ``live``. The average
        is put in ``live``'s mode (it is not a submodule, so Lightning's ``eval()`` misses it)."""
        if self._average is None or self.updates == 0:
            return live
        return self._average.module.train(live.training)


__all__ = ["KINDS", "WeightAverage"]
