"""The handle on one MLflow run: what a stage (or an Optuna trial) logs through.

:class:`StageRun` queues metrics, params and tags on the shared :class:`LogSender` and logs
artifacts synchronously (spooled during an outage); ``child_run`` nests a run such as
``tune/trial-7``. :class:`NoOpStageRun` is what non-zero ranks get. The helpers below create
and end runs the same way for stage runs (runs.py) and nested runs: a placeholder id while the
server is down, FINISHED / FAILED / KILLED with the traceback logged on the way out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from bigmodel_ops.config import Params, flatten
from bigmodel_ops.tracking.logger import LogSender, TrackingOfflineWarning, is_outage
from bigmodel_ops.tracking.spool import is_offline_id, new_offline_id

_logger = logging.getLogger(__name__)

RUN_ID_ENV = "BIGMODEL_OPS_RUN_ID"
STAGE_TAG = "bigmodel_ops.stage"


class TerminatedBySignal(SystemExit):
    """Raised in the main thread when the stage receives SIGTERM (exit status 128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


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
        with self._staged(artifact_file) as target:
            target.write_text(text, encoding="utf-8")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (png/svg/pdf by the file's suffix) as an artifact."""
        with self._staged(artifact_file) as target:
            figure.savefig(target, bbox_inches="tight")

    @contextlib.contextmanager
    def _staged(self, artifact_file: str) -> Iterator[Path]:
        """A temp path named like `artifact_file`; what is written there is logged at its folder."""
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            yield target
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
        from bigmodel_ops.tracking.registry import register_run_model

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
            finished_on = default_finished_on()
        run_name = f"{self.run_name}/{name}"
        child_tags = {**self._inherited_tags, STAGE_TAG: self.stage, "mlflow.runName": run_name}
        child_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        child_tags["mlflow.parentRunId"] = self._run_id
        experiment_id = self._experiment_id()
        child_id = create_run(
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
            finish_run(child, "FINISHED")
            raise
        except BaseException as error:
            log_traceback(child, error)
            finish_run(child, status_for(error, None))
            raise
        finish_run(child, "FINISHED")

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


def default_finished_on() -> tuple[type[BaseException], ...]:
    import sys

    optuna = sys.modules.get("optuna")
    pruned = getattr(optuna, "TrialPruned", None) if optuna is not None else None
    return (pruned,) if pruned is not None else ()


def status_for(error: BaseException | None, signal_seen: int | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | TerminatedBySignal) or signal_seen is not None:
        return "KILLED"
    if isinstance(error, SystemExit) and error.code in (0, None):
        return "FINISHED"
    return "FAILED"


def log_traceback(run: StageRun, error: BaseException) -> None:
    try:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        run.log_text(text, "error/traceback.txt")
        run.set_tags({"bigmodel_ops.error": f"{type(error).__name__}: {error}"[:1000]})
    except Exception:  # the original error matters more than its report
        _logger.exception("could not log the traceback of run %s", run.run_id)


def finish_run(run: StageRun, status: str) -> None:
    sender = run._sender
    sender.flush()
    end = int(time.time() * 1000)
    record = {"op": "terminate", "status": status, "end_time": end}
    sender.call(run._run_id, lambda rid: run.client.set_terminated(rid, status=status, end_time=end), record)


def create_run(
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


def create_from_record(client: MlflowClient, record: dict[str, Any]) -> str:
    """Replay of a spooled 'create': the experiment may have to be created too."""
    experiment_id = record.get("experiment_id")
    if experiment_id is None:
        experiment_id = ensure_experiment(client, record["experiment_name"], record.get("artifact_location"))
    run = client.create_run(
        experiment_id,
        start_time=record.get("start_time"),
        tags=record.get("tags") or {},
        run_name=record.get("run_name"),
    )
    return run.info.run_id


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
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
