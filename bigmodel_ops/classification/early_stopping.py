"""Best-epoch tracking and early stopping of fine-tuning, by validation accuracy.

:class:`BestEpoch` keeps the epoch with the highest ``val_acc`` (the first of equals) with a CPU
copy of the model's trainable weights, counts the epochs since a better one, says when
``finetune.early_stopping_patience`` of them have passed, and puts the best weights back.
No Lightning here: :class:`~.training.ClassifierModule` feeds it each validation epoch's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class BestEpoch:
    """The best epoch so far: ``metrics`` ({} before any), ``epoch`` (None before any) and its
    trainable weights; ``stopped_early`` once ``patience`` (> 0) epochs passed without a better
    ``val_acc`` (0: never stop)."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.metrics: dict[str, float] = {}
        self.epoch: int | None = None
        self.epochs_without_improvement = 0
        self.stopped_early = False
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, metrics: Mapping[str, float], *, epoch: int, model: nn.Module) -> bool:
        """Record one epoch's metrics; True when training should stop.

        Every rank sees the same gathered metrics, so every rank decides alike (no hang under DDP).
        """
        if self.epoch is None or metrics["val_acc"] > self.metrics["val_acc"]:
            self.metrics = dict(metrics)
            self.epoch = int(epoch)
            self.epochs_without_improvement = 0
            self._state = {
                name: param.detach().to("cpu", copy=True)
                for name, param in model.named_parameters()
                if param.requires_grad  # frozen weights never change
            }
            return False
        self.epochs_without_improvement += 1
        stop = bool(self.patience) and self.epochs_without_improvement >= self.patience
        if stop:
            self.stopped_early = True
        return stop

    def restore(self, model: nn.Module) -> None:
        """Put the best epoch's weights back into model (no-op before any epoch)."""
        if self._state is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self._state.items():
                params[name].copy_(value.to(params[name].device))
