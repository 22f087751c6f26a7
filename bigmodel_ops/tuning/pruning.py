"""Step-level pruning for fine-tuning trials (replaces optuna-integration's per-epoch callback).

:class:`StepPruningCallback` measures the trial's metric every ``every_n_steps`` optimizer steps
on a fixed, seeded subset of the validation split (:func:`val_subset`), reports it to Optuna
(``trial.report(value, step=global_step)``) and asks the pruner. A pruned trial stops at once:
the callback raises :class:`optuna.TrialPruned`, which Lightning does not swallow (its
``_call_and_handle_interrupt`` runs the ``on_exception`` hooks and re-raises any exception but
KeyboardInterrupt), so it reaches the objective and Optuna records the trial PRUNED.

DDP: every rank measures the same subset with the same (synchronised) weights, so every rank has
the same value; only rank 0 talks to the storage (report, should_prune) and its decision is
broadcast with ``trainer.strategy.broadcast``, so every rank raises together and none hangs in
a collective the others left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import lightning as L
import numpy as np
import optuna
import torch
import torch.nn.functional as F

from bigmodel_ops.classification.inputs import TokenizedSplit, collate


class NonFiniteObjective(Exception):
    """A trial diverged: its objective, val loss or a subset report is NaN/inf."""


CONTINUE, PRUNE, DIVERGED = 0, 1, 2


class MetricSink(Protocol):
    def log_metrics(self, values: dict[str, float], *, step: int) -> None: ...


def val_subset(split: TokenizedSplit, *, fraction: float, seed: int) -> TokenizedSplit:
    """A fixed share of a split (at least one row), drawn without replacement with ``seed``;
    the rows keep their order. The same seed and split give the same subset in every trial."""
    n = len(split)
    k = min(n, max(1, round(fraction * n)))
    if k == n:
        return split
    rows = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return TokenizedSplit(ids=[split.ids[i] for i in rows], labels=split.labels[rows])


@torch.no_grad()
def evaluate_split(
    module: L.LightningModule, split: TokenizedSplit, *, batch_size: int, num_labels: int
) -> dict[str, float]:
    """Accuracy and plain cross-entropy of ``module(idx, lengths)`` on a split, in eval mode; each
    submodule's train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(split), batch_size):
            rows = [
                (split.ids[i], int(split.labels[i]))
                for i in range(start, min(start + batch_size, len(split)))
            ]
            batch = {k: v.to(module.device) for k, v in collate(rows).items()}
            logits = module(batch["idx"], batch["lengths"]).float()
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    finally:
        for submodule, training in modes:
            submodule.training = training
    n = max(len(split), 1)
    return {"val_acc": correct / n, "val_loss": loss_sum / n}


class StepPruningCallback(L.Callback):
    """Report the subset metric every ``every_n_steps`` optimizer steps; prune on the pruner's word.

    ``sink`` (the trial's MLflow run) gets ``tune/<metric>_subset`` for both metrics at the global
    step. After ``fit`` (or a TrialPruned), :attr:`steps` is the optimizer steps trained and
    :attr:`pruned_at` the step of the pruning decision (None if not pruned).

    Several devices (DDP): every rank evaluates the subset (no collective inside), global rank 0
    alone reports to the trial and decides, and the decision is broadcast from rank 0 at every
    report step, so all ranks continue, prune (``optuna.TrialPruned``) or stop as diverged
    (:class:`NonFiniteObjective`: a NaN/inf subset metric or loss) at the same step. ``trial``
    may be None on ranks other than 0 (only rank 0 holds the Optuna trial).
    """

    def __init__(
        self,
        trial: optuna.Trial | None,
        *,
        subset: TokenizedSplit,
        every_n_steps: int,
        metric: str,
        num_labels: int,
        batch_size: int = 64,
        sink: MetricSink | None = None,
        prefix: str = "tune/",
    ) -> None:
        self.trial = trial
        self.subset = subset
        self.every = every_n_steps
        self.metric = metric
        self.num_labels = num_labels
        self.batch_size = batch_size
        self.sink = sink
        self.prefix = prefix
        self.steps = 0
        self.budget_steps: int | None = None
        self.pruned_at: int | None = None
        self.reports: dict[int, float] = {}
        self.eval_seconds = 0.0
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget_steps = int(trainer.estimated_stepping_batches)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        self.steps = step
        if step == self._seen_step or step % self.every:  # a micro-batch, or not a report step
            return
        self._seen_step = step
        started = time.perf_counter()
        values = evaluate_split(
            pl_module, self.subset, batch_size=self.batch_size, num_labels=self.num_labels
        )
        self.eval_seconds += time.perf_counter() - started
        value = values[self.metric]
        decision = CONTINUE
        if trainer.is_global_zero:
            self.reports[step] = value
            if self.sink is not None:
                self.sink.log_metrics({f"{self.prefix}{k}_subset": v for k, v in values.items()}, step=step)
            if not all(math.isfinite(v) for v in values.values()):
                decision = DIVERGED  # nothing more to learn from this trial
            else:
                if self.trial is None:
                    raise RuntimeError("StepPruningCallback: global rank 0 needs the Optuna trial")
                self.trial.report(value, step=step)
                decision = PRUNE if self.trial.should_prune() else CONTINUE
        # Rank 0 decides; every rank stops together (a no-op on one device).
        decision = int(trainer.strategy.broadcast(decision, src=0))
        if decision == DIVERGED:
            self.pruned_at = step
            raise NonFiniteObjective(
                f"at step {step} on the val subset: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            )
        if decision == PRUNE:
            self.pruned_at = step
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} on the val subset = {value:.4f}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps = int(trainer.global_step)

    def summary(self) -> Mapping[str, Any]:
        return {"steps": self.steps, "pruned_at": self.pruned_at, "reports": dict(self.reports)}
