"""The lifecycle of one stage run (rank 0), as :class:`StageLifecycle`'s methods top to bottom.

``open`` ends dead runs (reaper.py), re-attaches to ``resume_run_id`` or creates the run under the
pipeline version's parent (pipeline.py), records the parent's datasets (frontpage.py), starts the
heartbeat and exports the run id as ``BIGMODEL_OPS_RUN_ID``. ``end`` stops the heartbeat and
system metrics, ends the run and gives the parent the same status; a finished stage becomes the
producer of its outputs and updates the parent's front page. A run started during an outage
gets a placeholder id ``offline-...`` (spool.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from bigmodel_ops.config import TrackingParams
from bigmodel_ops.tracking import frontpage, lineage, pipeline, reaper
from bigmodel_ops.tracking.handle import STAGE_TAG, StageRun
from bigmodel_ops.tracking.scrub import Scrubber
from bigmodel_ops.tracking.spool import Spool, is_offline_id
from bigmodel_ops.tracking.store import TrackingOfflineWarning, is_outage
from bigmodel_ops.tracking.transport import RUN_ID_ENV, LogSender

_logger = logging.getLogger(__name__)


def tracking_uri(tracking: TrackingParams) -> str:
    """MLFLOW_TRACKING_URI wins over ``tracking.uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri


