"""The sending side of the log sender: drains the request queue into the store.

It runs on a thread, or in a process forked at the lowest CPU priority (:func:`start_process`).
Records become ``log_batch`` requests within a server's limits, sent every ``flush_interval_s``
or when 1000 metrics wait; outages and refused data are handled as store.py says. Requests:
``("m", run_id, {key: value}, step, timestamp_ms)``, ``("p", run_id, [(k, v)])``, ``("t", ...)``,
``("group", [those])``, ``("flush", token)``, ``("close", token)``; replies: ``("ack", token,
send_cpu_s)`` when a flush/close is done, ``("warn", message, category)``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
import warnings
from multiprocessing.connection import Connection
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from bigmodel_ops.tracking.spool import Spool, is_offline_id
from bigmodel_ops.tracking.store import Pending, SharedStatus, StoreLink, chunk_batch, is_outage

_logger = logging.getLogger(__name__)

_LIVENESS_POLL_S = 0.5  # how often a sender process checks that the training process lives


def file_request(pending: dict[str, Pending], item: tuple[Any, ...]) -> None:
    """File a request (or a ``("group", [requests])`` of them) under its run."""
    for member in item[1] if item[0] == "group" else (item,):
        pending.setdefault(member[1], Pending()).add(member)


class SenderLoop(StoreLink):
    """Drains a request queue into the store; runs on a sender thread or in a sender process."""

    def __init__(
        self,
        client: MlflowClient,
        spool: Spool,
        status: SharedStatus,
        replies: Any,
        *,
        flush_interval_s: float,
        retry_interval_s: float,
    ) -> None:
        super().__init__(client, spool, status, retry_interval_s)
        self.replies, self.flush_interval_s = replies, flush_interval_s
        self.send_cpu_s = 0.0  # CPU spent sending: what it can take from training

    def warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        self.replies.put(("warn", message, category))  # a class pickles by name

    def run(self, requests: Any, *, caller_alive: Connection | None = None) -> None:
        """Serve until a ``close`` request, or until ``caller_alive`` reports EOF (the training
        process died: what it had queued is still sent, then the loop ends)."""
        while True:
            try:
                return self._serve(requests, caller_alive)
            except Exception:  # the sender must outlive any surprise, or a flush would hang
                _logger.exception("bigmodel_ops log sender: unexpected error; continuing")

    def _serve(self, requests: Any, caller_alive: Connection | None) -> None:
        pending: dict[str, Pending] = {}
        poll_s = self.flush_interval_s if caller_alive is None else _LIVENESS_POLL_S
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            try:
                item = requests.get(timeout=min(poll_s, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                item = None
            if item is None and caller_alive is not None and caller_alive.poll():
                # Only EOF makes the liveness pipe readable: the caller is gone without a close.
                self._drain_into(pending, requests)
                return self._send(pending)
            if item is not None and item[0] in ("flush", "close"):
                controls = [item]
                try:
                    controls += self._drain_into(pending, requests)  # later flushes are met too
                    self._send(pending)
                    self.replay_all(force=True)
                finally:
                    for _, token in controls:
                        self.replies.put(("ack", token, self.send_cpu_s))
                if any(kind == "close" for kind, _ in controls):
                    return
                deadline = time.monotonic() + self.flush_interval_s
                continue
            if item is not None:
                file_request(pending, item)
            waiting = sum(len(p.metrics) for p in pending.values())
            if time.monotonic() >= deadline or waiting >= MAX_METRICS_PER_BATCH:
                self._send(pending)
                if self.status.offline:
                    self.replay_all(force=False)
                deadline = time.monotonic() + self.flush_interval_s

    def _drain_into(self, pending: dict[str, Pending], requests: Any) -> list[tuple[str, int]]:
        """Move everything queued into ``pending``; returns the flush/close requests met."""
        controls = []
        while True:
            try:
                item = requests.get_nowait()
            except queue.Empty:
                return controls
            if item[0] in ("flush", "close"):
                controls.append(item)
            else:
                file_request(pending, item)

    def _send(self, pending: dict[str, Pending]) -> None:
        start = time.thread_time()
        for run_id, batch in pending.items():
            if batch:
                self._send_one(run_id, batch)
        pending.clear()
        self.send_cpu_s += time.thread_time() - start

    def _send_one(self, run_id: str, batch: Pending) -> None:
        real = self.resolve(run_id)
        if self.status.offline or is_offline_id(real):
            return self.spool.append(run_id, batch.record())
        chunks = chunk_batch(batch.metrics, batch.params, batch.tags)
        for index, chunk in enumerate(chunks):
            try:
                self.log_batch(real, *chunk)
            except Exception as error:  # keep this chunk and the rest on disk
                if is_outage(error):
                    self.go_offline(error)
                else:
                    _logger.exception("unexpected error sending to MLflow; spooling the batch")
                metrics, params, tags = (sum(lists, []) for lists in zip(*chunks[index:], strict=True))
                return self.spool.append(run_id, Pending(metrics, params, tags).record())


def can_fork() -> bool:
    fork = "fork" in multiprocessing.get_all_start_methods()
    return sys.platform == "linux" and fork and not multiprocessing.current_process().daemon


def start_process(
    spool: Spool, *, groups: int, nice: int, sched_idle: bool, **intervals: float
) -> tuple[Any, ...]:
    """Fork a sender process: (status, requests, replies, process, alive). The caller holds
    ``alive``, the writing end of a pipe, open while it lives: its death means EOF there.

    Forked, not spawned: a fresh interpreter spends seconds importing MLflow.
    """
    context = multiprocessing.get_context("fork")
    status = context.RawValue(SharedStatus)
    requests, replies = context.Queue(maxsize=groups), context.Queue()
    alive_reader, alive_writer = context.Pipe(duplex=False)
    config = {"uri": spool.uri, "spool_dir": str(spool.directory), "nice": nice, "sched_idle": sched_idle}
    args = ({**config, **intervals}, status, requests, replies, alive_reader, alive_writer)
    process = context.Process(target=_process_main, args=args, name="bigmodel_ops-log-sender", daemon=True)
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork of a multi-threaded process. The child only runs the
        # sender loop: it never touches torch or a lock another thread could hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        process.start()
    alive_reader.close()
    return status, requests, replies, process, alive_writer


def _process_main(
    config: dict[str, Any], status: SharedStatus, requests: Any, replies: Any, *pipe: Connection
) -> None:
    caller_alive, caller_end = pipe
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
    # MLflow caches one SQLAlchemy engine per database URI and has no at-fork hook; a connection
    # used from two processes corrupts both sides. SQLAlchemy's recipe for a child: forget the
    # pool, leave the parent's sockets alone. (MLflow's HTTP sessions are cached per process id.)
    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        for engine in list(getattr(SqlAlchemyStore, "_engine_map", {}).values()):
            engine.dispose(close=False)
    uri = config.pop("uri")
    spool = Spool(config.pop("spool_dir"), uri=uri)
    SenderLoop(MlflowClient(uri), spool, status, replies, **config).run(requests, caller_alive=caller_alive)
