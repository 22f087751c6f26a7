"""MLflow integration: stage runs, the pipeline run tree, lineage tags, buffered logging.

Stages use exactly one entry point::

    with stage_run(params, stage="pretrain") as run:
        run.log_params(...)
        run.log_metrics({"train/loss": 2.3}, step=global_step)
        run.log_artifact(path)

Everything else (parent pipeline run, lineage tags, status on crash/signal,
buffering and the offline spool) happens behind it.
"""

from bigmodel_ops.tracking.runs import StageRun, stage_run

__all__ = ["StageRun", "stage_run"]
