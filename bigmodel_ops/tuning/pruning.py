"""Step-level pruning for fine-tuning trials (replaces optuna-integration's per-epoch callback).

:class:`StepPruningCallback` measures the trial's metric every ``every_n_steps`` optimizer steps
on a fixed, seeded subset of the validation split (:func:`val_subset`), reports it to Optuna
(``trial.report(value, step=global_step)``) and asks the pruner. With ``every_n_examples``
instead, it measures at the first optimizer step at which the training examples seen reach the
next multiple of that number and reports on the examples axis (``trial.report(value,
step=examples_seen)``), so trials of different batch sizes are compared at equal training
(:func:`examples_report_steps`). A pruned trial stops at once:
the callback raises :class:`optuna.TrialPruned`, which Lightning does not swallow (its
``_call_and_handle_interrupt`` runs the ``on_exception`` hooks and re-raises any exception but
KeyboardInterrupt), so it reaches the objective and Optuna records the trial PRUNED.

DDP: every rank measures the same subset with the same (synchronised) weights, so every rank has
the same value; only rank 0 talks to the storage (report, should_prune) and its decision is
broadcast with ``trainer.strategy.broadcast``, so every rank raises together and none hangs in
a collective the others left. The report steps depend only on the global step and on the
examples of one optimizer step (the same on every rank: per-rank batch x accumulation x world
size), so every rank reaches the broadcast at the same steps on either axis.
"""

from __future__ import annotations

import logging
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

_logger = logging.getLogger(__name__)


class NonFiniteObjective(Exception):
    """A trial diverged: its objective, val loss or a subset report is NaN/inf."""


CONTINUE, PRUNE, DIVERGED = 0, 1, 2


class MetricSink(Protocol):
    def log_metrics(self, values: dict[str, float], *, step: int) -> None: ...


