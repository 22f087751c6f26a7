"""The Lightning callback that meters what each fit cost, and :func:`cost_of` to read it back.

One job: drive a :class:`bigmodel_ops.cost.CostMeter` (device-hours, CPU-hours, energy) over a
``Trainer.fit`` and log the totals as ``cost/*`` metrics with the tag
:data:`bigmodel_ops.cost.SOURCE_TAG`. :func:`~bigmodel_ops.trainer.build_trainer` adds a
:class:`CostCallback` to every Trainer that has a :class:`~bigmodel_ops.trainer.MetricsCallback`
(pretraining, each tuning trial, fine-tuning), logging through that callback's sink.

Kept apart from :mod:`bigmodel_ops.cost`, which stays plain Python (no Lightning) so that the
tracking layer can import it cheaply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from bigmodel_ops.cost import POLL_S, SOURCE_TAG, Cost, CostMeter

if TYPE_CHECKING:
    from bigmodel_ops.trainer import MetricsCallback, MetricSink


class CostCallback(Callback):
    """Meters each fit (:class:`bigmodel_ops.cost.CostMeter`, started at fit start) and, when
    training ends, logs ``cost/device_hours``, ``cost/cpu_hours`` and ``cost/energy_kwh`` at the
    global step and the tag ``cost.energy_source``, from global rank 0, through the sink of
    ``metrics`` (a :class:`~bigmodel_ops.trainer.MetricsCallback`; their values also go into its
    ``last``) or ``sink``.

    Under DDP CPU time and energy are summed over the ranks (an all-reduce when training ends);
    on an exception (a pruned trial, a NaN, SIGTERM) there is none: rank 0's values are scaled by
    the world size (by the machines for RAPL) and logged at once. The totals so far are part of
    the checkpoint, so a resumed run continues them (what ran after the last checkpoint of a
    killed run is not counted; it is trained, and counted, again). ``offset``: a cost added to
    this fit's, e.g. an earlier fit logged to the same run. ``total``: the cost after the fit.
    """

    def __init__(
        self,
        metrics: MetricsCallback | None = None,
        *,
        sink: MetricSink | None = None,
        offset: Cost | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.metrics, self._sink, self.offset, self.poll_s = metrics, sink, offset or Cost(), poll_s
        self.prior = Cost()  # from a checkpoint: the fits before a resume
        self.meter: CostMeter | None = None
        self.total: Cost | None = None
        self._world = self._nodes = 1

    @property
    def sink(self) -> MetricSink | None:
        return self._sink if self._sink is not None else getattr(self.metrics, "sink", None)

    def state_dict(self) -> dict[str, Any]:
        so_far = self.prior
        if self.total is not None:
            so_far = self.total
        elif self.meter is not None:
            so_far = self.prior + self._scaled(self.meter.read())
        return so_far.as_dict()  # plain floats: weights_only-safe

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prior = Cost(**{k: float(v) for k, v in state.items() if k in Cost.__dataclass_fields__})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        gpu = None
        if device.type == "cuda":
            gpu = device.index if device.index is not None else torch.cuda.current_device()
        self._world, self._nodes = max(trainer.world_size, 1), max(trainer.num_nodes, 1)
        self.total = None
        self.meter = CostMeter(
            devices=self._world, gpu_index=gpu, machine_energy=trainer.local_rank == 0, poll_s=self.poll_s
        ).start()

    def _scaled(self, local: Cost) -> Cost:
        """Rank 0's cost as the whole run's: CPU and energy x world size (RAPL: x machines)."""
        energy_scale = self._nodes if local.energy_source == "rapl" else self._world
        return Cost(
            local.device_hours,
            local.cpu_hours * self._world,
            local.energy_kwh * energy_scale,
            local.energy_source,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.meter is None or self.total is not None:
            return
        local = self.meter.stop()
        fit = local
        if trainer.world_size > 1:
            both = torch.tensor(
                [local.cpu_hours, local.energy_kwh], dtype=torch.float64, device=trainer.strategy.root_device
            )
            cpu, energy = trainer.strategy.reduce(both, reduce_op="sum").tolist()
            fit = Cost(local.device_hours, cpu, energy, local.energy_source)
        self._finish(trainer, fit)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.meter is None or self.total is not None:
            return
        try:
            self._finish(trainer, self._scaled(self.meter.stop()))
        except Exception as error:  # noqa: BLE001 - the training error matters more
            logging.getLogger(__name__).warning("could not log the cost of the failed fit: %s", error)

    def _finish(self, trainer: pl.Trainer, fit: Cost) -> None:
        self.total = self.offset + self.prior + fit
        values = self.total.metrics()
        if self.metrics is not None:
            self.metrics.last.update(values)
        sink = self.sink
        if sink is not None and trainer.is_global_zero:
            sink.log_metrics(values, step=trainer.global_step)
            set_tags = getattr(sink, "set_tags", None)
            if set_tags is not None:
                set_tags({SOURCE_TAG: self.total.energy_source or "estimate"})


def cost_of(trainer: pl.Trainer) -> Cost | None:
    """The cost of the trainer's last fit (with its offset and resumed part), None if unmetered."""
    meter = next((c for c in trainer.callbacks if isinstance(c, CostCallback)), None)
    return meter.total if meter is not None else None
