"""A Lightning logger that writes through a StageRun (buffered, spooled, rank-aware).

    with stage_run(params, stage="pretrain") as run:
        trainer = L.Trainer(logger=StageRunLogger(run), ...)

Lightning calls ``log_metrics(metrics, step)`` with the number of optimizer steps taken so far
(``trainer.global_step`` semantics), so metrics share the global-step x-axis with everything
else; the ``epoch`` value Lightning adds is logged as its own metric. Hyperparameters are
flattened to dotted params. Only rank 0 logs (Lightning's ``rank_zero_only`` plus the no-op
StageRun on other ranks).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bigmodel_ops.tracking.runs import StageRun


class StageRunLogger(Logger):
    def __init__(self, run: StageRun, *, prefix: str = "") -> None:
        super().__init__()
        self._run = run
        self._prefix = prefix

    @property
    def name(self) -> str:
        return self._run.run_name

    @property
    def version(self) -> str:
        return str(self._run.run_id)

    @property
    @rank_zero_experiment
    def experiment(self) -> StageRun:
        return self._run

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        values = vars(params) if isinstance(params, Namespace) else dict(params)
        self._run.log_params({k: v for k, v in values.items() if _loggable(v)})

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {f"{self._prefix}{k}": v for k, v in metrics.items()}
        self._run.log_metrics(values, step=int(step or 0))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._run.flush()


def _loggable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict | type(None))