def examples_report_steps(*, every_n_examples: int, examples_per_step: int, last_step: int) -> list[int]:
    """The optimizer steps (1..``last_step``) at which a trial that trains ``examples_per_step``
    examples an optimizer step reports with ``every_n_examples``: each first step at which the
    examples seen (``step x examples_per_step``) reach the next multiple of ``every_n_examples``.

    The step reported to Optuna is ``step x examples_per_step``: a multiple of
    ``every_n_examples`` when it divides by ``examples_per_step``, else the first count past the
    multiple (``every_n_examples`` 24 with 16 examples a step: steps 2, 3, 5, 6 = 32, 48, 80, 96
    examples). When one step spans several multiples (``examples_per_step`` above
    ``every_n_examples``), that step reports once. Empty when ``last_step`` < 1.
    """
    if every_n_examples < 1 or examples_per_step < 1:
        raise ValueError(
            f"every_n_examples ({every_n_examples}) and examples_per_step ({examples_per_step}) "
            "must be positive"
        )
    steps: list[int] = []
    step = 0
    while True:
        reached = step * examples_per_step // every_n_examples  # multiples reached so far
        step = -(-(reached + 1) * every_n_examples // examples_per_step)  # ceil: the next one's step
        if step > last_step:
            return steps
        steps.append(step)


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
    """Report the subset metric every ``every_n_steps`` optimizer steps, or every
    ``every_n_examples`` training examples; prune on the pruner's word.

    Exactly one of ``every_n_steps`` / ``every_n_examples`` is given (ValueError otherwise).
    Examples axis: ``train_batch_size`` (the per-device batch size of the training loader) is
    required; one optimizer step trains ``train_batch_size x accumulate_grad_batches x
    world_size`` examples (:attr:`examples_per_step`, read from the trainer at train start), and
    the trial reports at the steps :func:`examples_report_steps` gives, with ``step`` = the
    examples seen then. Examples are counted nominally: an epoch's short last batch counts as a
    full one, so the count is the same on every rank and in a replay (benchmarks/hpo_replay.py).
    When ``every_n_examples`` is not a multiple of :attr:`examples_per_step`, the reports land
    past the multiples (logged once at train start).

    ``sink`` (the trial's MLflow run) gets ``tune/<metric>_subset`` for both metrics at the global
    (optimizer) step on either axis, plus ``tune/examples_seen`` on the examples axis. After
    ``fit`` (or a TrialPruned), :attr:`steps` is the optimizer steps trained, :attr:`pruned_at`
    the optimizer step of the pruning decision (None if not pruned) and :attr:`reports` the
    values rank 0 reported, keyed by the step given to Optuna (optimizer steps, or examples).

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
        every_n_steps: int | None = None,
        every_n_examples: int | None = None,
        train_batch_size: int | None = None,
        metric: str,
        num_labels: int,
        batch_size: int = 64,
        sink: MetricSink | None = None,
        prefix: str = "tune/",
    ) -> None:
        if (every_n_steps is None) == (every_n_examples is None):
            raise ValueError(
                "StepPruningCallback: give exactly one of every_n_steps and every_n_examples "
                f"(got {every_n_steps} and {every_n_examples})"
            )
        for name, value in (("every_n_steps", every_n_steps), ("every_n_examples", every_n_examples)):
            if value is not None and value < 1:
                raise ValueError(f"StepPruningCallback: {name} must be at least 1, got {value}")
        if every_n_examples is not None and (train_batch_size is None or train_batch_size < 1):
            raise ValueError(
                "StepPruningCallback: every_n_examples needs the training batch size "
                f"(train_batch_size, at least 1; got {train_batch_size})"
            )
        self.trial = trial
        self.subset = subset
        self.every = every_n_steps
        self.every_examples = every_n_examples
        self.train_batch_size = train_batch_size
        self.examples_per_step: int | None = None
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
        self._report_steps: frozenset[int] = frozenset()  # examples axis: the optimizer steps that report

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget_steps = int(trainer.estimated_stepping_batches)
        if self.every_examples is None or self.train_batch_size is None:
            return
        accumulation, world = int(trainer.accumulate_grad_batches), int(trainer.world_size)
        self.examples_per_step = self.train_batch_size * accumulation * world
        self._report_steps = frozenset(
            examples_report_steps(
                every_n_examples=self.every_examples,
                examples_per_step=self.examples_per_step,
                last_step=self.budget_steps,
            )
        )
        if self.every_examples % self.examples_per_step and trainer.is_global_zero:
            _logger.warning(
                "every_n_examples (%d) is not a multiple of the %d examples of an optimizer step "
                "(batch %d x accumulation %d x %d device(s)): the reports fall at the first step past "
                "each multiple (report step = the examples seen then)",
                self.every_examples,
                self.examples_per_step,
                self.train_batch_size,
                accumulation,
                world,
            )

    def _report_step(self, step: int) -> int | None:
        """The step to report at optimizer step ``step`` (a step or an examples count), or None
        when ``step`` is not a report step (or a micro-batch of a step already seen)."""
        if step == self._seen_step:
            return None
        if self.every_examples is None:
            return None if step % self.every else step
        return step * self.examples_per_step if step in self._report_steps else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        self.steps = step
        report_step = self._report_step(step)
        if report_step is None:  # a micro-batch, or not a report step
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
            self.reports[report_step] = value
            if self.sink is not None:
                metrics = {f"{self.prefix}{k}_subset": v for k, v in values.items()}
                if self.every_examples is not None:
                    metrics[f"{self.prefix}examples_seen"] = float(report_step)
                self.sink.log_metrics(metrics, step=step)
            if not all(math.isfinite(v) for v in values.values()):
                decision = DIVERGED  # nothing more to learn from this trial
            else:
                if self.trial is None:
                    raise RuntimeError("StepPruningCallback: global rank 0 needs the Optuna trial")
                self.trial.report(value, step=report_step)
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
            where = f"step {step}" if self.every_examples is None else f"step {step} ({report_step} examples)"
            raise optuna.TrialPruned(f"pruned at {where}: {self.metric} on the val subset = {value:.4f}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps = int(trainer.global_step)

    def summary(self) -> Mapping[str, Any]:
        return {"steps": self.steps, "pruned_at": self.pruned_at, "reports": dict(self.reports)}
