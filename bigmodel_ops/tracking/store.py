"""What both sides of the log sender share: outages, batches, and the replay of the spool.

An error is an *outage* when the store is unreachable or busy (refused connection, timeout, 5xx,
a locked sqlite file): data then goes to the spool (spool.py) and is replayed later. Data the
server refuses (a param logged twice with different values, a bad name) is no outage: the batch
is resent item by item and the refused items are named in one warning. :class:`StoreLink` is one
side's view of the store (the caller's in transport.py, the sender's in sender.py); each side
says how a warning reaches the user (the warnings module is neither thread- nor process-shared).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from bigmodel_ops.tracking.spool import Spool, is_offline_id

_logger = logging.getLogger(__name__)

# The server looked at the data and refused it: not an outage, and retrying cannot help.
_DATA_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
}


class TrackingOfflineWarning(UserWarning):
    """The tracking server could not be reached; data is spooled locally and replayed later."""


def is_outage(error: BaseException) -> bool:
    """True when an error means the store is unreachable or busy, not that the data is bad."""
    if isinstance(error, MlflowException):
        return error.error_code not in _DATA_ERRORS
    return isinstance(error, OSError | TimeoutError) or "OperationalError" in type(error).__name__


def chunk_batch(
    metrics: list[Metric], params: list[Param], tags: list[RunTag]
) -> list[tuple[list[Metric], list[Param], list[RunTag]]]:
    """Split into requests within the server's log_batch limits (metrics+params+tags <= 1000)."""
    chunks = []
    m, p, t = 0, 0, 0
    while m < len(metrics) or p < len(params) or t < len(tags):
        n_p = min(MAX_PARAMS_TAGS_PER_BATCH, len(params) - p)
        n_t = min(MAX_PARAMS_TAGS_PER_BATCH, len(tags) - t)
        n_m = min(MAX_METRICS_PER_BATCH - n_p - n_t, len(metrics) - m)
        chunks.append((metrics[m : m + n_m], params[p : p + n_p], tags[t : t + n_t]))
        m, p, t = m + n_m, p + n_p, t + n_t
    return chunks


