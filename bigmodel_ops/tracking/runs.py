"""Stage runs: one MLflow child run per stage under one parent run per pipeline version.

``stage_run(params, stage=...)`` is the only entry point stages use. Behind it:

- experiment: one per project (``params.experiment_name``), created on first use with the
  configured artifact location;
- tags: MLflow's own context tags plus the lineage tags (lineage.py) and
  ``bigmodel_ops.stage``; run names are readable (``pretrain``, ``tune/trial-7``);
- parent: inside a project the run becomes a child of ``pipeline-<pipeline id>`` (pipeline.py),
  unless ``parent_run_id`` is given or the run is resumed; a successful stage is recorded as the
  producer of its outputs; the parent gets the whole params file as flattened params and the
  stage run the sections the stage depends on (``log_stage_params=False`` turns that off);
- logging: metrics, params and tags are queued and sent in batches by a background sender
  (logger.py: a niced child process, or a thread); an unreachable server spools to disk and
  replays later (spool.py). The run handle itself is in run_handle.py. If the server
  is down when the stage starts, the run gets a placeholder id (``offline-...``) and is created
  on replay; ``StageRun.run_id`` returns the real id as soon as it exists;
- status: FINISHED on success; FAILED on an exception (the traceback is logged as
  ``error/traceback.txt``); KILLED on SIGTERM/SIGINT (SIGTERM is turned into
  :class:`TerminatedBySignal`, a ``SystemExit`` with code 143, while the stage runs; previous
  handlers are restored afterwards). A run is never left RUNNING by a Python-level exit;
- resume: ``resume_run_id`` re-attaches to the same run (status back to RUNNING); callers keep
  logging at their own global step. An unknown id starts a new run with a warning;
- ranks: only global rank 0 logs (RANK, else SLURM_PROCID, else NODE_RANK/LOCAL_RANK). Rank 0
  exports ``BIGMODEL_OPS_RUN_ID`` so that processes Lightning launches inherit it; other ranks
  get a :class:`NoOpStageRun` whose ``run_id`` is that id;
- system metrics: ``stage_run(..., system_metrics=True)`` starts MLflow's SystemMetricsMonitor
  when ``params.tracking.system_metrics`` is on; its samples go through the same queue/spool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from bigmodel_ops.config import Params
from bigmodel_ops.tracking import lineage, pipeline
from bigmodel_ops.tracking.logger import LogSender, TrackingOfflineWarning, is_outage
from bigmodel_ops.tracking.run_handle import (
    RUN_ID_ENV,
    STAGE_TAG,
    NoOpStageRun,
    StageRun,
    TerminatedBySignal,
    create_from_record,
    create_run,
    ensure_experiment,
    finish_run,
    log_traceback,
    status_for,
)
from bigmodel_ops.tracking.spool import Spool, is_offline_id

_logger = logging.getLogger(__name__)


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params.tracking.uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


def global_rank() -> int:
    """This process's global rank, read the way Lightning's cluster environments do (0 if unset)."""
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value not in (None, "") and (name != "SLURM_PROCID" or _slurm_multi_task()):
            return int(value)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    # Without the world layout the exact global rank is unknown, but only rank 0 matters.
    return 0 if local == 0 and node == 0 else max(1, local + node)


def _slurm_multi_task() -> bool:
    # An interactive `srun bash` also sets SLURM_PROCID; a single task is rank 0 anyway.
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or os.environ.get("SLURM_PROCID") != "0"


def _artifact_location(params: Params, uri: str) -> str | None:
    location = params.tracking.artifact_location
    if "://" in location:
        return location
    if uri.startswith(("http://", "https://")):
        return None  # the server decides
    return Path(location).resolve().as_uri()


@contextlib.contextmanager
def _http_limits(params: Params, uri: str) -> Iterator[None]:
    """Small HTTP retries/timeouts while a stage runs, so an outage costs seconds, not minutes.

    Values the user set in the environment are kept.
    """
    if not uri.startswith(("http://", "https://")):
        yield
        return
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(params.tracking.http_max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(params.tracking.http_timeout_s),
    }
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _signal_guard(seen: list[int]) -> Iterator[None]:
    """SIGTERM -> TerminatedBySignal, SIGINT -> KeyboardInterrupt; both remembered in ``seen``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_term(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        raise TerminatedBySignal(signum)

    def on_int(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        handler = previous[signal.SIGINT]
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_int)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _stage_param_sections(params: Params, root: Path | None, stage: str) -> dict[str, Any]:
    """The params sections a stage depends on (its dvc.yaml ``params:``); all when unknown."""
    data = params.model_dump(mode="json")
    keys: list[str] = []
    if root is not None:
        with contextlib.suppress(Exception):
            keys = lineage.stage_param_keys(lineage._read_yaml(root / "dvc.yaml"), stage)
    if not keys:
        return data
    picked: dict[str, Any] = {}
    for key in keys:
        value = lineage._pick(data, key)
        if value is None:
            continue
        node = picked
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return picked


@contextlib.contextmanager
def stage_run(
    params: Params,
    *,
    stage: str,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    log_stage_params: bool = True,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """Start (or, with resume_run_id, re-attach to) the MLflow run of a stage.

    See the module docstring for what happens behind it. The run ends FINISHED on success,
    FAILED on an exception and KILLED on SIGTERM/SIGINT; the exception is re-raised.
    """
    run_name = run_name or stage
    uri = tracking_uri(params)
    if global_rank() != 0:
        yield NoOpStageRun(params=params, uri=uri, stage=stage, run_name=run_name)
        return
    root = lineage.find_project_root()
    stage_token = lineage.current_stage.set(stage)
    try:
        with _http_limits(params, uri):
            yield from _stage_run_rank0(
                params,
                stage=stage,
                run_name=run_name,
                uri=uri,
                root=root,
                resume_run_id=resume_run_id,
                parent_run_id=parent_run_id,
                system_metrics=system_metrics,
                log_stage_params=log_stage_params,
                extra_tags=tags,
            )
    finally:
        lineage.current_stage.reset(stage_token)


def _stage_run_rank0(
    params: Params,
    *,
    stage: str,
    run_name: str,
    uri: str,
    root: Path | None,
    resume_run_id: str | None,
    parent_run_id: str | None,
    system_metrics: bool,
    log_stage_params: bool,
    extra_tags: Mapping[str, Any] | None,
) -> Iterator[StageRun]:
    client = MlflowClient(uri)
    spool_dir = Path(params.tracking.spool_dir)
    if not spool_dir.is_absolute() and root is not None:
        spool_dir = root / spool_dir
    spool = Spool(spool_dir, uri=uri)
    sender = LogSender(
        client,
        spool,
        flush_interval_s=params.tracking.flush_interval_s,
        retry_interval_s=params.tracking.retry_interval_s,
        create_offline_run=create_from_record,
        mode=params.tracking.sender,
        nice=params.tracking.sender_nice,
        sched_idle=params.tracking.sender_sched_idle,
        replay_leftovers=True,
    )

    lineage_tags = lineage.safe_lineage_tags(stage=stage, root=root)
    context = resolve_tags(None, ignore=[lineage.LineageContextProvider])
    run_tags = {**context, **lineage_tags, STAGE_TAG: stage, "mlflow.runName": run_name}
    run_tags.update({str(k): str(v) for k, v in (extra_tags or {}).items()})
    inherited = {k: v for k, v in lineage_tags.items() if not k.startswith("bigmodel_ops.dep.")}
    pipeline_id = lineage_tags.get(pipeline.PIPELINE_TAG) or f"noproject-{params.section_hash()}"
    artifact_location = _artifact_location(params, uri)

    experiment_id: str | None = None
    try:
        experiment_id = ensure_experiment(client, params.experiment_name, artifact_location)
    except Exception as error:
        if not is_outage(error):
            raise
        sender.go_offline(error)

    run_id: str | None = None
    if resume_run_id is not None:
        run_id = _reattach(client, sender, resume_run_id)
    parent_id = parent_run_id
    if run_id is None:
        if parent_id is None and experiment_id is not None and not sender.offline:
            parent_id = _pipeline_parent(
                client, sender, params, experiment_id, pipeline_id, root, lineage_tags
            )
        if parent_id is not None:
            run_tags["mlflow.parentRunId"] = parent_id
        run_id = create_run(
            client,
            sender,
            experiment_id=experiment_id,
            experiment_name=params.experiment_name,
            artifact_location=artifact_location,
            run_name=run_name,
            tags=run_tags,
        )
    else:
        parent_id = _parent_of(client, run_id)
    run = StageRun(
        client=client,
        run_id=run_id,
        params=params,
        sender=sender,
        run_name=run_name,
        stage=stage,
        inherited_tags=inherited,
    )
    if log_stage_params and resume_run_id is None:
        run.log_params(_stage_param_sections(params, root, stage))

    monitor = None
    if system_metrics and params.tracking.system_metrics:
        monitor = _start_system_metrics(run, params, uri, resumed=resume_run_id is not None)

    previous_env = os.environ.get(RUN_ID_ENV)
    os.environ[RUN_ID_ENV] = run.run_id
    seen: list[int] = []
    error: BaseException | None = None
    try:
        with _signal_guard(seen):
            yield run
    except BaseException as raised:
        error = raised
        raise
    finally:
        status = status_for(error, seen[-1] if seen else None)
        if error is not None and status != "FINISHED":
            log_traceback(run, error)
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        finish_run(run, status)
        if parent_id is not None:
            _update_parent(
                client,
                sender,
                parent_id,
                stage=stage,
                run=run,
                status=status,
                pipeline_id=pipeline_id,
                root=root,
            )
        elif status == "FINISHED" and root is not None:
            with contextlib.suppress(OSError):
                pipeline.record_stage(root, stage=stage, run_id=run.run_id, pipeline_id=pipeline_id)
        empty = sender.close()
        if not empty:
            count = spool.count_records()
            message = (
                f"tracking server still unreachable at the end of stage {stage!r}: {count} record(s) of "
                f"run {run._run_id} remain in {spool.directory}; the next stage run replays them"
            )
            warnings.warn(message, TrackingOfflineWarning, stacklevel=3)
            _logger.warning(message)
        if previous_env is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = previous_env


def _reattach(client: MlflowClient, sender: LogSender, run_id: str) -> str | None:
    real = sender.resolve(run_id)
    if is_offline_id(real):
        return real  # still only in the spool: keep logging under the placeholder
    try:
        client.update_run(real, status="RUNNING")
        client.set_tag(real, "bigmodel_ops.resumed_at", str(int(time.time() * 1000)))
        return real
    except Exception as error:
        if is_outage(error):
            sender.go_offline(error)
            sender.spool.append(run_id, {"op": "update", "status": "RUNNING"})
            return real
        warnings.warn(
            f"cannot resume MLflow run {run_id} ({error}); starting a new run", RuntimeWarning, stacklevel=4
        )
        return None


def _parent_of(client: MlflowClient, run_id: str) -> str | None:
    if is_offline_id(run_id):
        return None
    try:
        return client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    except Exception:  # noqa: BLE001 - a missing parent only loses the producer tag
        return None


def _pipeline_parent(
    client: MlflowClient,
    sender: LogSender,
    params: Params,
    experiment_id: str,
    pipeline_id: str,
    root: Path | None,
    lineage_tags: dict[str, str],
) -> str | None:
    try:
        parent_id, created = pipeline.find_or_create_parent(
            client,
            experiment_id=experiment_id,
            pipeline_id=pipeline_id,
            root=root or Path.cwd(),
            tags=lineage_tags,
        )
    except Exception as error:
        if is_outage(error):
            sender.go_offline(error)
        else:
            warnings.warn(f"no pipeline parent run: {error}", RuntimeWarning, stacklevel=4)
        return None
    if created:
        parent = StageRun(
            client=client,
            run_id=parent_id,
            params=params,
            sender=sender,
            run_name=f"pipeline-{pipeline_id}",
            stage="pipeline",
        )
        parent.log_params(params.model_dump(mode="json"))
    else:
        sender.call(parent_id, lambda rid: client.update_run(rid, status="RUNNING"), None)
    return parent_id


def _update_parent(
    client: MlflowClient,
    sender: LogSender,
    parent_id: str,
    *,
    stage: str,
    run: StageRun,
    status: str,
    pipeline_id: str,
    root: Path | None,
) -> None:
    try:
        if status == "FINISHED":
            real = run.run_id
            if not is_offline_id(real):
                pipeline.mark_stage_done(
                    client, parent_id=parent_id, stage=stage, run_id=real, pipeline_id=pipeline_id
                )
            if root is not None:
                pipeline.record_stage(root, stage=stage, run_id=real, pipeline_id=pipeline_id)
        client.set_terminated(parent_id, status=status)
    except Exception as error:  # the stage's own outcome is already recorded
        _logger.warning("could not update pipeline run %s: %s", parent_id, error)


class _SenderMetricsLogger:
    """Stands in for SystemMetricsMonitor's BatchMetricsLogger: samples go through our queue."""

    def __init__(self, run: StageRun) -> None:
        self._run = run
        self.data: list[Any] = []

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._run.log_metrics(metrics, step=int(step or 0))

    def flush(self) -> None:
        pass


def _start_system_metrics(run: StageRun, params: Params, uri: str, *, resumed: bool) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run.run_id,
            sampling_interval=params.tracking.system_metrics_interval_s,
            resume_logging=resumed and not is_offline_id(run.run_id),
            tracking_uri=uri,
        )
        monitor.mlflow_logger = _SenderMetricsLogger(run)
        monitor.start()
        return monitor
    except Exception as error:  # optional telemetry must not stop training
        _logger.warning("system metrics not recorded: %s", error)
        return None
