"""Logging that never blocks training: a bounded queue drained by one background sender thread.

``enqueue_*`` costs a ``queue.put_nowait`` in the caller. The sender groups what arrived into
``log_batch`` requests within the tracking server's limits (1000 metrics, 100 params, 100 tags,
1000 entities per request) and sends them every ``flush_interval_s`` or as soon as 1000 metrics
are waiting.

Outages: an error that is not the server refusing the data (connection refused, timeout, 5xx,
a locked sqlite file) switches the sender to *offline*: the failed batch and everything after it
go to the on-disk :class:`~bigmodel_ops.tracking.spool.Spool`, one warning says so, and every
``retry_interval_s`` the sender tries to replay the spool. When that works it is online again and
says so. ``flush()`` also tries a replay, so a stage end sends what it can. Nothing is dropped:
when the queue is full the caller appends to the spool file itself instead of waiting.

Data errors (a param logged twice with different values, a bad metric name) are not outages:
the batch is retried item by item, and the rejected items are reported in a warning and skipped.

Runs created while the server was down have a placeholder id (see spool.py); the sender spools
everything for them until a replay creates the run, and then translates the id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from bigmodel_ops.tracking import spool as spool_mod
from bigmodel_ops.tracking.spool import Spool, is_offline_id

_logger = logging.getLogger(__name__)

# Error codes that mean "the server looked at the data and refused it": retrying cannot help.
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
    return (
        isinstance(error, OSError | TimeoutError | ConnectionError)
        or "OperationalError" in type(error).__name__
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


class _Pending:
    __slots__ = ("metrics", "params", "tags")

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.params: list[Param] = []
        self.tags: list[RunTag] = []

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


class LogSender:
    """Background sender for one tracking URI, shared by a stage run and its child runs."""

    def __init__(
        self,
        client: MlflowClient,
        spool: Spool,
        *,
        max_queue: int = 50_000,
        flush_interval_s: float = 2.0,
        retry_interval_s: float = 5.0,
        create_offline_run: Callable[[MlflowClient, dict[str, Any]], str] | None = None,
    ) -> None:
        self.client = client
        self.spool = spool
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self._create_offline_run = create_offline_run
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=max_queue)
        self._offline = False
        self._last_retry = 0.0
        self._warned_full = False
        self._idmap: dict[str, str] = spool_mod.load_idmap(spool.directory)
        self.spilled = 0  # records the caller wrote to the spool because the queue was full
        self.send_cpu_s = 0.0  # CPU time the sender thread spent sending (what it can steal from training)
        self.sent_metrics = 0
        # Warnings raised on the sender thread are re-emitted on the caller's thread: the
        # warnings module's filters are process-global and not thread-safe.
        self._deferred: list[tuple[str, type[Warning]]] = []
        self._thread = threading.Thread(target=self._loop, name="bigmodel_ops-log-sender", daemon=True)
        self._closed = False
        self._thread.start()

    # ---- caller side (training thread) -------------------------------------------------

    @property
    def offline(self) -> bool:
        return self._offline

    def resolve(self, run_id: str) -> str:
        """The real run id of a placeholder once the run exists on the server (possibly created
        by a later process's replay: unknown placeholders are looked up in idmap.json again)."""
        real = self._idmap.get(run_id)
        if real is not None:
            return real
        if is_offline_id(run_id):
            self._idmap.update(spool_mod.load_idmap(self.spool.directory))
            return self._idmap.get(run_id, run_id)
        return run_id

    def enqueue_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        self._put(("m", run_id, values, step, timestamp_ms))

    def enqueue_params(self, run_id: str, items: list[tuple[str, str]]) -> None:
        self._put(("p", run_id, items))

    def enqueue_tags(self, run_id: str, items: list[tuple[str, str]]) -> None:
        self._put(("t", run_id, items))

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._deferred:
            self._emit_deferred()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # Never block training and never drop: the spool file takes the overflow.
            if not self._warned_full:
                self._warned_full = True
                _logger.warning("metric queue full; spilling to %s", self.spool.directory)
            pending = _Pending()
            self._add(pending, item)
            self.spool.append(item[1], _record(pending))
            self.spilled += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far was sent or spooled; then try the spool.

        Returns True when nothing is left in the spool for this URI.
        """
        if self._closed:
            return self._replay_all(force=True)
        done = threading.Event()
        self._queue.put(("flush", done))  # blocking put: a flush must not be lost
        done.wait(timeout)
        self._emit_deferred()
        return not self.spool.pending()

    def _emit_deferred(self) -> None:
        while self._deferred:
            message, category = self._deferred.pop(0)
            warnings.warn(message, category, stacklevel=3)

    def _warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        if threading.current_thread() is self._thread:
            self._deferred.append((message, category))
        else:
            warnings.warn(message, category, stacklevel=3)

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the thread. Returns True when the spool is empty."""
        if self._closed:
            return not self.spool.pending()
        done = threading.Event()
        self._queue.put(("close", done))
        done.wait(timeout)
        self._closed = True
        self._thread.join(timeout=5)
        self._emit_deferred()
        return not self.spool.pending()

    def call(self, run_id: str, fn: Callable[[str], Any], record: dict[str, Any] | None) -> Any:
        """Run a synchronous store call now; on an outage spool ``record`` (when given) instead."""
        real = self.resolve(run_id)
        if not is_offline_id(real) and not self._offline:
            try:
                return fn(real)
            except Exception as error:
                if not is_outage(error) or record is None:
                    raise
                self._go_offline(error)
        if record is not None:
            self.spool.append(run_id, record)
        return None

    # ---- sender thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._run_loop()
                return
            except Exception:  # the sender must outlive any surprise, or flush() would hang
                _logger.exception("bigmodel_ops log sender: unexpected error; continuing")

    def _run_loop(self) -> None:
        pending: dict[str, _Pending] = {}
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None and item[0] in ("flush", "close"):
                try:
                    self._drain_into(pending)
                    self._send(pending)
                    self._replay_all(force=True)
                finally:
                    item[1].set()
                if item[0] == "close":
                    return
                deadline = time.monotonic() + self.flush_interval_s
                continue
            if item is not None:
                self._add(pending.setdefault(item[1], _Pending()), item)
            waiting = sum(len(p.metrics) for p in pending.values())
            if waiting >= MAX_METRICS_PER_BATCH or time.monotonic() >= deadline:
                self._send(pending)
                if self._offline:
                    self._replay_all(force=False)
                deadline = time.monotonic() + self.flush_interval_s

    def _drain_into(self, pending: dict[str, _Pending]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item[0] in ("flush", "close"):
                # A concurrent flush request: it is satisfied by this flush too.
                item[1].set()
                if item[0] == "close":
                    self._closed = True
                continue
            self._add(pending.setdefault(item[1], _Pending()), item)

    @staticmethod
    def _add(pending: _Pending, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "m":
            _, _, values, step, ts = item
            for key, value in values.items():
                pending.metrics.append(Metric(key, value, ts, step))
        elif kind == "p":
            pending.params.extend(Param(k, v) for k, v in item[2])
        elif kind == "t":
            pending.tags.extend(RunTag(k, v) for k, v in item[2])

    def _send(self, pending: dict[str, _Pending]) -> None:
        start = time.thread_time()
        for run_id, batch in list(pending.items()):
            if len(batch):
                self._send_one(run_id, batch)
                self.sent_metrics += len(batch.metrics)
        pending.clear()
        self.send_cpu_s += time.thread_time() - start

    def _send_one(self, run_id: str, batch: _Pending) -> None:
        real = self.resolve(run_id)
        if self._offline or is_offline_id(real):
            self.spool.append(run_id, _record(batch))
            return
        chunks = chunk_batch(batch.metrics, batch.params, batch.tags)
        for index, (metrics, params, tags) in enumerate(chunks):
            try:
                self._log_batch(real, metrics, params, tags)
            except Exception as error:  # keep this chunk and the rest on disk
                if is_outage(error):
                    self._go_offline(error)
                else:
                    _logger.exception("unexpected error sending to MLflow; spooling the batch")
                rest = _Pending()
                for m, p, t in chunks[index:]:
                    rest.metrics.extend(m)
                    rest.params.extend(p)
                    rest.tags.extend(t)
                self.spool.append(run_id, _record(rest))
                return

    def _log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        try:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        except Exception as error:
            if is_outage(error):
                raise
            self._log_items(run_id, metrics, params, tags, error)

    def _log_items(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag], first: Exception
    ) -> None:
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
            self._warn(message, RuntimeWarning)

    def _go_offline(self, error: BaseException) -> None:
        self._last_retry = time.monotonic()
        if self._offline:
            return
        self._offline = True
        message = (
            f"tracking server unreachable ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            f"training continues and metrics are spooled to {self.spool.directory}, "
            "to be replayed when it is back"
        )
        self._warn(message, TrackingOfflineWarning)

    def _replay_all(self, *, force: bool) -> bool:
        """Replay every spooled run of this URI. Returns True when the spool is empty."""
        if not force and time.monotonic() - self._last_retry < self.retry_interval_s:
            return False
        self._last_retry = time.monotonic()
        runs = self.spool.pending()
        if not runs:
            self._offline = False
            return True
        total = 0
        try:
            for run_id in runs:
                total += self.spool.replay(run_id, self._replay_record)
        except Exception as error:
            if not is_outage(error):
                raise
            self._go_offline(error)
            return False
        if self._offline or total:
            _logger.warning("tracking server reachable: replayed %d spooled record(s)", total)
        self._offline = False
        return not self.spool.pending()

    def _replay_record(self, run_id: str, record: dict[str, Any]) -> None:
        try:
            self._replay_record_unchecked(run_id, record)
        except Exception as error:
            if is_outage(error):
                raise
            # The server refused it as invalid: replaying again would fail the same way.
            self._warn(f"skipping spooled {record.get('op')} record of run {run_id}: {error}", RuntimeWarning)

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
            self._idmap[run_id] = real
            spool_mod.save_idmap(self.spool.directory, run_id, real)
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


def _record(batch: _Pending) -> dict[str, Any]:
    return {
        "op": "batch",
        # json writes NaN/Infinity as bare words and reads them back: no value is lost.
        "metrics": [[m.key, float(m.value), m.timestamp, m.step] for m in batch.metrics],
        "params": [[p.key, p.value] for p in batch.params],
        "tags": [[t.key, t.value] for t in batch.tags],
    }
