"""What the background sender does with queued records, wherever it runs (thread or process).

The sender groups what arrived into ``log_batch`` requests within the tracking server's limits
(1000 metrics, 100 params, 100 tags, 1000 entities per request) and sends them every
``flush_interval_s`` or as soon as 1000 metrics are waiting.

Outages: an error that is not the server refusing the data (connection refused, timeout, 5xx,
a locked sqlite file) switches to *offline*: the failed batch and everything after it go to the
on-disk :class:`~bigmodel_ops.tracking.spool.Spool`, one warning says so, and every
``retry_interval_s`` the sender tries to replay the spool. When that works it is online again
and says so. A flush also tries a replay, so a stage end sends what it can.

Data errors (a param logged twice with different values, a bad metric name) are not outages:
the batch is retried item by item, and the rejected items are reported in a warning and skipped.

Runs created while the server was down have a placeholder id (see spool.py); the sender spools
everything for them until a replay creates the run, and then translates the id.

Requests on the queue: ``("m", run_id, {key: value}, step, timestamp_ms)``,
``("p", run_id, [(key, value)])``, ``("t", run_id, [(key, value)])``, ``("group", [those])``,
``("flush", token)`` and ``("close", token)``. Replies: ``("ack", token, stats)`` once a flush/close is done, and
``("warn", message, category_name)`` for the caller to re-emit (the warnings module is neither
thread- nor process-shared).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from bigmodel_ops.tracking.spool import IdMap, Spool, is_offline_id

_logger = logging.getLogger(__name__)

# Error codes that mean "the server looked at the data and refused it": retrying cannot help.
_DATA_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
}

# How often a sender process checks that the training process is still alive.
_LIVENESS_POLL_S = 0.5


class TrackingOfflineWarning(UserWarning):
    """The tracking server could not be reached; data is spooled locally and replayed later."""


WARNING_CATEGORIES: dict[str, type[Warning]] = {
    "TrackingOfflineWarning": TrackingOfflineWarning,
    "RuntimeWarning": RuntimeWarning,
}


class Queue(Protocol):
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...
    def get_nowait(self) -> Any: ...
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None: ...


class SharedStatus:
    """The offline flag and the time of the last replay attempt, shared by caller and sender.

    Backed by a 2-slot array of doubles: a ``multiprocessing`` shared array for a sender process
    (both sides see each other's writes), a plain list for a sender thread. ``time.monotonic`` is
    system-wide on Linux, so both processes compare the same clock.
    """

    def __init__(self, slots: Any) -> None:
        self._slots = slots

    @property
    def offline(self) -> bool:
        return self._slots[0] != 0.0

    @offline.setter
    def offline(self, value: bool) -> None:
        self._slots[0] = 1.0 if value else 0.0

    @property
    def last_retry(self) -> float:
        return self._slots[1]

    @last_retry.setter
    def last_retry(self, value: float) -> None:
        self._slots[1] = value


def is_outage(error: BaseException) -> bool:
    """True when an error means the store is unreachable or busy, not that the data is bad."""
    if isinstance(error, MlflowException):
        return error.error_code not in _DATA_ERRORS
    return (
        isinstance(error, OSError | TimeoutError | ConnectionError)
        or "OperationalError" in type(error).__name__
    )


def offline_message(error: BaseException, spool_dir: Path) -> str:
    return (
        f"tracking server unreachable ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
        f"training continues and metrics are spooled to {spool_dir}, "
        "to be replayed when it is back"
    )


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


class Pending:
    """Records of one run waiting to be sent."""

    __slots__ = ("metrics", "params", "tags")

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.params: list[Param] = []
        self.tags: list[RunTag] = []

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def add(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "m":
            _, _, values, step, ts = item
            for key, value in values.items():
                self.metrics.append(Metric(key, value, ts, step))
        elif kind == "p":
            self.params.extend(Param(k, v) for k, v in item[2])
        elif kind == "t":
            self.tags.extend(RunTag(k, v) for k, v in item[2])

    def record(self) -> dict[str, Any]:
        """The spool record of this batch."""
        return {
            "op": "batch",
            # json writes NaN/Infinity as bare words and reads them back: no value is lost.
            "metrics": [[m.key, float(m.value), m.timestamp, m.step] for m in self.metrics],
            "params": [[p.key, p.value] for p in self.params],
            "tags": [[t.key, t.value] for t in self.tags],
        }


def _accept(pending: dict[str, Pending], item: tuple[Any, ...]) -> None:
    """File a request (or a ``("group", [requests])`` of them) under its run."""
    if item[0] == "group":
        for member in item[1]:
            pending.setdefault(member[1], Pending()).add(member)
    else:
        pending.setdefault(item[1], Pending()).add(item)


class SenderLoop:
    """Drains a request queue into the store; runs on a sender thread or in a sender process."""

    def __init__(
        self,
        *,
        client: MlflowClient,
        spool: Spool,
        status: SharedStatus,
        replies: Queue,
        flush_interval_s: float,
        retry_interval_s: float,
        create_offline_run: Callable[[MlflowClient, dict[str, Any]], str] | None = None,
    ) -> None:
        self.client = client
        self.spool = spool
        self.status = status
        self.replies = replies
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self._create_offline_run = create_offline_run
        self._idmap = IdMap(spool.directory)
        self.send_cpu_s = 0.0  # CPU time spent sending: what the sender can take from training
        self.sent_metrics = 0

    def run(self, requests: Queue, *, caller_alive: Connection | None = None) -> None:
        """Serve until a ``close`` request, or until ``caller_alive`` reports EOF (the training
        process died: what it had queued is still sent, then the loop ends)."""
        while True:
            try:
                self._serve(requests, caller_alive)
                return
            except Exception:  # the sender must outlive any surprise, or a flush would hang
                _logger.exception("bigmodel_ops log sender: unexpected error; continuing")

    def _serve(self, requests: Queue, caller_alive: Connection | None) -> None:
        pending: dict[str, Pending] = {}
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            if caller_alive is not None:
                timeout = min(timeout, _LIVENESS_POLL_S)
            try:
                item = requests.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is None and caller_alive is not None and caller_alive.poll():
                # Only EOF makes the liveness pipe readable: the caller is gone without a close.
                self._drain_into(pending, requests)
                self._send(pending)
                return
            if item is not None and item[0] in ("flush", "close"):
                tokens = [item[1]]
                closing = item[0] == "close"
                try:
                    for kind, token in self._drain_into(pending, requests):
                        tokens.append(token)  # a flush queued behind this one is satisfied by it too
                        closing = closing or kind == "close"
                    self._send(pending)
                    self.replay_all(force=True)
                finally:
                    for token in tokens:
                        self._ack(token)
                if closing:
                    return
                deadline = time.monotonic() + self.flush_interval_s
                continue
            if item is not None:
                _accept(pending, item)
            waiting = sum(len(p.metrics) for p in pending.values())
            if waiting >= MAX_METRICS_PER_BATCH or time.monotonic() >= deadline:
                self._send(pending)
                if self.status.offline:
                    self.replay_all(force=False)
                deadline = time.monotonic() + self.flush_interval_s

    def _ack(self, token: int) -> None:
        self.replies.put(("ack", token, {"send_cpu_s": self.send_cpu_s, "sent_metrics": self.sent_metrics}))

    def _drain_into(self, pending: dict[str, Pending], requests: Queue) -> list[tuple[str, int]]:
        """Move everything queued into ``pending``; returns the flush/close requests met."""
        controls: list[tuple[str, int]] = []
        while True:
            try:
                item = requests.get_nowait()
            except queue.Empty:
                return controls
            if item[0] in ("flush", "close"):
                controls.append((item[0], item[1]))
            else:
                _accept(pending, item)

    def warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        self.replies.put(("warn", message, category.__name__))

    def resolve(self, run_id: str) -> str:
        return self._idmap.resolve(run_id)

    def go_offline(self, error: BaseException) -> None:
        self.status.last_retry = time.monotonic()
        if self.status.offline:
            return
        self.status.offline = True
        self.warn(offline_message(error, self.spool.directory), TrackingOfflineWarning)

    def _send(self, pending: dict[str, Pending]) -> None:
        start = time.thread_time()
        for run_id, batch in list(pending.items()):
            if len(batch):
                self._send_one(run_id, batch)
                self.sent_metrics += len(batch.metrics)
        pending.clear()
        self.send_cpu_s += time.thread_time() - start

    def _send_one(self, run_id: str, batch: Pending) -> None:
        real = self.resolve(run_id)
        if self.status.offline or is_offline_id(real):
            self.spool.append(run_id, batch.record())
            return
        chunks = chunk_batch(batch.metrics, batch.params, batch.tags)
        for index, (metrics, params, tags) in enumerate(chunks):
            try:
                self._log_batch(real, metrics, params, tags)
            except Exception as error:  # keep this chunk and the rest on disk
                if is_outage(error):
                    self.go_offline(error)
                else:
                    _logger.exception("unexpected error sending to MLflow; spooling the batch")
                rest = Pending()
                for m, p, t in chunks[index:]:
                    rest.metrics.extend(m)
                    rest.params.extend(p)
                    rest.tags.extend(t)
                self.spool.append(run_id, rest.record())
                return

    def _log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        try:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        except Exception as error:
            if is_outage(error):
                raise
            self._log_items(run_id, metrics, params, tags)

    def _log_items(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        rejected: list[str] = []
        for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
            for entity in items:
                try:
                    self.client.log_batch(run_id, **{kind: [entity]})
                except Exception as error:
                    if is_outage(error):
                        raise
                    rejected.append(f"{entity.key} ({str(error).splitlines()[0][:200]})")
        if rejected:
            message = f"MLflow run {run_id} refused {len(rejected)} item(s): " + "; ".join(rejected[:5])
            self.warn(message, RuntimeWarning)

    def replay_all(self, *, force: bool) -> bool:
        """Replay every spooled run of this URI. Returns True when the spool is empty."""
        if not force and time.monotonic() - self.status.last_retry < self.retry_interval_s:
            return False
        self.status.last_retry = time.monotonic()
        runs = self.spool.pending()
        if not runs:
            self.status.offline = False
            return True
        total = 0
        try:
            for run_id in runs:
                total += self.spool.replay(run_id, self._replay_record)
        except Exception as error:
            if not is_outage(error):
                raise
            self.go_offline(error)
            return False
        if self.status.offline or total:
            _logger.warning("tracking server reachable: replayed %d spooled record(s)", total)
        self.status.offline = False
        return not self.spool.pending()

    def _replay_record(self, run_id: str, record: dict[str, Any]) -> None:
        try:
            self._replay_record_unchecked(run_id, record)
        except Exception as error:
            if is_outage(error):
                raise
            # The server refused it as invalid: replaying again would fail the same way.
            self.warn(f"skipping spooled {record.get('op')} record of run {run_id}: {error}", RuntimeWarning)

    def _replay_record_unchecked(self, run_id: str, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "create":
            if run_id in self._idmap:
                return
            if self._create_offline_run is None:
                raise RuntimeError("spooled offline run but no way to create it")
            create = dict(record)
            tags = dict(create.get("tags") or {})
            parent = tags.get("mlflow.parentRunId")
            if parent:
                tags["mlflow.parentRunId"] = self.resolve(parent)
            create["tags"] = tags
            real = self._create_offline_run(self.client, create)
            self._idmap.record(run_id, real)
            return
        real = self.resolve(run_id)
        if is_offline_id(real):
            raise RuntimeError(f"run {run_id} was never created (its spooled 'create' record is missing)")
        if op == "batch":
            metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", [])]
            tags = [RunTag(k, v) for k, v in record.get("tags", [])]
            for chunk in chunk_batch(metrics, params, tags):
                self._log_batch(real, *chunk)
        elif op == "artifact":
            local = Path(record["file"])
            if local.is_dir():
                self.client.log_artifacts(real, str(local), record.get("artifact_path"))
            elif local.exists():
                self.client.log_artifact(real, str(local), record.get("artifact_path"))
        elif op == "terminate":
            self.client.set_terminated(real, status=record["status"], end_time=record.get("end_time"))
        elif op == "update":
            self.client.update_run(real, status=record["status"])
