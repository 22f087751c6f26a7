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
- logging: metrics, params and tags are queued and sent in batches by a background thread
  (logger.py); an unreachable server spools to disk and replays later (spool.py). If the server
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
import json
import logging
import os
import signal
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from bigmodel_ops.config import Params, flatten
from bigmodel_ops.tracking import lineage, pipeline
from bigmodel_ops.tracking.logger import LogSender, TrackingOfflineWarning, is_outage
from bigmodel_ops.tracking.spool import Spool, is_offline_id, new_offline_id

_logger = logging.getLogger(__name__)

RUN_ID_ENV = "BIGMODEL_OPS_RUN_ID"
STAGE_TAG = "bigmodel_ops.stage"


class TerminatedBySignal(SystemExit):
    """Raised in the main thread when the stage receives SIGTERM (exit status 128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


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


class StageRun:
    """Handle on the MLflow run of one stage (or of a child run such as an Optuna trial).

    Every logging call returns immediately; ``flush()`` waits until the data reached the store
    (or, during an outage, the local spool).
    """

    def __init__(
        self,
        *,
        client: MlflowClient,
        run_id: str,
        params: Params,
        sender: LogSender,
        run_name: str,
        stage: str,
        inherited_tags: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self._run_id = run_id
        self.params = params
        self.run_name = run_name
        self.stage = stage
        self._sender = sender
        self._inherited_tags = dict(inherited_tags or {})

    @property
    def run_id(self) -> str:
        """The MLflow run id (a placeholder ``offline-...`` until an offline run is created)."""
        return self._sender.resolve(self._run_id)

    @property
    def offline(self) -> bool:
        """True while the tracking server is unreachable and data goes to the spool."""
        return self._sender.offline

    # ---- buffered ---------------------------------------------------------------------------

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Log params flattened to dotted keys. Values longer than MLflow's limit (6000 chars)
        become artifacts ``params/<key>.txt`` and the param says so."""
        items: list[tuple[str, str]] = []
        for key, value in flatten(dict(values)).items():
            text = (
                value
                if isinstance(value, str)
                else json.dumps(value)
                if isinstance(value, list)
                else str(value)
            )
            if len(text) > MAX_PARAM_VAL_LENGTH:
                self.log_text(text, f"params/{key}.txt")
                text = f"<{len(text)} chars: see artifact params/{key}.txt>"
            items.append((key, text))
        if items:
            self._sender.enqueue_params(self._run_id, items)

    def log_metrics(self, values: Mapping[str, Any], *, step: int, epoch: int | None = None) -> None:
        """Queue metrics at the global optimizer step (the x-axis everywhere); ``epoch`` is
        logged as its own metric. Values may be numbers or 0-d tensors."""
        floats = {key: value if type(value) is float else float(value) for key, value in values.items()}
        if epoch is not None:
            floats["epoch"] = float(epoch)
        self._sender.enqueue_metrics(self._run_id, floats, int(step), int(time.time() * 1000))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        if items:
            self._sender.enqueue_tags(self._run_id, items)

    def flush(self) -> None:
        """Block until everything logged so far has reached the store (or the spool)."""
        self._sender.flush()

    # ---- artifacts (synchronous; spooled during an outage) ---------------------------------

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self._artifact(Path(path), artifact_path)

    def log_artifacts(self, directory: Path | str, artifact_path: str | None = None) -> None:
        self._artifact(Path(directory), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_text(text, encoding="utf-8")
            parent = str(Path(artifact_file).parent)
            self._artifact(target, None if parent == "." else parent)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (png/svg/pdf by the file's suffix) as an artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            figure.savefig(target, bbox_inches="tight")
            parent = str(Path(artifact_file).parent)
            self._artifact(target, None if parent == "." else parent)

    def _artifact(self, local: Path, artifact_path: str | None) -> None:
        real = self.run_id
        if not self._sender.offline and not is_offline_id(real):
            try:
                if local.is_dir():
                    self.client.log_artifacts(real, str(local), artifact_path)
                else:
                    self.client.log_artifact(real, str(local), artifact_path)
                return
            except Exception as error:
                if not is_outage(error):
                    raise
                self._sender.go_offline(error)
        self._sender.spool.add_artifact(self._run_id, local, artifact_path)

    def log_input(
        self,
        *,
        name: str,
        source: str,
        digest: str,
        context: str = "train",
        profile: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a dataset used by the run (shown under "Datasets" in the UI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="local" if "://" not in source else source.split("://", 1)[0],
            source=json.dumps({"uri": source}),
            schema=json.dumps(dict(schema)) if schema else None,
            profile=json.dumps(dict(profile)) if profile else None,
        )
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self._sender.call(self._run_id, lambda rid: self.client.log_inputs(rid, datasets=[entry]), None)

    def log_model_dir(
        self,
        local_dir: Path | str,
        *,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        alias: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Any:
        """Log a model folder (safetensors + config) and optionally register it.

        Returns the ModelVersion when registered, else None. Registration needs the server:
        during an outage the folder is spooled and registration is skipped with a warning.
        """
        from bigmodel_ops.registry import register_run_model

        self.log_artifacts(local_dir, artifact_path)
        if registered_model_name is None:
            return None
        if self.offline or is_offline_id(self.run_id):
            warnings.warn(
                f"tracking server unreachable: {registered_model_name} not registered "
                f"(the model folder is spooled with run {self._run_id})",
                TrackingOfflineWarning,
                stacklevel=2,
            )
            return None
        self.flush()  # the registry checks that the artifacts are there
        version = register_run_model(
            self.client,
            run_id=self.run_id,
            artifact_path=artifact_path,
            name=registered_model_name,
            tags=tags,
        )
        if alias is not None:
            self.client.set_registered_model_alias(registered_model_name, alias, version.version)
        return version

    # ---- nested runs ------------------------------------------------------------------------

    @contextlib.contextmanager
    def child_run(
        self,
        name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        finished_on: tuple[type[BaseException], ...] | None = None,
    ) -> Iterator[StageRun]:
        """A nested run named ``<this run's name>/<name>`` (e.g. ``tune/trial-7``).

        Ends FINISHED, or FAILED/KILLED on an exception (re-raised). Exceptions listed in
        ``finished_on`` (default: ``optuna.TrialPruned`` when Optuna is loaded) end it FINISHED
        with the tag ``bigmodel_ops.outcome = <exception name>``.
        """
        if finished_on is None:
            finished_on = _default_finished_on()
        run_name = f"{self.run_name}/{name}"
        child_tags = {**self._inherited_tags, STAGE_TAG: self.stage, "mlflow.runName": run_name}
        child_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        child_tags["mlflow.parentRunId"] = self._run_id
        experiment_id = self._experiment_id()
        child_id = _create_run(
            self.client,
            self._sender,
            experiment_id=experiment_id,
            experiment_name=None,
            artifact_location=None,
            run_name=run_name,
            tags=child_tags,
        )
        child = StageRun(
            client=self.client,
            run_id=child_id,
            params=self.params,
            sender=self._sender,
            run_name=run_name,
            stage=self.stage,
            inherited_tags=self._inherited_tags,
        )
        try:
            yield child
        except finished_on as error:
            child.set_tags({"bigmodel_ops.outcome": type(error).__name__})
            _finish(child, "FINISHED")
            raise
        except BaseException as error:
            _log_traceback(child, error)
            _finish(child, _status_for(error, None))
            raise
        _finish(child, "FINISHED")

    def _experiment_id(self) -> str | None:
        real = self.run_id
        if is_offline_id(real):
            return None
        try:
            return self.client.get_run(real).info.experiment_id
        except Exception as error:
            if not is_outage(error):
                raise
            return None


class NoOpStageRun(StageRun):
    """What non-zero ranks get: every call does nothing; ``run_id`` is rank 0's run id."""

    def __init__(self, *, params: Params, uri: str, stage: str, run_name: str) -> None:
        self.params = params
        self.stage = stage
        self.run_name = run_name
        self._uri = uri
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:  # type: ignore[override]
        if self._client is None:
            self._client = MlflowClient(self._uri)
        return self._client

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return os.environ.get(RUN_ID_ENV)

    @property
    def offline(self) -> bool:
        return False

    def log_params(self, values: Mapping[str, Any]) -> None: ...
    def log_metrics(self, values: Mapping[str, Any], *, step: int, epoch: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, directory: Path | str, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_input(self, **kwargs: Any) -> None: ...

    def log_model_dir(self, local_dir: Path | str, **kwargs: Any) -> Any:
        return None

    @contextlib.contextmanager
    def child_run(self, name: str, **kwargs: Any) -> Iterator[StageRun]:
        yield NoOpStageRun(
            params=self.params, uri=self._uri, stage=self.stage, run_name=f"{self.run_name}/{name}"
        )


def _default_finished_on() -> tuple[type[BaseException], ...]:
    import sys

    optuna = sys.modules.get("optuna")
    pruned = getattr(optuna, "TrialPruned", None) if optuna is not None else None
    return (pruned,) if pruned is not None else ()


def _status_for(error: BaseException | None, signal_seen: int | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | TerminatedBySignal) or signal_seen is not None:
        return "KILLED"
    if isinstance(error, SystemExit) and error.code in (0, None):
        return "FINISHED"
    return "FAILED"


def _log_traceback(run: StageRun, error: BaseException) -> None:
    try:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        run.log_text(text, "error/traceback.txt")
        run.set_tags({"bigmodel_ops.error": f"{type(error).__name__}: {error}"[:1000]})
    except Exception:  # the original error matters more than its report
        _logger.exception("could not log the traceback of run %s", run.run_id)


def _finish(run: StageRun, status: str) -> None:
    sender = run._sender
    sender.flush()
    end = int(time.time() * 1000)
    record = {"op": "terminate", "status": status, "end_time": end}
    sender.call(run._run_id, lambda rid: run.client.set_terminated(rid, status=status, end_time=end), record)


def _create_run(
    client: MlflowClient,
    sender: LogSender,
    *,
    experiment_id: str | None,
    experiment_name: str | None,
    artifact_location: str | None,
    run_name: str,
    tags: dict[str, str],
) -> str:
    """Create a run now, or (server down) a placeholder whose creation is spooled."""
    start = int(time.time() * 1000)
    if experiment_id is not None and not sender.offline:
        try:
            return client.create_run(
                experiment_id, start_time=start, tags=tags, run_name=run_name
            ).info.run_id
        except Exception as error:
            if not is_outage(error):
                raise
            sender.go_offline(error)
    placeholder = new_offline_id()
    sender.spool.append(
        placeholder,
        {
            "op": "create",
            "experiment_id": experiment_id,
            "experiment_name": experiment_name,
            "artifact_location": artifact_location,
            "run_name": run_name,
            "tags": tags,
            "start_time": start,
        },
    )
    return placeholder


def _create_from_record(client: MlflowClient, record: dict[str, Any]) -> str:
    """Replay of a spooled 'create': the experiment may have to be created too."""
    experiment_id = record.get("experiment_id")
    if experiment_id is None:
        experiment_id = _ensure_experiment(client, record["experiment_name"], record.get("artifact_location"))
    run = client.create_run(
        experiment_id,
        start_time=record.get("start_time"),
        tags=record.get("tags") or {},
        run_name=record.get("run_name"),
    )
    return run.info.run_id


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another process was faster


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
        create_offline_run=_create_from_record,
        mode=params.tracking.sender,
        nice=params.tracking.sender_nice,
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
        experiment_id = _ensure_experiment(client, params.experiment_name, artifact_location)
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
        run_id = _create_run(
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
        status = _status_for(error, seen[-1] if seen else None)
        if error is not None and status != "FINISHED":
            _log_traceback(run, error)
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        _finish(run, status)
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