class StageLifecycle:
    """One stage run of rank 0: ``open``, then ``end``."""

    def __init__(
        self,
        tracking: TrackingParams,
        *,
        experiment: str,
        stage: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking, self.experiment, self.stage, self.params = tracking, experiment, stage, params
        self.root = lineage.find_project_root()
        self.uri = uri = tracking_uri(tracking)
        self.location: str | None = tracking.artifact_location
        if "://" not in tracking.artifact_location:  # a local folder, unless the server decides
            http = uri.startswith(("http://", "https://"))
            self.location = None if http else Path(tracking.artifact_location).resolve().as_uri()
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
        )
        self.scrubber = Scrubber(params)
        self.lineage = lineage.safe_lineage_tags(stage=stage, root=self.root, params=params)
        self.pipeline_id = (
            self.lineage.get(pipeline.PIPELINE_TAG) or f"noproject-{lineage.params_hash(params, None)}"
        )
        context = resolve_tags(None, ignore=[lineage.LineageContextProvider])
        self.tags = {**context, **self.lineage, STAGE_TAG: stage, **reaper.process_tags(), **(tags or {})}
        self.tags = {str(k): str(v) for k, v in self.scrubber.mapping(self.tags).items()}
        self.parent_id: str | None = None
        self.monitor: Any = None
        self._exported = os.environ.get(RUN_ID_ENV)

    # ---- open ---------------------------------------------------------------------------------

    def open(self, run_name: str, *, resume_run_id: str | None, parent_run_id: str | None) -> StageRun:
        """End dead runs, re-attach to ``resume_run_id`` or create the run under its parent,
        record the parent's datasets, start the heartbeat; export the run id."""
        try:
            self.reap_dead_runs(resuming=resume_run_id)
            run_id = self._reattach(resume_run_id) if resume_run_id is not None else None
            if run_id is None:
                self.parent_id = parent_run_id or self.attach_to_parent()
                if self.parent_id is not None:
                    self.tags["mlflow.parentRunId"] = self.parent_id
                self.tags["mlflow.runName"] = run_name
                run_id = self.sender.create_run(self.experiment, self.location, self.tags)
            elif self.sender.reachable(run_id):
                with contextlib.suppress(Exception):  # a missing parent only loses the producer tag
                    self.parent_id = self.sender.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
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
            scrubber=self.scrubber,
        )
        os.environ[RUN_ID_ENV] = self.run.run_id
        self.log_datasets()
        self.heartbeat = reaper.Heartbeat(self.run, self.tracking.heartbeat_interval_s)
        return self.run

    def _experiment_id(self) -> str | None:
        """The experiment's id; None while the store is unreachable."""
        experiment_id = self.sender.experiment_id(self.experiment, self.location)
        return None if self.sender.offline else experiment_id

    def reap_dead_runs(self, *, resuming: str | None) -> None:
        """End FAILED the runs of this experiment whose heartbeat is stale and whose process is
        gone (reaper.py), but the run being resumed. Never stops the stage."""
        if (experiment_id := self._experiment_id()) is None:
            return
        try:
            stale_s = self.tracking.heartbeat_stale_s
            skip = [self.sender.resolve(resuming)] if resuming else []
            verdicts = reaper.reap(self.sender.client, [experiment_id], stale_s=stale_s, skip=skip)
        except Exception as error:  # noqa: BLE001 - housekeeping must not stop a stage
            _logger.warning("could not check for dead MLflow runs: %s", error)
            return
        for v in verdicts:
            if v.reaped:
                _logger.warning("ended MLflow run %s (%s) FAILED: %s", v.run_name, v.run_id, v.reason)

    def attach_to_parent(self) -> str | None:
        """The pipeline version's parent run, found (status back to RUNNING) or created (with all
        params, the headline metrics and the cost of the stages it reuses); None while the store is
        unreachable."""
        if (experiment_id := self._experiment_id()) is None:
            return None
        root, client = self.root or Path.cwd(), self.sender.client
        try:
            parent_id, created = pipeline.find_or_create_parent(
                client,
                experiment_id=experiment_id,
                pipeline_id=self.pipeline_id,
                root=root,
                tags=self.lineage,
            )
            if created:
                self._handle(parent_id).log_params(self.params)
                reused = {stage: str(e.get("run_id")) for stage, e in pipeline.read_registry(root).items()}
                self._copy_to_parent(parent_id, reused)
                frontpage.set_table_view(client, experiment_id, self.tracking.headline_metrics)
            else:
                client.update_run(parent_id, status="RUNNING")
        except Exception as error:
            if is_outage(error):
                self.sender.go_offline(error)
            else:
                warnings.warn(f"no pipeline parent run: {error}", RuntimeWarning, stacklevel=4)
            return None
        return parent_id

    def log_datasets(self) -> None:
        """The prepared splits and token shards as dataset inputs of the parent (frontpage.py)."""
        if self.parent_id is None or self.root is None or not self.sender.reachable(self.parent_id):
            return
        try:
            dvc_files = [lineage.read_yaml(self.root / name) for name in ("dvc.yaml", "dvc.lock")]
            records = frontpage.current_datasets(self.stage, *dvc_files)
            inputs = self.sender.client.get_run(self.parent_id).inputs.dataset_inputs if records else []
            logged = {(i.dataset.name, i.dataset.digest) for i in inputs}
            for record in records:
                if (record["name"], record["digest"][:36]) not in logged:
                    self._handle(self.parent_id).log_input(**record)
        except Exception as error:  # noqa: BLE001 - the front page must not stop a stage
            _logger.warning("could not record the pipeline's datasets: %s", error)

    def _reattach(self, run_id: str) -> str | None:
        client, real = self.sender.client, self.sender.resolve(run_id)
        if is_offline_id(real):
            return real  # still only in the spool: keep logging under the placeholder

        def running(rid: str) -> None:
            client.update_run(rid, status="RUNNING")
            if reaper.REAP_TAG in client.get_run(rid).data.tags:
                client.delete_tag(rid, reaper.REAP_TAG)  # reaped while it was down: alive again
            now = {"bigmodel_ops.resumed_at": str(int(time.time() * 1000)), **reaper.process_tags()}
            client.log_batch(rid, tags=[RunTag(k, v) for k, v in now.items()])

        try:
            self.sender.call(real, {"op": "update", "status": "RUNNING"}, running)
            return real
        except Exception as error:
            message = f"cannot resume MLflow run {run_id} ({error}); starting a new run"
            warnings.warn(message, RuntimeWarning, stacklevel=5)
            return None

    def _handle(self, run_id: str) -> StageRun:
        """A handle on another run (the parent) through this stage's sender and scrubber."""
        return StageRun(
            self.sender, run_id=run_id, run_name="", stage="", experiment="", scrubber=self.scrubber
        )

    def _copy_to_parent(self, parent_id: str, runs: dict[str, str]) -> None:
        """The headline metrics of ``runs`` ({stage: run id}) and the recomputed cost sums onto the
        parent (frontpage.py); a failure of the cost only warns."""
        client = self.sender.client
        frontpage.copy_headline(client, parent_id=parent_id, runs=runs, wanted=self.tracking.headline_metrics)
        try:
            frontpage.log_pipeline_cost(client, parent_id=parent_id)
        except Exception as error:  # noqa: BLE001 - the front page must not stop a stage
            _logger.warning("could not sum the cost of pipeline run %s: %s", parent_id, error)

    # ---- end ----------------------------------------------------------------------------------

    def end(self, status: str, error: BaseException | None = None) -> None:
        """End the run FINISHED, FAILED or KILLED (``error``: what ended it; with FINISHED, an
        exception that counts as a normal end, recorded as the outcome)."""
        try:
            self.heartbeat.stop()
            if self.monitor is not None:
                with contextlib.suppress(Exception):
                    self.monitor.finish()  # its last sample goes out with the run's last metrics
            self.run._end(status, error)
            self._update_parent(status)
            if not self.sender.close():
                spool = self.sender.spool
                self.sender.warn(
                    f"tracking server still unreachable at the end of stage {self.stage!r}: "
                    f"{spool.count_records()} record(s) of run {self.run._run_id} remain in {spool.directory}; "
                    "the next stage run replays them",
                    TrackingOfflineWarning,
                )
        finally:
            if self._exported is None:
                os.environ.pop(RUN_ID_ENV, None)
            else:
                os.environ[RUN_ID_ENV] = self._exported

    def _update_parent(self, status: str) -> None:
        """The parent takes this stage's status; a finished stage becomes the producer of its
        outputs (parent tags and the local registry) and adds its headline metrics; the DAG is redrawn."""
        real, client = self.run.run_id, self.sender.client
        finished = status == "FINISHED" and not is_offline_id(real)
        if self.parent_id is not None:
            try:
                if finished and self.sender.reachable():
                    pipeline.mark_stage_done(
                        client,
                        parent_id=self.parent_id,
                        stage=self.stage,
                        run_id=real,
                        pipeline_id=self.pipeline_id,
                    )
                    self._copy_to_parent(self.parent_id, {self.stage: real})
                if self.root is not None and self.sender.reachable():
                    frontpage.log_dag(
                        self.sender,
                        parent_id=self.parent_id,
                        dvc_yaml=lineage.read_yaml(self.root / "dvc.yaml"),
                        pipeline_id=self.pipeline_id,
                        current=(self.stage, status),
                    )
                client.set_terminated(self.parent_id, status=status)
            except Exception as parent_error:  # the stage's own outcome is already recorded
                _logger.warning("could not update pipeline run %s: %s", self.parent_id, parent_error)
        if finished and self.root is not None:
            with contextlib.suppress(OSError):
                pipeline.record_stage(self.root, stage=self.stage, run_id=real, pipeline_id=self.pipeline_id)
