"""MLflow tracking of pipeline stages: runs, the pipeline run tree, lineage, buffered logging.

Stages use one entry point::

    with stage_run(params.tracking, experiment=params.experiment_name, stage="pretrain",
                   params=params.model_dump(mode="json")) as run:
        run.log_params(...)
        run.log_metrics({"train/loss": 2.3}, step=global_step)
        run.log_artifact(path)

Everything else (the pipeline parent run, lineage, heartbeats, the status on a crash or signal,
the background sender and the offline spool) happens behind it; runs.py is where to start
reading. MLflow imports ``bigmodel_ops.tracking.lineage`` (our run context provider) while
``mlflow.tracking`` is still initialising, so this package imports MLflow only lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigmodel_ops.tracking.handle import StageRun
    from bigmodel_ops.tracking.runs import stage_run

__all__ = ["StageRun", "stage_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bigmodel_ops.tracking import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
