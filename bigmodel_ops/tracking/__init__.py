"""MLflow integration: stage runs, the pipeline run tree, lineage tags, buffered logging.

Stages use exactly one entry point::

    with stage_run(params, stage="pretrain") as run:
        run.log_params(...)
        run.log_metrics({"train/loss": 2.3}, step=global_step)
        run.log_artifact(path)

Everything else (parent pipeline run, lineage tags, status on crash/signal,
buffering and the offline spool) happens behind it.

Names are imported lazily: MLflow imports ``bigmodel_ops.tracking.lineage`` (our run context
provider) while ``mlflow.tracking`` itself is still initialising, so this package must not
import MLflow at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigmodel_ops.tracking.runs import StageRun, stage_run

__all__ = ["StageRun", "stage_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bigmodel_ops.tracking import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
