"""The sending side of the log sender: drains the request queue into the store (thread or process).

Records are grouped into ``log_batch`` requests within the tracking server's limits (1000
metrics, 100 params, 100 tags, 1000 entities per request), sent every ``flush_interval_s`` or
as soon as 1000 metrics are waiting.

Outages: an error that is not the server refusing the data (connection refused, timeout, 5xx,
a locked sqlite file) switches to *offline*: the failed batch and everything after it go to the
spool (spool.py), one warning says so, and every ``retry_interval_s`` the spool is replayed; a
flush also replays, so a stage end sends what it can. Data errors (a param logged twice with
different values, a bad metric name) are not outages: the batch is retried item by item and the
rejected items are reported in one warning. Runs created while the server was down have a
placeholder id; everything for them is spooled until a replay creates the run.

Requests: ``("m", run_id, {key: value}, step, timestamp_ms)``, ``("p", run_id, [(k, v)])``,
``("t", run_id, [(k, v)])``, ``("group", [those])``, ``("flush", token)``, ``("close", token)``.
Replies: ``("ack", token, counters)`` once a flush/close is done, ``("warn", message, category)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from bigmodel_ops.tracking.spool import SharedStatus, Spool, StoreLink, TrackingOfflineWarning, is_offline_id, is_outage

_logger = logging.getLogger(__name__)

_LIVENESS_POLL_S = 0.5  # how often a sender process checks that the training process lives
WARNING_CATEGORIES: dict[str, type[Warning]] = {
    "TrackingOfflineWarning": TrackingOfflineWarning,
    "RuntimeWarning": RuntimeWarning,
}


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
        if item[0] == "m":
            _, _, values, step, ts = item
            self.metrics.extend(Metric(key, value, ts, step) for key, value in values.items())
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


def file_request(pending: dict[str, Pending], item: tuple[Any, ...]) -> None:
    """File a request (or a ``("group", [requests])`` of them) under its run."""
    for member in item[1] if item[0] == "group" else (item,):
        pending.setdefault(member[1], Pending()).add(member)


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


def dataset_input(record: dict[str, Any]) -> Any:
    """The DatasetInput of a spooled ``input`` record (what ``StageRun.log_input`` logs)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    tags = [InputTag("mlflow.data.context", record["context"])]
    return DatasetInput(Dataset(**record["dataset"]), tags=tags)


