"""Logging that never blocks training: a bounded queue drained by a background sender.

``enqueue_*`` costs a list append in the caller: records are handed to the sender's queue in
groups (256 records, or every 0.25 s by a small hand-off thread). What the sender does with them
(batching, outages, the spool) is in :mod:`bigmodel_ops.tracking.sender`. This module decides
where the sender runs:

- ``mode="process"`` (what stages use on Linux): a forked child at the lowest CPU priority
  (nice 19, and Linux's SCHED_IDLE class unless told otherwise).
  MLflow's sqlalchemy store spends ~0.3 ms of Python per metric. On a thread that time holds the
  GIL the training loop needs, and it takes CPU that training would use; a niced process only
  runs on cycles training leaves idle. The child is forked, not spawned, because a fresh
  interpreter spends seconds importing MLflow at every stage start.
- ``mode="thread"``: a daemon thread, used where fork is unavailable or the process may not have
  children (a daemonic worker), or when asked for.

Nothing is dropped: when the queue is full the caller appends to the spool file itself instead
of waiting. When the training process dies without closing (SIGKILL), a sender process sees EOF
on a pipe only the caller holds, sends what was queued, and exits; only the group not yet handed
over (at most the last 0.25 s of records) is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.util  # imported before our atexit hook, so that hook runs first
import os
import queue
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking.sender import (
    WARNING_CATEGORIES,
    Pending,
    SenderLoop,
    SharedStatus,
    TrackingOfflineWarning,
    chunk_batch,
    is_outage,
    offline_message,
)
from bigmodel_ops.tracking.spool import IdMap, Spool, is_offline_id

__all__ = ["LogSender", "TrackingOfflineWarning", "chunk_batch", "is_outage"]

_logger = logging.getLogger(__name__)

SenderMode = Literal["process", "thread"]

# Senders not yet closed; closed at interpreter exit, before multiprocessing joins its children.
_open_senders: weakref.WeakSet[LogSender] = weakref.WeakSet()


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
        mode: SenderMode = "thread",
        nice: int = 19,
        sched_idle: bool = True,
        replay_leftovers: bool = False,
        handoff_items: int = 256,
        handoff_interval_s: float = 0.25,
    ) -> None:
        self.client = client
        self.spool = spool
        self.spilled = 0  # records the caller wrote to the spool because the queue was full
        self.send_cpu_s = 0.0  # CPU the sender spent sending, as of the last flush
        self.sent_metrics = 0
        self._loop_options = {
            "flush_interval_s": flush_interval_s,
            "retry_interval_s": retry_interval_s,
            "create_offline_run": create_offline_run,
        }
        self._idmap = IdMap(spool.directory)
        self._tokens = itertools.count(1)
        self._acked = 0
        self._flush_lock = threading.Lock()
        self._next_reply_check = 0.0
        # Records are handed to the queue in groups: one put (and one wake-up of the queue's
        # feeder thread, which needs the GIL) per group instead of per step.
        self._buffer: list[tuple[Any, ...]] = []
        self._buffer_lock = threading.Lock()
        self._handoff_items = max(1, handoff_items)
        self._handoff_stop = threading.Event()
        max_queue = max(1, max_queue // self._handoff_items)
        self._warned_full = False
        self._closed = False
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._alive_writer: Connection | None = None
        self.mode: SenderMode = "thread"
        if mode == "process" and _can_fork():
            try:
                self._start_process(max_queue=max_queue, nice=nice, sched_idle=sched_idle)
                self.mode = "process"
            except Exception as error:  # noqa: BLE001 - a thread still logs everything
                _logger.warning("cannot start a log sender process (%s); using a thread", error)
        if self.mode == "thread":
            self._start_thread(max_queue=max_queue)
        if replay_leftovers and spool.pending():
            # Leftovers of an earlier process: the sender replays them in the background.
            self._status.offline = True
            self._status.last_retry = 0.0
        _open_senders.add(self)
        # Hands over a group that is waiting but not full, so a quiet stretch of training
        # does not hold its last metrics back.
        self._handoff_thread = threading.Thread(
            target=self._handoff_loop,
            args=(handoff_interval_s,),
            name="bigmodel_ops-log-handoff",
            daemon=True,
        )
        self._handoff_thread.start()

    def _start_thread(self, *, max_queue: int) -> None:
        self._status = SharedStatus([0.0, 0.0])
        self._requests: Any = queue.Queue(maxsize=max_queue)
        self._replies: Any = queue.Queue()
        loop = SenderLoop(
            client=self.client,
            spool=self.spool,
            status=self._status,
            replies=self._replies,
            **self._loop_options,
        )
        self._thread = threading.Thread(
            target=loop.run, args=(self._requests,), name="bigmodel_ops-log-sender", daemon=True
        )
        self._thread.start()

    def _start_process(self, *, max_queue: int, nice: int, sched_idle: bool) -> None:
        context = multiprocessing.get_context("fork")
        slots = context.RawArray("d", 2)
        requests = context.Queue(maxsize=max_queue)
        replies = context.Queue()
        alive_reader, alive_writer = context.Pipe(duplex=False)
        config = {
            "uri": self.spool.uri,
            "spool_dir": str(self.spool.directory),
            "nice": nice,
            "sched_idle": sched_idle,
            **self._loop_options,
        }
        process = context.Process(
            target=_process_main,
            args=(config, slots, requests, replies, alive_reader, alive_writer),
            name="bigmodel_ops-log-sender",
            daemon=True,
        )
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork of a multi-threaded process. The child only runs the
            # sender loop: it never touches torch or a lock another thread could hold.
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        alive_reader.close()
        self._status = SharedStatus(slots)
        self._requests, self._replies = requests, replies
        self._alive_writer = alive_writer
        self._process = process

    # ---- caller side (training thread) -------------------------------------------------

    @property
    def offline(self) -> bool:
        return self._status.offline

    def resolve(self, run_id: str) -> str:
        """The real run id of a placeholder once the run exists on the server (possibly created
        by a later process's replay: unknown placeholders are looked up in idmap.json again)."""
        return self._idmap.resolve(run_id)

    def enqueue_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        self._put(("m", run_id, values, step, timestamp_ms))

    def enqueue_params(self, run_id: str, items: list[tuple[str, str]]) -> None:
        self._put(("p", run_id, items))

    def enqueue_tags(self, run_id: str, items: list[tuple[str, str]]) -> None:
        self._put(("t", run_id, items))

    def _put(self, item: tuple[Any, ...]) -> None:
        now = time.monotonic()
        if now >= self._next_reply_check:  # warnings from the sender, at most once a second
            self._next_reply_check = now + 1.0
            self._poll_replies()
        with self._buffer_lock:
            self._buffer.append(item)
            if len(self._buffer) < self._handoff_items:
                return
            group, self._buffer = self._buffer, []
        self._hand_over(group)

    def _hand_over_buffer(self) -> None:
        with self._buffer_lock:
            group, self._buffer = self._buffer, []
        if group:
            self._hand_over(group)

    def _handoff_loop(self, interval_s: float) -> None:
        while not self._handoff_stop.wait(interval_s):
            self._hand_over_buffer()

    def _hand_over(self, group: list[tuple[Any, ...]]) -> None:
        try:
            self._requests.put_nowait(("group", group))
        except queue.Full:
            # Never block training and never drop: the spool file takes the overflow.
            if not self._warned_full:
                self._warned_full = True
                _logger.warning("metric queue full; spilling to %s", self.spool.directory)
            by_run: dict[str, Pending] = {}
            for item in group:
                by_run.setdefault(item[1], Pending()).add(item)
            for run_id, pending in by_run.items():
                self.spool.append(run_id, pending.record())
            self.spilled += len(group)

    def go_offline(self, error: BaseException) -> None:
        """Called when a synchronous store call found the server unreachable."""
        self._status.last_retry = time.monotonic()
        if self._status.offline:
            return
        self._status.offline = True
        message = offline_message(error, self.spool.directory)
        _logger.warning(message)
        warnings.warn(message, TrackingOfflineWarning, stacklevel=3)

    def call(self, run_id: str, fn: Callable[[str], Any], record: dict[str, Any] | None) -> Any:
        """Run a synchronous store call now; on an outage spool ``record`` (when given) instead."""
        real = self.resolve(run_id)
        if not is_offline_id(real) and not self.offline:
            try:
                return fn(real)
            except Exception as error:
                if not is_outage(error) or record is None:
                    raise
                self.go_offline(error)
        if record is not None:
            self.spool.append(run_id, record)
        return None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far was sent or spooled; then try the spool.

        Returns True when nothing is left in the spool for this URI (False also when the
        sender did not answer within ``timeout`` seconds or is gone).
        """
        if self._closed:
            return self._replay_here()
        with self._flush_lock:
            self._hand_over_buffer()
            token = next(self._tokens)
            self._requests.put(("flush", token))  # blocking put: a flush must not be lost
            done = self._await(token, timeout)
        return done and not self.spool.pending()

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the sender. Returns True when the spool is empty."""
        if self._closed:
            return not self.spool.pending()
        self._handoff_stop.set()
        self._handoff_thread.join(timeout=5)
        with self._flush_lock:
            self._hand_over_buffer()
            token = next(self._tokens)
            self._requests.put(("close", token))
            self._await(token, timeout)
            self._closed = True
        _open_senders.discard(self)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():  # it ignores SIGTERM (see _process_main)
                self._process.kill()
                self._process.join(timeout=5)
            if self._alive_writer is not None:
                self._alive_writer.close()
        return not self.spool.pending()

    def _await(self, token: int, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while self._acked < token:
            wait = 0.5 if end is None else min(0.5, end - time.monotonic())
            if wait <= 0:
                return False
            try:
                self._handle(self._replies.get(timeout=wait))
            except queue.Empty:
                if not self._sender_alive():
                    warnings.warn(
                        "the bigmodel_ops log sender stopped unexpectedly; metrics queued since the "
                        "last flush may be missing",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    return False
        self._poll_replies()
        return True

    def _sender_alive(self) -> bool:
        worker = self._process if self._process is not None else self._thread
        return worker is not None and worker.is_alive()

    def _poll_replies(self) -> None:
        while True:
            try:
                reply = self._replies.get_nowait()
            except queue.Empty:
                return
            self._handle(reply)

    def _handle(self, reply: tuple[Any, ...]) -> None:
        if reply[0] == "warn":
            warnings.warn(reply[1], WARNING_CATEGORIES.get(reply[2], RuntimeWarning), stacklevel=5)
        elif reply[0] == "ack":
            self._acked = max(self._acked, reply[1])
            self.send_cpu_s = reply[2]["send_cpu_s"]
            self.sent_metrics = reply[2]["sent_metrics"]

    def _replay_here(self) -> bool:
        """After close: replay the spool on the caller's thread."""
        replies: queue.Queue[tuple[Any, ...]] = queue.Queue()
        loop = SenderLoop(
            client=self.client, spool=self.spool, status=self._status, replies=replies, **self._loop_options
        )
        empty = loop.replay_all(force=True)
        while not replies.empty():
            self._handle(replies.get_nowait())
        return empty


def _can_fork() -> bool:
    return (
        sys.platform == "linux"
        and "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )


def _process_main(
    config: dict[str, Any],
    slots: Any,
    requests: Any,
    replies: Any,
    caller_alive: Connection,
    caller_end: Connection,
) -> None:
    """Entry point of a sender process (forked from the training process)."""
    caller_end.close()  # only the caller may hold the writing end: its death must mean EOF
    # Ctrl-C reaches the whole process group and a scheduler's SIGTERM may too: the sender
    # must outlive the caller's own shutdown, which flushes and then closes it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(config.pop("nice"))
    if config.pop("sched_idle") and hasattr(os, "SCHED_IDLE"):
        # Below every nice level: CFS gives an idle-class task weight 3 against 1024 for a
        # nice-0 one, so on a core training keeps busy the sender gets ~0.3% of it (nice 19:
        # weight 15, ~1.4%), and a waking training thread preempts it at once.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _forget_inherited_connections()
    uri = config.pop("uri")
    loop = SenderLoop(
        client=MlflowClient(uri),
        spool=Spool(config.pop("spool_dir"), uri=uri),
        status=SharedStatus(slots),
        replies=replies,
        **config,
    )
    loop.run(requests, caller_alive=caller_alive)


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


@atexit.register
def _close_open_senders() -> None:
    # multiprocessing joins its children at exit; a sender still waiting for its close would
    # make that join wait forever.
    for sender in list(_open_senders):
        with contextlib.suppress(Exception):
            sender.close(timeout=30)
