"""MLflow tracking of pipeline stages: runs, the pipeline run tree, lineage, buffered logging.

Stages use one entry point::

    with stage_run(params.tracking, experiment=params.experiment_name, stage="pretrain",
                   params=params.model_dump(mode="json")) as run:
        run.log_params(...)
        run.log_metrics({"train/loss": 2.3}, step=global_step)
        run.log_artifact(path)

Everything else (the pipeline parent run, lineage tags, the status on a crash or signal, the
background sender and the offline spool) happens behind it. Modules, by role: runs.py (the
lifecycle of a stage run), handle.py (StageRun, what a stage logs through, and how a run ends),
transport.py (the caller side of the log sender), sender.py (its sending side), store.py (what
both sides share: outages, batches, replay), spool.py (the on-disk spool), lineage.py (lineage
tags and the MLflow plugin), pipeline.py (the pipeline run tree), system_metrics.py,
registry.py (model registry helpers).

Names are imported lazily: MLflow imports ``bigmodel_ops.tracking.lineage`` (our run context
provider) while ``mlflow.tracking`` itself is still initialising, so this package must not
import MLflow at import time.
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