class SenderLoop(StoreLink):
    """Drains a request queue into the store; runs on a sender thread or in a sender process."""

    def __init__(
        self, client: MlflowClient, spool: Spool, status: SharedStatus, replies: Any, *, flush_interval_s: float, retry_interval_s: float
    ) -> None:
        super().__init__(spool, status)
        self.client = client
        self.replies = replies
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.send_cpu_s = 0.0  # CPU time spent sending: what the sender can take from training
        self.sent_metrics = 0

    def warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        self.replies.put(("warn", message, category.__name__))

    def run(self, requests: Any, *, caller_alive: Connection | None = None) -> None:
        """Serve until a ``close`` request, or until ``caller_alive`` reports EOF (the training
        process died: what it had queued is still sent, then the loop ends)."""
        while True:
            try:
                self._serve(requests, caller_alive)
                return
            except Exception:  # the sender must outlive any surprise, or a flush would hang
                _logger.exception("bigmodel_ops log sender: unexpected error; continuing")

    def _serve(self, requests: Any, caller_alive: Connection | None) -> None:
        pending: dict[str, Pending] = {}
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                item = requests.get(timeout=timeout if caller_alive is None else min(timeout, _LIVENESS_POLL_S))
            except queue.Empty:
                item = None
            if item is None and caller_alive is not None and caller_alive.poll():
                # Only EOF makes the liveness pipe readable: the caller is gone without a close.
                self._drain_into(pending, requests)
                self._send(pending)
                return
            if item is not None and item[0] in ("flush", "close"):
                controls = [item]
                try:
                    controls += self._drain_into(pending, requests)  # later flushes are met too
                    self._send(pending)
                    self.replay_all(force=True)
                finally:
                    for _, token in controls:
                        self.replies.put(("ack", token, {"send_cpu_s": self.send_cpu_s, "sent_metrics": self.sent_metrics}))
                if any(kind == "close" for kind, _ in controls):
                    return
                deadline = time.monotonic() + self.flush_interval_s
                continue
            if item is not None:
                file_request(pending, item)
            if sum(len(p.metrics) for p in pending.values()) >= MAX_METRICS_PER_BATCH or time.monotonic() >= deadline:
                self._send(pending)
                if self.status.offline:
                    self.replay_all(force=False)
                deadline = time.monotonic() + self.flush_interval_s

    def _drain_into(self, pending: dict[str, Pending], requests: Any) -> list[tuple[str, int]]:
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
                file_request(pending, item)

    def _send(self, pending: dict[str, Pending]) -> None:
        start = time.thread_time()
        for run_id, batch in pending.items():
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
        for index, chunk in enumerate(chunks):
            try:
                self._log_batch(real, *chunk)
            except Exception as error:  # keep this chunk and the rest on disk
                if is_outage(error):
                    self.go_offline(error)
                else:
                    _logger.exception("unexpected error sending to MLflow; spooling the batch")
                rest = Pending()
                for metrics, params, tags in chunks[index:]:
                    rest.metrics += metrics
                    rest.params += params
                    rest.tags += tags
                self.spool.append(run_id, rest.record())
                return

    def _log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        try:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        except Exception as error:
            if is_outage(error):
                raise
            rejected = []  # the server refused something: send item by item, report the refused
            for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
                for entity in items:
                    try:
                        self.client.log_batch(run_id, **{kind: [entity]})
                    except Exception as item_error:
                        if is_outage(item_error):
                            raise
                        rejected.append(f"{entity.key} ({str(item_error).splitlines()[0][:200]})")
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
            self._replay(run_id, record)
        except Exception as error:
            if is_outage(error):
                raise
            # The server refused it as invalid: replaying again would fail the same way.
            self.warn(f"skipping spooled {record.get('op')} record of run {run_id}: {error}", RuntimeWarning)

    def _replay(self, run_id: str, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "create":
            if run_id not in self._idmap:
                tags = dict(record.get("tags") or {})
                if tags.get("mlflow.parentRunId"):
                    tags["mlflow.parentRunId"] = self.resolve(tags["mlflow.parentRunId"])
                experiment_id = record.get("experiment_id") or ensure_experiment(
                    self.client, record["experiment_name"], record.get("artifact_location")
                )
                run = self.client.create_run(
                    experiment_id, start_time=record.get("start_time"), tags=tags, run_name=record.get("run_name")
                )
                self._idmap.record(run_id, run.info.run_id)
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
        elif op == "input":
            self.client.log_inputs(real, [dataset_input(record)])
        elif op == "terminate":
            self.client.set_terminated(real, status=record["status"], end_time=record.get("end_time"))
        elif op == "update":
            self.client.update_run(real, status=record["status"])


def process_main(config: dict[str, Any], slots: Any, requests: Any, replies: Any, caller_alive: Connection, caller_end: Connection) -> None:
    """Entry point of a sender process, forked from the training process."""
    caller_end.close()  # only the caller may hold the writing end: its death must mean EOF
    # Ctrl-C reaches the whole process group and a scheduler's SIGTERM may too: the sender must
    # outlive the caller's own shutdown, which flushes and then closes it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(config.pop("nice"))
    if config.pop("sched_idle") and hasattr(os, "SCHED_IDLE"):
        # Below every nice level: CFS gives an idle-class task weight 3 against 1024 for a nice-0
        # one, so on a core training keeps busy the sender gets ~0.3% of it (nice 19: weight 15,
        # ~1.4%), and a waking training thread preempts it at once.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _forget_inherited_connections()
    uri = config.pop("uri")
    spool = Spool(config.pop("spool_dir"), uri=uri)
    SenderLoop(MlflowClient(uri), spool, SharedStatus(slots), replies, **config).run(requests, caller_alive=caller_alive)


def _forget_inherited_connections() -> None:
    """Drop the pooled database connections a forked sender inherited from its parent.

    MLflow caches one SQLAlchemy engine per database URI and has no at-fork hook; a sqlite or
    server connection used from two processes corrupts both sides. ``dispose(close=False)`` is
    SQLAlchemy's documented recipe for a child: forget the pool, leave the parent's sockets
    alone. (MLflow's HTTP sessions are already cached per process id.)
    """
    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        for engine in list(getattr(SqlAlchemyStore, "_engine_map", {}).values()):
            engine.dispose(close=False)
