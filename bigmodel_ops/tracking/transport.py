"""The caller side of logging: what a :class:`StageRun` sends through.

:class:`Transport` sends nothing; it is what non-zero ranks get. :class:`LogSender` is the real
one. Its ``enqueue_*`` calls cost a list append: records are handed to the sending side
(sender.py) in groups of 256, or every 0.25 s by a small hand-off thread. Store calls that
must happen now (create a run, log an artifact, end a run) go through ``call``, which spools
them during an outage. The sending side runs:

- with ``mode="process"`` (what stages use on Linux) in a forked child at the lowest CPU
  priority (nice 19, and SCHED_IDLE unless told otherwise). MLflow's sqlalchemy store spends
  ~0.3 ms of Python per metric; on a thread that time holds the GIL the training loop needs.
  The child is forked, not spawned: a fresh interpreter spends seconds importing MLflow;
- with ``mode="thread"`` on a daemon thread, where fork is unavailable or the process may not
  have children (a daemonic worker), or when asked for.

Nothing is dropped: when the queue is full the caller appends to the spool file itself instead
of waiting. When the training process dies without closing (SIGKILL), a sender process sees EOF
on a pipe only the caller holds, sends what was queued, and exits; only the group not yet handed
over (at most the last 0.25 s of records) is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.util  # imported before our atexit hook, so that hook runs first
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking.sender import WARNING_CATEGORIES, Pending, SenderLoop, ensure_experiment, process_main
from bigmodel_ops.tracking.spool import SharedStatus, Spool, StoreLink, is_offline_id, is_outage, new_offline_id

_logger = logging.getLogger(__name__)

RUN_ID_ENV = "BIGMODEL_OPS_RUN_ID"  # rank 0's run id, inherited by the processes it launches
_open_senders: weakref.WeakSet[LogSender] = weakref.WeakSet()  # closed at interpreter exit


@dataclasses.dataclass(frozen=True)
class SenderStats:
    """Counters of a transport; ``send_cpu_s`` and ``sent_metrics`` as of the last flush."""

    mode: str  # "process", "thread", or "none" (a rank that logs nothing)
    pid: int | None  # the sender process, if any
    send_cpu_s: float  # CPU the sending side spent sending: what it can take from training
    sent_metrics: int
    spilled: int  # records the caller wrote to the spool because the queue was full


class Transport:
    """Sends nothing. Non-zero ranks get it, so a method added here is a no-op for them;
    every run id resolves to rank 0's (``BIGMODEL_OPS_RUN_ID``)."""

    active = False
    offline = False

    def __init__(self, uri: str, client: MlflowClient | None = None) -> None:
        self._uri = uri
        self._client = client

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # made on first use: a client may open (and migrate) a store
            self._client = MlflowClient(self._uri)
        return self._client

    def resolve(self, run_id: str) -> str:
        return os.environ.get(RUN_ID_ENV, "")

    def enqueue_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        pass

    def enqueue_params(self, run_id: str, items: list[tuple[str, str]]) -> None:
        pass

    def enqueue_tags(self, run_id: str, items: list[tuple[str, str]]) -> None:
        pass

    def call(self, run_id: str, fn: Callable[[str], Any], record: dict[str, Any] | None) -> Any:
        return None

    def log_artifact(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        pass

    def create_run(self, *, experiment: str, artifact_location: str | None, run_name: str, tags: dict[str, str]) -> str:
        return ""

    def terminate(self, run_id: str, status: str) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def stats(self) -> SenderStats:
        return SenderStats("none", None, 0.0, 0, 0)


class LogSender(StoreLink, Transport):
    """The background sender for one tracking URI, shared by a stage run and its child runs."""

    active = True

    def __init__(
        self,
        client: MlflowClient,
        spool: Spool,
        *,
        max_queue: int = 50_000,
        flush_interval_s: float = 2.0,
        retry_interval_s: float = 5.0,
        mode: Literal["process", "thread"] = "thread",
        nice: int = 19,
        sched_idle: bool = True,
        replay_leftovers: bool = False,
        handoff_items: int = 256,
        handoff_interval_s: float = 0.25,
    ) -> None:
        Transport.__init__(self, spool.uri, client)
        self._intervals = {"flush_interval_s": flush_interval_s, "retry_interval_s": retry_interval_s}
        self._experiments: dict[str, str] = {}
        self._tokens = itertools.count(1)
        self._acked = 0
        self._counters = {"send_cpu_s": 0.0, "sent_metrics": 0}
        self.spilled = 0
        self._flush_lock = threading.Lock()
        self._next_reply_check = 0.0
        # One queue put (and one wake-up of the queue's feeder thread, which needs the GIL)
        # per group of records instead of per step.
        self._buffer: list[tuple[Any, ...]] = []
        self._buffer_lock = threading.Lock()
        self._handoff_items = max(1, handoff_items)
        max_groups = max(1, max_queue // self._handoff_items)
        self._warned_full = self._closed = False
        self._process: multiprocessing.process.BaseProcess | None = None
        self._worker: Any = None
        self.mode = "thread"
        if mode == "process" and _can_fork():
            try:
                self._start_process(spool, max_groups, nice=nice, sched_idle=sched_idle)
                self.mode = "process"
            except Exception as error:  # noqa: BLE001 - a thread still logs everything
                _logger.warning("cannot start a log sender process (%s); using a thread", error)
        if self.mode == "thread":
            StoreLink.__init__(self, spool, SharedStatus([0.0, 0.0]))
            self._requests, self._replies = queue.Queue(maxsize=max_groups), queue.Queue()
            loop = SenderLoop(client, spool, self.status, self._replies, **self._intervals)
            self._worker = threading.Thread(target=loop.run, args=(self._requests,), name="bigmodel_ops-log-sender", daemon=True)
            self._worker.start()
        if replay_leftovers and spool.pending():  # an earlier process's leftovers: replay them
            self.status.offline, self.status.last_retry = True, 0.0
        _open_senders.add(self)
        # Hands over a group that is waiting but not full, so that a quiet stretch of training
        # does not hold its last metrics back.
        self._handoff_stop = threading.Event()
        self._handoff = threading.Thread(target=self._handoff_loop, args=(handoff_interval_s,), name="bigmodel_ops-log-handoff", daemon=True)
        self._handoff.start()

    def _start_process(self, spool: Spool, max_groups: int, *, nice: int, sched_idle: bool) -> None:
        context = multiprocessing.get_context("fork")
        slots = context.RawArray("d", 2)
        StoreLink.__init__(self, spool, SharedStatus(slots))
        self._requests, self._replies = context.Queue(maxsize=max_groups), context.Queue()
        alive_reader, self._alive_writer = context.Pipe(duplex=False)
        config = {"uri": spool.uri, "spool_dir": str(spool.directory), "nice": nice, "sched_idle": sched_idle}
        args = ({**config, **self._intervals}, slots, self._requests, self._replies, alive_reader, self._alive_writer)
        process = context.Process(target=process_main, args=args, name="bigmodel_ops-log-sender", daemon=True)
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork of a multi-threaded process. The child only runs the
            # sender loop: it never touches torch or a lock another thread could hold.
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        alive_reader.close()
        self._worker = self._process = process

    def warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        warnings.warn(message, category, stacklevel=4)

    # ---- queued (the training thread's hot path) ---------------------------------------

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

    def _handoff_loop(self, interval_s: float) -> None:
        while not self._handoff_stop.wait(interval_s):
            self._hand_over_buffer()

    def _hand_over_buffer(self) -> None:
        with self._buffer_lock:
            group, self._buffer = self._buffer, []
        if group:
            self._hand_over(group)

    def _hand_over(self, group: list[tuple[Any, ...]]) -> None:
        try:
            self._requests.put_nowait(("group", group))
        except queue.Full:  # never block training and never drop: the spool takes the overflow
            if not self._warned_full:
                self._warned_full = True
                _logger.warning("metric queue full; spilling to %s", self.spool.directory)
            by_run: dict[str, Pending] = {}
            for item in group:
                by_run.setdefault(item[1], Pending()).add(item)
            for run_id, pending in by_run.items():
                self.spool.append(run_id, pending.record())
            self.spilled += len(group)

    # ---- synchronous store calls, spooled during an outage ----------------------------

    def call(self, run_id: str, fn: Callable[[str], Any], record: dict[str, Any] | None) -> Any:
        """Run a store call now; on an outage spool ``record`` (when given) instead."""
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

    def log_artifact(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        """Upload a file or folder now; during an outage copy it into the spool."""
        real = self.resolve(run_id)
        if not self.offline and not is_offline_id(real):
            upload = self.client.log_artifacts if local.is_dir() else self.client.log_artifact
            try:
                return upload(real, str(local), artifact_path)
            except Exception as error:
                if not is_outage(error):
                    raise
                self.go_offline(error)
        self.spool.add_artifact(run_id, local, artifact_path)

    def experiment_id(self, name: str, artifact_location: str | None) -> str | None:
        """The id of experiment ``name`` (created on first use); None while the server is down."""
        if name not in self._experiments and not self.offline:
            try:
                self._experiments[name] = ensure_experiment(self.client, name, artifact_location)
            except Exception as error:
                if not is_outage(error):
                    raise
                self.go_offline(error)
        return self._experiments.get(name)

    def create_run(self, *, experiment: str, artifact_location: str | None, run_name: str, tags: dict[str, str]) -> str:
        """Create a run now, or (server down) a placeholder whose creation is spooled."""
        start = int(time.time() * 1000)
        experiment_id = self.experiment_id(experiment, artifact_location)
        if experiment_id is not None and not self.offline:
            try:
                return self.client.create_run(experiment_id, start_time=start, tags=tags, run_name=run_name).info.run_id
            except Exception as error:
                if not is_outage(error):
                    raise
                self.go_offline(error)
        placeholder = new_offline_id()
        record = {"op": "create", "experiment_id": experiment_id, "experiment_name": experiment, "tags": tags}
        record.update(artifact_location=artifact_location, run_name=run_name, start_time=start)
        self.spool.append(placeholder, record)
        return placeholder

    def terminate(self, run_id: str, status: str) -> None:
        """Send everything queued for the run, then end it with ``status``."""
        self.flush()
        end = int(time.time() * 1000)
        record = {"op": "terminate", "status": status, "end_time": end}
        self.call(run_id, lambda rid: self.client.set_terminated(rid, status=status, end_time=end), record)

    # ---- flush and close ---------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far was sent or spooled; then try the spool.

        True when nothing is left in the spool for this URI (False also when the sender did not
        answer within ``timeout`` seconds or is gone).
        """
        if self._closed:  # after close: replay on the caller's thread
            replies: queue.Queue[tuple[Any, ...]] = queue.Queue()
            empty = SenderLoop(self.client, self.spool, self.status, replies, **self._intervals).replay_all(force=True)
            while not replies.empty():
                self._handle(replies.get_nowait())
            return empty
        return self._control("flush", timeout) and not self.spool.pending()

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the sender. True when the spool is empty."""
        if not self._closed:
            self._handoff_stop.set()
            self._handoff.join(timeout=5)
            self._control("close", timeout)
            _open_senders.discard(self)
            self._worker.join(timeout=5)
            if self._process is not None:
                if self._process.is_alive():  # it ignores SIGTERM (see process_main)
                    self._process.kill()
                    self._process.join(timeout=5)
                self._alive_writer.close()
        return not self.spool.pending()

    def _control(self, kind: str, timeout: float | None) -> bool:
        with self._flush_lock:
            self._hand_over_buffer()
            token = next(self._tokens)
            self._requests.put((kind, token))  # a blocking put: a flush must not be lost
            self._closed = self._closed or kind == "close"
            end = None if timeout is None else time.monotonic() + timeout
            while self._acked < token:
                wait = 0.5 if end is None else min(0.5, end - time.monotonic())
                if wait <= 0:
                    return False
                try:
                    self._handle(self._replies.get(timeout=wait))
                except queue.Empty:
                    if not self._worker.is_alive():
                        message = "the bigmodel_ops log sender stopped unexpectedly; metrics queued since the last flush may be missing"
                        warnings.warn(message, RuntimeWarning, stacklevel=4)
                        return False
        self._poll_replies()
        return True

    def _poll_replies(self) -> None:
        while True:
            try:
                self._handle(self._replies.get_nowait())
            except queue.Empty:
                return

    def _handle(self, reply: tuple[Any, ...]) -> None:
        if reply[0] == "warn":
            warnings.warn(reply[1], WARNING_CATEGORIES.get(reply[2], RuntimeWarning), stacklevel=5)
        elif reply[0] == "ack":
            self._acked = max(self._acked, reply[1])
            self._counters = reply[2]

    def stats(self) -> SenderStats:
        pid = self._process.pid if self._process is not None else None
        return SenderStats(self.mode, pid, self._counters["send_cpu_s"], self._counters["sent_metrics"], self.spilled)


def _can_fork() -> bool:
    return sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


@atexit.register
def _close_open_senders() -> None:
    # multiprocessing joins its children at exit; a sender still waiting for its close would
    # make that join wait forever.
    for sender in list(_open_senders):
        with contextlib.suppress(Exception):
            sender.close(timeout=30)