@dataclasses.dataclass(slots=True)
class Pending:
    """Records of one run waiting to be sent."""

    metrics: list[Metric] = dataclasses.field(default_factory=list)
    params: list[Param] = dataclasses.field(default_factory=list)
    tags: list[RunTag] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def add(self, item: tuple[Any, ...]) -> None:
        if item[0] == "m":
            self.metrics.extend(Metric(key, value, item[4], item[3]) for key, value in item[2].items())
        elif item[0] == "p":
            self.params.extend(Param(k, v) for k, v in item[2])
        elif item[0] == "t":
            self.tags.extend(RunTag(k, v) for k, v in item[2])

    def record(self) -> dict[str, Any]:
        """The spool record of this batch (json keeps NaN/Infinity as bare words: nothing is lost)."""
        return {
            "op": "batch",
            "metrics": [[m.key, float(m.value), m.timestamp, m.step] for m in self.metrics],
            "params": [[p.key, p.value] for p in self.params],
            "tags": [[t.key, t.value] for t in self.tags],
        }


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (or restored from deletion) when needed."""
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


class SharedStatus(ctypes.Structure):
    """The offline flag and the time of the last replay attempt, seen by caller and sender: in
    shared memory (``RawValue(SharedStatus)``) for a sender process, a plain instance for a thread.
    ``time.monotonic`` is system-wide on Linux, so both processes compare the same clock."""

    _fields_ = [("offline", ctypes.c_bool), ("last_retry", ctypes.c_double)]


class StoreLink:
    """One side's view of the store: the client, the spool (and its map of placeholder ids), the
    shared status; going offline, sending a batch, replaying the spool. ``warn`` is the side's."""

    def __init__(
        self, client: MlflowClient, spool: Spool, status: SharedStatus, retry_interval_s: float
    ) -> None:
        self.client, self.spool, self.status = client, spool, status
        self.retry_interval_s = retry_interval_s

    @property
    def offline(self) -> bool:
        """True while the tracking server is unreachable and data goes to the spool."""
        return self.status.offline

    def resolve(self, run_id: str) -> str:
        return self.spool.resolve(run_id)

    def reachable(self, run_id: str | None = None) -> bool:
        """Not offline, and ``run_id`` (when given) is no placeholder of a run not created yet."""
        return not self.status.offline and not is_offline_id(run_id and self.resolve(run_id))

    @contextlib.contextmanager
    def on_outage_go_offline(self) -> Iterator[None]:
        """An outage inside goes offline and is swallowed (the caller spools); other errors raise."""
        try:
            yield
        except Exception as error:
            if not is_outage(error):
                raise
            self.go_offline(error)

    def go_offline(self, error: BaseException) -> None:
        """The server was found unreachable: spool from now on; warn once per outage."""
        self.status.last_retry = time.monotonic()
        if not self.status.offline:
            self.status.offline = True
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
            self.warn(
                f"tracking server unreachable ({reason}); training continues and metrics are spooled "
                f"to {self.spool.directory}, to be replayed when it is back",
                TrackingOfflineWarning,
            )

    def warn(self, message: str, category: type[Warning]) -> None:
        raise NotImplementedError

    def log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        try:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        except Exception as error:
            if is_outage(error):
                raise
            refused = []  # send item by item; name the refused ones
            for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
                for entity in items:
                    try:
                        self.client.log_batch(run_id, **{kind: [entity]})
                    except Exception as item_error:
                        if is_outage(item_error):
                            raise
                        refused.append(f"{entity.key} ({str(item_error).splitlines()[0][:200]})")
            if refused:
                message = f"MLflow run {run_id} refused {len(refused)} item(s): " + "; ".join(refused[:5])
                self.warn(message, RuntimeWarning)

    def replay_all(self, *, force: bool) -> bool:
        """Replay every spooled run of this URI. Returns True when the spool is empty."""
        if not force and time.monotonic() - self.status.last_retry < self.retry_interval_s:
            return False
        self.status.last_retry = time.monotonic()
        runs, total = self.spool.pending(), None
        with self.on_outage_go_offline():
            total = sum(self.spool.replay(run_id, self._replay) for run_id in runs)
        if total is None:
            return False
        if runs and (self.status.offline or total):
            _logger.warning("tracking server reachable: replayed %d spooled record(s)", total)
        self.status.offline = False
        return not runs or not self.spool.pending()

    def _replay(self, run_id: str, record: dict[str, Any]) -> None:
        try:
            if record.get("op") != "create":
                if is_offline_id(real := self.resolve(run_id)):
                    raise RuntimeError(
                        f"run {run_id} was never created (its spooled 'create' record is missing)"
                    )
                self.apply(real, record)
            elif run_id not in self.spool.ids:
                self.spool.record_id(run_id, self.create(record))
        except Exception as error:
            if is_outage(error):
                raise
            # The server refused it as invalid: replaying again would fail the same way.
            self.warn(f"skipping spooled {record.get('op')} record of run {run_id}: {error}", RuntimeWarning)

    def create(self, record: dict[str, Any]) -> str:
        """Create the run a ``create`` record describes (its parent's placeholder resolved); its id."""
        tags = dict(record.get("tags") or {})
        if tags.get("mlflow.parentRunId"):
            tags["mlflow.parentRunId"] = self.resolve(tags["mlflow.parentRunId"])
        experiment_id = record.get("experiment_id") or ensure_experiment(
            self.client, record["experiment_name"], record.get("artifact_location")
        )
        start, name = record.get("start_time"), record.get("run_name")
        return self.client.create_run(experiment_id, start_time=start, tags=tags, run_name=name).info.run_id

    def apply(self, real_id: str, record: dict[str, Any]) -> None:
        """Send one spool record other than ``create`` to the existing run ``real_id``."""
        op, client = record.get("op"), self.client
        if op == "batch":
            metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", [])]
            tags = [RunTag(k, v) for k, v in record.get("tags", [])]
            for chunk in chunk_batch(metrics, params, tags):
                self.log_batch(real_id, *chunk)
        elif op == "artifact" and Path(record["file"]).exists():
            upload = client.log_artifacts if Path(record["file"]).is_dir() else client.log_artifact
            upload(real_id, record["file"], record.get("artifact_path"))
        elif op == "input":
            context = [InputTag("mlflow.data.context", record["context"])]
            client.log_inputs(real_id, [DatasetInput(Dataset(**record["dataset"]), context)])
        elif op == "update":
            client.update_run(real_id, status=record["status"])
        elif op == "terminate":
            client.set_terminated(real_id, status=record["status"], end_time=record.get("end_time"))
