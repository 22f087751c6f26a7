"""Stage runs: one MLflow child run per stage under one parent run per pipeline version.

``stage_run(tracking, experiment=..., stage=..., params=...)`` is the one entry point of stages.
Behind it, :class:`~bigmodel_ops.tracking.lifecycle.StageLifecycle` opens the run and ends it
FINISHED (success, or an exception in ``finished_on``), FAILED (another exception, its traceback
logged) or KILLED (SIGTERM, which raises :class:`TerminatedBySignal`, or SIGINT). Only global
rank 0 logs; other ranks get a StageRun that sends nothing and reports rank 0's id.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from bigmodel_ops.config import TrackingParams
from bigmodel_ops.tracking import lineage
from bigmodel_ops.tracking.handle import StageRun, TerminatedBySignal, signal_guard, status_for
from bigmodel_ops.tracking.lifecycle import StageLifecycle, tracking_uri
from bigmodel_ops.tracking.spool import is_offline_id
from bigmodel_ops.tracking.system_metrics import start_system_metrics
from bigmodel_ops.tracking.transport import NullTransport

__all__ = ["StageRun", "TerminatedBySignal", "global_rank", "stage_run", "tracking_uri"]


def global_rank() -> int:
    """This process's global rank, read the way Lightning's cluster environments do (0 if unset)."""
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        # An interactive `srun bash` also sets SLURM_PROCID; a single task is rank 0 anyway.
        single_task = (
            name == "SLURM_PROCID" and value == "0" and int(os.environ.get("SLURM_NTASKS") or 1) <= 1
        )
        if value not in (None, "") and not single_task:
            return int(value)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    # Without the world layout the exact global rank is unknown, but only rank 0 matters.
    return 0 if local == 0 and node == 0 else max(1, local + node)


@contextlib.contextmanager
def stage_run(
    tracking: TrackingParams,
    *,
    experiment: str,
    stage: str,
    params: Mapping[str, Any],
    run_name: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    log_stage_params: bool = True,
    tags: Mapping[str, Any] | None = None,
    finished_on: tuple[type[BaseException], ...] = (),
) -> Iterator[StageRun]:
    """The MLflow run of a stage, new or (``resume_run_id``) re-attached; see the module docstring.

    ``params``: the validated params the stage runs with, JSON-able (``model_dump(mode="json")``);
    lineage hashes them. ``system_metrics``: sample CPU/memory/GPU (if ``tracking.system_metrics``).
    The exception that ended the run is re-raised.
    """
    run_name = run_name or stage
    if global_rank() != 0:
        transport = NullTransport(tracking_uri(tracking))
        yield StageRun(transport, run_id="", run_name=run_name, stage=stage, experiment=experiment)
        return
    with _stage_scope(tracking, stage):
        life = StageLifecycle(tracking, experiment=experiment, stage=stage, params=params, tags=tags)
        run = life.open(run_name, resume_run_id=resume_run_id, parent_run_id=parent_run_id)
        signals: list[int] = []
        try:  # from here on the run always ends: a failure to start its extras fails it too
            if log_stage_params and resume_run_id is None:
                run.log_params(lineage.stage_params(params, life.root, stage))
            if system_metrics and tracking.system_metrics:
                resumed = resume_run_id is not None and not is_offline_id(run.run_id)
                life.monitor = start_system_metrics(
                    run, tracking.system_metrics_interval_s, resumed, life.uri
                )
            with signal_guard(signals):
                yield run
        except BaseException as error:
            life.end(status_for(error, finished_on, signalled=bool(signals)), error)
            raise
        life.end("FINISHED")


@contextlib.contextmanager
def _stage_scope(tracking: TrackingParams, stage: str) -> Iterator[None]:
    """While a stage runs: its name for the lineage plugin, and small HTTP retries and timeouts
    (an outage then costs seconds, not MLflow's default minutes; values set by the user win)."""
    http = tracking_uri(tracking).startswith(("http://", "https://"))
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(tracking.http_max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(tracking.http_timeout_s),
    }
    added = {key: value for key, value in wanted.items() if http and key not in os.environ}
    os.environ.update(added)
    token = lineage.current_stage.set(stage)
    try:
        yield
    finally:
        lineage.current_stage.reset(token)
        for key in added:
            os.environ.pop(key, None)
