"""The caller side of logging: what a :class:`StageRun` sends through.

:class:`LogSender` queues records in groups (a list append per call; 256 records, or what waits
every 0.25 s, go to the sending side, sender.py) and makes the store calls that cannot wait
(create or end a run, log an artifact), spooling them during an outage. The sending side runs
in a forked child at the lowest CPU priority (``mode="process"``, what stages use on Linux), so
that MLflow's ~0.3 ms of Python per metric neither holds the GIL training needs nor takes its
CPU, or on a thread where fork is unavailable. Nothing is dropped: a full queue spills to the
spool, and a sender process whose caller was SIGKILLed still sends what was queued (all but the
group not yet handed over, at most 0.25 s). :class:`NullTransport` sends nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import multiprocessing.util  # noqa: F401 - imported before our atexit hook, which must run first
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking.sender import SenderLoop, can_fork, file_request, start_process
from bigmodel_ops.tracking.spool import Spool, is_offline_id, new_offline_id
from bigmodel_ops.tracking.store import Pending, SharedStatus, StoreLink, ensure_experiment

_logger = logging.getLogger(__name__)

RUN_ID_ENV = "BIGMODEL_OPS_RUN_ID"  # rank 0's run id, inherited by the processes it launches
_open_senders: weakref.WeakSet[LogSender] = weakref.WeakSet()  # closed at interpreter exit


@dataclasses.dataclass(frozen=True)
class SenderStats:
    """Counters of a transport; ``send_cpu_s`` as of the last flush."""

    mode: str  # "process", "thread", or "none" (a rank that logs nothing)
    pid: int | None  # the sender process, if any
    send_cpu_s: float  # CPU the sending side spent sending: what it can take from training
    spilled: int  # records the caller wrote to the spool because the queue was full


class NullTransport:
    """What non-zero ranks log through: every transport call (``enqueue*``, ``call``,
    ``create_run``, ``flush``... and any added later) does nothing; every run id is rank 0's."""

    active = offline = False

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @functools.cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(self._uri)  # made on first use: a client may open (and migrate) a store

    def resolve(self, run_id: str) -> str:
        return os.environ.get(RUN_ID_ENV, "")

    def stats(self) -> SenderStats:
        return SenderStats("none", None, 0.0, 0)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):  # no protocol (copy, pickle) may mistake it for a hook
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class LogSender(StoreLink):
    """The background sender for one tracking URI, shared by a stage run and its child runs."""

    active = True

    def __init__(
        self,
        client: MlflowClient,
        spool: Spool,
        *,
        mode: Literal["process", "thread"] = "thread",
        nice: int = 19,
        sched_idle: bool = True,
        flush_interval_s: float = 2.0,
        retry_interval_s: float = 5.0,
        max_queue: int = 50_000,
        handoff_items: int = 256,
        handoff_interval_s: float = 0.25,
    ) -> None:
        self.mode = mode if mode == "process" and can_fork() else "thread"
        intervals = {"flush_interval_s": flush_interval_s, "retry_interval_s": retry_interval_s}
        self._experiments: dict[str, str] = {}
        self._send_cpu_s = 0.0
        self._tokens, self._acked, self.spilled = itertools.count(1), 0, 0
        self._flush_lock, self._buffer_lock = threading.Lock(), threading.Lock()
        self._buffer: list[tuple[Any, ...]] = []
        self._handoff_items, self._next_reply_check = max(1, handoff_items), 0.0
        self._warned_full = self._closed = False
        groups = max(1, max_queue // self._handoff_items)  # the queue holds groups of records
        if self.mode == "process":
            try:
                status, self._requests, self._replies, self._worker, self._alive = start_process(
                    spool, groups=groups, nice=nice, sched_idle=sched_idle, **intervals
                )
            except Exception as error:  # noqa: BLE001 - a thread still logs everything
                _logger.warning("cannot start a log sender process (%s); using a thread", error)
                self.mode = "thread"
        if self.mode == "thread":
            status = SharedStatus()
            self._requests, self._replies = queue.Queue(maxsize=groups), queue.Queue()
            loop = SenderLoop(client, spool, status, self._replies, **intervals)
            self._worker = _daemon(loop.run, self._requests, name="bigmodel_ops-log-sender")
        super().__init__(client, spool, status, retry_interval_s)
        if spool.pending():  # an earlier process's leftovers: replay them
            self.status.offline, self.status.last_retry = True, 0.0
        _open_senders.add(self)
        self._handoff_stop = threading.Event()
        self._handoff = _daemon(self._handoff_loop, handoff_interval_s, name="bigmodel_ops-log-handoff")

    def warn(self, message: str, category: type[Warning]) -> None:
        _logger.warning(message)
        warnings.warn(message, category, stacklevel=4)

    # ---- queued: the training thread's hot path ---------------------------------------------

    def enqueue(self, item: tuple[Any, ...]) -> None:
        """Queue one request (``("m" | "p" | "t", run_id, ...)``, sender.py); never blocks."""
        now = time.monotonic()
        if now >= self._next_reply_check:  # warnings from the sender, at most once a second
            self._next_reply_check = now + 1.0
            self._poll_replies()
        with self._buffer_lock:
            self._buffer.append(item)
            full = len(self._buffer) >= self._handoff_items
        if full:
            self._hand_over()

    def _handoff_loop(self, interval_s: float) -> None:
        """Hands over a group that waits but is not full: a quiet stretch keeps nothing back."""
        while not self._handoff_stop.wait(interval_s):
            self._hand_over()

    def _hand_over(self) -> None:
        """Pass the buffered records to the sending side as one group."""
        with self._buffer_lock:
            group, self._buffer = self._buffer, []
        if not group:
            return
        try:
            self._requests.put_nowait(("group", group))
        except queue.Full:  # never block training and never drop: the spool takes the overflow
            if not self._warned_full:
                self._warned_full = True
                _logger.warning("metric queue full; spilling to %s", self.spool.directory)
            by_run: dict[str, Pending] = {}
            file_request(by_run, ("group", group))
            for run_id, pending in by_run.items():
                self.spool.append(run_id, pending.record())
            self.spilled += len(group)

    # ---- store calls that cannot wait, spooled during an outage -----------------------------

    def call(self, run_id: str, record: dict[str, Any], fn: Callable[[str], Any] | None = None) -> Any:
        """Send ``record`` (or run ``fn(real run id)`` instead) now; during an outage spool it."""
        if self.reachable(run_id):
            with self.on_outage_go_offline():
                real = self.resolve(run_id)
                return self.apply(real, record) if fn is None else fn(real)
        self.spool.append(run_id, record)
        return None

    def log_artifact(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        """Upload a file or folder now; during an outage copy it into the spool."""
        if self.reachable(run_id):
            upload = self.client.log_artifacts if local.is_dir() else self.client.log_artifact
            with self.on_outage_go_offline():
                return upload(self.resolve(run_id), str(local), artifact_path)
        self.spool.add_artifact(run_id, local, artifact_path)

    def experiment_id(self, name: str, artifact_location: str | None) -> str | None:
        """The id of experiment ``name`` (created on first use); None while the server is down."""
        if name not in self._experiments and self.reachable():
            with self.on_outage_go_offline():
                self._experiments[name] = ensure_experiment(self.client, name, artifact_location)
        return self._experiments.get(name)

    def create_run(self, experiment: str, artifact_location: str | None, tags: dict[str, str]) -> str:
        """Create the run named by tag ``mlflow.runName`` now, or (server down, or a parent not
        created yet) spool its creation and return a placeholder id."""
        start, experiment_id = int(time.time() * 1000), self.experiment_id(experiment, artifact_location)
        record = {"op": "create", "experiment_id": experiment_id, "experiment_name": experiment, "tags": tags}
        record.update(
            artifact_location=artifact_location, run_name=tags.get("mlflow.runName"), start_time=start
        )
        parent = tags.get("mlflow.parentRunId")  # a placeholder parent: replay resolves it
        if experiment_id is not None and self.reachable() and not is_offline_id(parent):
            with self.on_outage_go_offline():
                return self.create(record)
        placeholder = new_offline_id()
        self.spool.append(placeholder, record)
        return placeholder

    # ---- flush and close --------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far was sent or spooled; then try the spool. True
        when nothing is left in the spool (False also when the sender did not answer in time)."""
        if self._closed:  # after close: replay on the caller's thread
            return self.replay_all(force=True)
        return self._control("flush", timeout) and not self.spool.pending()

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the sender. True when the spool is empty."""
        if not self._closed:
            self._handoff_stop.set()
            self._handoff.join(timeout=5)
            self._control("close", timeout)
            _open_senders.discard(self)
            self._worker.join(timeout=5)
            if self.mode == "process":
                if self._worker.is_alive():  # it ignores SIGTERM (see process_main)
                    self._worker.kill()
                    self._worker.join(timeout=5)
                self._alive.close()
        return not self.spool.pending()

    def _control(self, kind: str, timeout: float | None) -> bool:
        with self._flush_lock:
            self._hand_over()
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
                        lost = "metrics queued since the last flush may be missing"
                        warnings.warn(
                            f"the log sender stopped unexpectedly; {lost}", RuntimeWarning, stacklevel=4
                        )
                        return False
        self._poll_replies()
        return True

    def _poll_replies(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._handle(self._replies.get_nowait())

    def _handle(self, reply: tuple[Any, ...]) -> None:
        if reply[0] == "warn":
            warnings.warn(reply[1], reply[2], stacklevel=5)
        elif reply[0] == "ack":
            self._acked = max(self._acked, reply[1])
            self._send_cpu_s = reply[2]

    def stats(self) -> SenderStats:
        pid = self._worker.pid if self.mode == "process" else None
        return SenderStats(self.mode, pid, self._send_cpu_s, self.spilled)


def _daemon(target: Callable[[Any], Any], arg: Any, *, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(arg,), name=name, daemon=True)
    thread.start()
    return thread


@atexit.register
def _close_open_senders() -> None:
    # multiprocessing joins its children at exit; a sender still waiting for its close would
    # make that join wait forever.
    for sender in list(_open_senders):
        with contextlib.suppress(Exception):
            sender.close(timeout=30)
