"""Stage runs: one MLflow child run per stage under one parent run per pipeline version.

``stage_run(tracking, experiment=..., stage=..., params=...)`` is the one entry point of stages;
:class:`StageLifecycle` is what happens behind it, in order:

- open: the experiment is created on first use; the run re-attaches to ``resume_run_id``
  (status back to RUNNING; an unknown id starts a new run with a warning), or is created with
  MLflow's context tags, the lineage tags of the ``params`` given (lineage.py) and
  ``bigmodel_ops.stage``, as a child of the pipeline version's parent run (pipeline.py, which
  logs all params) unless ``parent_run_id`` is given. The run logs the params sections its
  dvc.yaml entry lists, and exports its id as ``BIGMODEL_OPS_RUN_ID`` to the processes it starts;
- while the stage runs, logging is queued (transport.py) and an outage spools to disk (spool.py;
  a run started during one gets a placeholder id ``offline-...``); SIGTERM raises
  :class:`TerminatedBySignal` (``SystemExit`` 143);
- end: FINISHED on success or an exception in ``finished_on``, FAILED on another exception (its
  traceback logged as ``error/traceback.txt``), KILLED on SIGTERM/SIGINT; the parent gets the
  same status, and a finished stage is recorded as the producer of its outputs.

Only global rank 0 logs; other ranks get a StageRun that sends nothing and reports rank 0's id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from bigmodel_ops.config import TrackingParams
from bigmodel_ops.tracking import lineage, pipeline
from bigmodel_ops.tracking.handle import STAGE_TAG, StageRun, signal_guard, status_for
from bigmodel_ops.tracking.spool import Spool, is_offline_id
from bigmodel_ops.tracking.store import TrackingOfflineWarning, is_outage
from bigmodel_ops.tracking.system_metrics import start_system_metrics
from bigmodel_ops.tracking.transport import RUN_ID_ENV, LogSender, NullTransport

_logger = logging.getLogger(__name__)


def tracking_uri(tracking: TrackingParams) -> str:
    """MLFLOW_TRACKING_URI wins over ``tracking.uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri


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
        yield StageRun(
            NullTransport(tracking_uri(tracking)),
            run_id="",
            run_name=run_name,
            stage=stage,
            experiment=experiment,
        )
        return
    with _stage_scope(tracking, stage):
        life = StageLifecycle(tracking, experiment=experiment, stage=stage, params=params, tags=tags)
        run = life.open(run_name, resume_run_id=resume_run_id, parent_run_id=parent_run_id)
        if log_stage_params and resume_run_id is None:
            run.log_params(lineage.stage_params(params, life.root, stage))
        if system_metrics and tracking.system_metrics:
            resumed = resume_run_id is not None and not is_offline_id(run.run_id)
            life.monitor = start_system_metrics(run, tracking.system_metrics_interval_s, resumed, life.uri)
        signals: list[int] = []
        try:
            with signal_guard(signals):
                yield run
        except BaseException as error:
            end = {"FINISHED": life.finish, "FAILED": life.fail, "KILLED": life.kill}
            end[status_for(error, finished_on, signalled=bool(signals))](error)
            raise
        life.finish()


