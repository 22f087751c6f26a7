"""The handle on one MLflow run: what a stage (or a tuning trial) logs through.

:class:`StageRun` queues metrics, params and tags on its transport and logs artifacts at once
(spooled during an outage), all scrubbed of secrets first (scrub.py); ``child_run`` nests a run
such as ``tune/trial-7``. Non-zero ranks get the same class over a transport that sends nothing.
How a run ends is decided here for stage and child runs alike (:func:`status_for`;
:func:`signal_guard` turns SIGTERM into an exception while a stage runs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
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

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from bigmodel_ops.config import flatten
from bigmodel_ops.tracking.scrub import Scrubber
from bigmodel_ops.tracking.store import TrackingOfflineWarning
from bigmodel_ops.tracking.transport import LogSender, NullTransport, SenderStats

_logger = logging.getLogger(__name__)

STAGE_TAG = "bigmodel_ops.stage"


class TerminatedBySignal(SystemExit):
    """Raised in the main thread when the stage receives SIGTERM (exit status 128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def status_for(
    error: BaseException | None, finished_on: tuple[type[BaseException], ...] = (), *, signalled: bool = False
) -> str:
    """FINISHED, FAILED or KILLED for a run that ended with ``error`` (None: normally)."""
    if error is None or isinstance(error, finished_on):
        return "FINISHED"
    if signalled or isinstance(error, KeyboardInterrupt | TerminatedBySignal):
        return "KILLED"
    if isinstance(error, SystemExit) and error.code in (0, None):
        return "FINISHED"
    return "FAILED"


@contextlib.contextmanager
def signal_guard(seen: list[int]) -> Iterator[None]:
    """SIGTERM -> TerminatedBySignal, SIGINT -> KeyboardInterrupt; both remembered in ``seen``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        handler = previous[signum]
        if signum == signal.SIGTERM:
            raise TerminatedBySignal(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class StageRun:
    """Handle on the MLflow run of one stage (or of a child run such as a tuning trial). Every
    logging call returns at once; ``flush()`` waits until the data reached the store (or the spool)."""

    def __init__(
        self,
        transport: LogSender | NullTransport,
        *,
        run_id: str,
        run_name: str,
        stage: str,
        experiment: str,
        artifact_location: str | None = None,
        inherited_tags: Mapping[str, str] | None = None,
        scrubber: Scrubber | None = None,
    ) -> None:
        self._transport, self._scrubber, self._run_id = transport, scrubber or Scrubber(), run_id
        self.run_name, self.stage, self._experiment = run_name, stage, (experiment, artifact_location)
        self._inherited_tags = dict(inherited_tags or {})

    @property
    def run_id(self) -> str:
        """The MLflow run id (a placeholder ``offline-...`` until an offline run is created)."""
        return self._transport.resolve(self._run_id)

    @property
    def client(self) -> MlflowClient:
        return self._transport.client

    @property
    def offline(self) -> bool:
        """True while the tracking server is unreachable and data goes to the spool."""
        return self._transport.offline

    def sender_stats(self) -> SenderStats:
        return self._transport.stats()

    # ---- queued ----------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` with secrets masked (for what is logged around this handle, e.g. a model card)."""
        return self._scrubber.text(text)

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Log params flattened to dotted keys. Values longer than MLflow's limit (6000 chars)
        become artifacts ``params/<key>.txt`` and the param says so."""
        items: list[tuple[str, str]] = []
        for key, value in flatten(dict(values)).items():
            text = self._scrubber.value(key, json.dumps(value) if isinstance(value, list) else str(value))
            if len(text) > MAX_PARAM_VAL_LENGTH:
                self.log_text(text, f"params/{key}.txt")
                text = f"<{len(text)} chars: see artifact params/{key}.txt>"
            items.append((key, text))
        if items:
            self._transport.enqueue(("p", self._run_id, items))

    def log_metrics(self, values: Mapping[str, Any], *, step: int, epoch: int | None = None) -> None:
        """Queue metrics at the global optimizer step (the x-axis everywhere); ``epoch`` is
        logged as its own metric. Values may be numbers or 0-d tensors."""
        floats = {key: value if type(value) is float else float(value) for key, value in values.items()}
        if epoch is not None:
            floats["epoch"] = float(epoch)
        self._transport.enqueue(("m", self._run_id, floats, int(step), int(time.time() * 1000)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in self._scrubber.mapping(tags).items()]
        if items:
            self._transport.enqueue(("t", self._run_id, items))

    def flush(self) -> None:
        """Block until everything logged so far has reached the store (or the spool)."""
        self._transport.flush()

    # ---- at once (spooled during an outage) --------------------------------------------------

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents; files holding a secret go as masked copies."""
        if not self._transport.active:
            return
        with tempfile.TemporaryDirectory(prefix="bigmodel_ops-scrubbed-") as tmp:
            self._transport.log_artifact(self._run_id, self._scrubber.path(Path(path), tmp), artifact_path)

    log_artifacts = log_artifact

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_text(self._scrubber.text(text), encoding="utf-8")
            folder = str(Path(artifact_file).parent)
            self._transport.log_artifact(self._run_id, target, None if folder == "." else folder)

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
        """Record a dataset the run used (the UI's "Datasets"): metadata only, nothing is loaded.
        ``digest`` is cut to the store's 36 characters; ``schema`` is MLflow's JSON form of a
        schema (``{"mlflow_colspec": [...]}``); ``profile`` any JSON-able summary."""
        dataset: dict[str, str | None] = {"name": name, "digest": digest[:36]}
        dataset["source_type"] = "local" if "://" not in source else source.split("://", 1)[0]
        dataset["source"] = json.dumps({"uri": self._scrubber.text(source)})
        dataset["schema"] = json.dumps(dict(schema)) if schema else None
        dataset["profile"] = json.dumps(dict(profile)) if profile else None
        self._transport.call(self._run_id, {"op": "input", "context": context, "dataset": dataset})

    def log_model_dir(
        self,
        local_dir: Path | str,
        *,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        alias: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Any:
        """Log a model folder (safetensors + config) and optionally register it; returns the
        ModelVersion when registered, else None. Registration needs the server: during an outage
        the folder is spooled and registration is skipped with a warning."""
        from bigmodel_ops.tracking.registry import register_run_model

        self.log_artifacts(local_dir, artifact_path)
        if registered_model_name is None or not self._transport.active:
            return None
        name = registered_model_name
        if not self._transport.reachable(self._run_id):
            spooled = f"the model folder is spooled with run {self._run_id}"
            message = f"tracking server unreachable: {name} not registered ({spooled})"
            warnings.warn(message, TrackingOfflineWarning, stacklevel=2)
            return None
        self.flush()  # the registry checks that the artifacts are there
        tags = self._scrubber.mapping(tags or {})
        version = register_run_model(
            self.client, run_id=self.run_id, artifact_path=artifact_path, name=name, tags=tags
        )
        if alias is not None:
            self.client.set_registered_model_alias(name, alias, version.version)
        return version

    # ---- nested runs and the end of a run ----------------------------------------------------

    @contextlib.contextmanager
    def child_run(
        self,
        name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        finished_on: tuple[type[BaseException], ...] = (),
    ) -> Iterator[StageRun]:
        """A nested run named ``<this run's name>/<name>`` (e.g. ``tune/trial-7``). Ends FINISHED,
        or FAILED/KILLED on an exception (re-raised). An exception listed in ``finished_on`` (e.g.
        ``optuna.TrialPruned``) ends it FINISHED with the tag ``bigmodel_ops.outcome = <exception name>``."""
        run_name = f"{self.run_name}/{name}"
        child_tags = {**self._inherited_tags, STAGE_TAG: self.stage, "mlflow.runName": run_name}
        child_tags.update({str(k): str(v) for k, v in self._scrubber.mapping(tags or {}).items()})
        child_tags["mlflow.parentRunId"] = self.run_id
        child_id = self._transport.create_run(*self._experiment, child_tags)
        child = copy.copy(self)  # same transport, experiment, stage and inherited tags
        child._run_id, child.run_name = child_id, run_name
        try:
            yield child
        except BaseException as error:
            child._end(status_for(error, finished_on), error)
            raise
        child._end("FINISHED")

    def _end(self, status: str, error: BaseException | None = None) -> None:
        """Record why the run ended (the traceback, or the exception that counts as a normal
        finish), send what is queued, and end the run with ``status``."""
        try:
            if error is not None and status == "FINISHED":
                self.set_tags({"bigmodel_ops.outcome": type(error).__name__})
            elif error is not None:
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                self.log_text(text, "error/traceback.txt")
                self.set_tags({"bigmodel_ops.error": f"{type(error).__name__}: {error}"[:1000]})
        except Exception:  # the original error matters more than its report
            _logger.exception("could not log the traceback of run %s", self._run_id)
        self._transport.flush()
        ended = int(time.time() * 1000)
        self._transport.call(self._run_id, {"op": "terminate", "status": status, "end_time": ended})
