"""MLflow integration: stage runs, the pipeline run tree, lineage tags, buffered logging.

Stages use exactly one entry point::

    with stage_run(params, stage="pretrain") as run:
        run.log_params(...)
        run.log_metrics({"train/loss": 2.3}, step=global_step)
        run.log_artifact(path)

Everything else (parent pipeline run, lineage tags, status on crash/signal,
buffering and the offline spool) happens behind it.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigmodel_ops.tracking.runs import StageRun, stage_run

__all__ = ["StageRun", "stage_run"]


def __getattr__(name: str):
    # Lazy: MLflow imports our run context provider (tracking.lineage) while it is itself
    # importing, so this package must not import mlflow at import time.
    if name in __all__:
        from bigmodel_ops.tracking import runs

        return getattr(runs, name)
    raise AttributeError(name)