class StageLifecycle:
    """One stage run of rank 0: ``open`` (re-attach, or create under the pipeline parent found by
    ``attach_to_parent``), then one of ``finish``, ``fail`` or ``kill``."""

    def __init__(
        self,
        tracking: TrackingParams,
        *,
        experiment: str,
        stage: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.experiment, self.stage, self.params = experiment, stage, params
        self.root = lineage.find_project_root()
        self.uri = uri = tracking_uri(tracking)
        self.location = _artifact_location(tracking.artifact_location, uri)
        spool_dir = Path(tracking.spool_dir)
        if not spool_dir.is_absolute() and self.root is not None:
            spool_dir = self.root / spool_dir
        self.sender = LogSender(
            MlflowClient(uri),
            Spool(spool_dir, uri=uri),
            mode=tracking.sender,
            nice=tracking.sender_nice,
            sched_idle=tracking.sender_sched_idle,
            flush_interval_s=tracking.flush_interval_s,
            retry_interval_s=tracking.retry_interval_s,
            replay_leftovers=True,
        )
        self.lineage = lineage.safe_lineage_tags(stage=stage, root=self.root, params=params)
        self.pipeline_id = (
            self.lineage.get(pipeline.PIPELINE_TAG) or f"noproject-{lineage.params_hash(params, None)}"
        )
        self.tags = {
            **resolve_tags(None, ignore=[lineage.LineageContextProvider]),
            **self.lineage,
            STAGE_TAG: stage,
        }
        self.tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        self.parent_id: str | None = None
        self.monitor: Any = None
        self._exported = os.environ.get(RUN_ID_ENV)

    def open(self, run_name: str, *, resume_run_id: str | None, parent_run_id: str | None) -> StageRun:
        """Re-attach to ``resume_run_id``, or create the run under its parent; export its id."""
        try:
            run_id = self._reattach(resume_run_id) if resume_run_id is not None else None
            if run_id is None:
                self.parent_id = parent_run_id or self.attach_to_parent()
                if self.parent_id is not None:
                    self.tags["mlflow.parentRunId"] = self.parent_id
                self.tags["mlflow.runName"] = run_name
                run_id = self.sender.create_run(
                    experiment=self.experiment,
                    artifact_location=self.location,
                    run_name=run_name,
                    tags=self.tags,
                )
            else:
                self.parent_id = self._parent_of(run_id)
        except BaseException:
            self.sender.close()
            raise
        inherited = {k: v for k, v in self.lineage.items() if not k.startswith(lineage.PREFIX + "dep.")}
        self.run = StageRun(
            self.sender,
            run_id=run_id,
            run_name=run_name,
            stage=self.stage,
            experiment=self.experiment,
            artifact_location=self.location,
            inherited_tags=inherited,
        )
        os.environ[RUN_ID_ENV] = self.run.run_id
        return self.run

    def attach_to_parent(self) -> str | None:
        """The pipeline version's parent run, found (status back to RUNNING) or created (with all
        params); None while the store is unreachable."""
        experiment_id = self.sender.experiment_id(self.experiment, self.location)
        if experiment_id is None or self.sender.offline:
            return None
        try:
            root = self.root or Path.cwd()
            parent_id, created = pipeline.find_or_create_parent(
                self.sender.client,
                experiment_id=experiment_id,
                pipeline_id=self.pipeline_id,
                root=root,
                tags=self.lineage,
            )
        except Exception as error:
            if is_outage(error):
                self.sender.go_offline(error)
            else:
                warnings.warn(f"no pipeline parent run: {error}", RuntimeWarning, stacklevel=4)
            return None
        if created:
            StageRun(self.sender, run_id=parent_id, run_name="", stage="", experiment="").log_params(
                self.params
            )
        else:
            self.sender.call(
                parent_id, lambda rid: self.sender.client.update_run(rid, status="RUNNING"), None
            )
        return parent_id

    def _reattach(self, run_id: str) -> str | None:
        client, real = self.sender.client, self.sender.resolve(run_id)
        if is_offline_id(real):
            return real  # still only in the spool: keep logging under the placeholder

        def running(rid: str) -> None:
            client.update_run(rid, status="RUNNING")
            client.set_tag(rid, "bigmodel_ops.resumed_at", str(int(time.time() * 1000)))

        try:
            self.sender.call(real, running, {"op": "update", "status": "RUNNING"})
            return real
        except Exception as error:
            warnings.warn(
                f"cannot resume MLflow run {run_id} ({error}); starting a new run",
                RuntimeWarning,
                stacklevel=5,
            )
            return None

    def _parent_of(self, run_id: str) -> str | None:
        with contextlib.suppress(Exception):  # a missing parent only loses the producer tag
            if not is_offline_id(run_id) and not self.sender.offline:
                return self.sender.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        return None

    def finish(self, error: BaseException | None = None) -> None:
        """A normal end (``error``: an exception that counts as one, recorded as the outcome)."""
        self._end("FINISHED", error)

    def fail(self, error: BaseException) -> None:
        self._end("FAILED", error)

    def kill(self, error: BaseException) -> None:
        self._end("KILLED", error)

    def _end(self, status: str, error: BaseException | None) -> None:
        try:
            if self.monitor is not None:
                with contextlib.suppress(Exception):
                    self.monitor.finish()  # its last sample goes out with the run's last metrics
            self.run._end(status, error)
            self._update_parent(status)
            if not self.sender.close():
                spool = self.sender.spool
                message = (
                    f"tracking server still unreachable at the end of stage {self.stage!r}: "
                    f"{spool.count_records()} record(s) of run {self.run._run_id} remain in {spool.directory}; "
                    "the next stage run replays them"
                )
                warnings.warn(message, TrackingOfflineWarning, stacklevel=4)
                _logger.warning(message)
        finally:
            if self._exported is None:
                os.environ.pop(RUN_ID_ENV, None)
            else:
                os.environ[RUN_ID_ENV] = self._exported

    def _update_parent(self, status: str) -> None:
        real, client = self.run.run_id, self.sender.client
        if self.parent_id is not None:
            try:
                if status == "FINISHED" and not is_offline_id(real):
                    pipeline.mark_stage_done(
                        client,
                        parent_id=self.parent_id,
                        stage=self.stage,
                        run_id=real,
                        pipeline_id=self.pipeline_id,
                    )
                client.set_terminated(self.parent_id, status=status)
            except Exception as parent_error:  # the stage's own outcome is already recorded
                _logger.warning("could not update pipeline run %s: %s", self.parent_id, parent_error)
        if status == "FINISHED" and self.root is not None:
            with contextlib.suppress(OSError):
                pipeline.record_stage(self.root, stage=self.stage, run_id=real, pipeline_id=self.pipeline_id)


def _artifact_location(location: str, uri: str) -> str | None:
    if "://" in location:
        return location
    if uri.startswith(("http://", "https://")):
        return None  # the server decides
    return Path(location).resolve().as_uri()


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
