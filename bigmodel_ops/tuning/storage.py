"""Where a study lives, and how the liveness of its running trials is recorded.

Two kinds of storage, both shared by any number of worker processes:

- an SQLAlchemy URL (``tune.storage`` or ``--storage``; PostgreSQL / MySQL for many machines,
  sqlite for one): Optuna's :class:`~optuna.storages.RDBStorage` with its own heartbeat
  (``heartbeat_interval``, ``grace_period``) and a retry of stale trials
  (:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`);
- a journal file (the default, one machine): :class:`HeartbeatJournalStorage`, Optuna's
  :class:`~optuna.storages.JournalStorage` plus the same heartbeat contract. Optuna's journal
  storage records no heartbeat (as of Optuna 5.1), so the liveness record is a trial system
  attribute ``heartbeat`` (the worker's wall clock, seconds since the epoch) written by Optuna's
  heartbeat thread every ``heartbeat_interval`` seconds. A RUNNING trial whose last heartbeat (or,
  before its first one, its start) is older than ``grace_period`` belongs to a dead worker.

:func:`reap_stale_trials` fails such trials (reason in the user attribute ``fail_reason``) and
queues a retry of each with the same parameters; it never touches a trial whose worker is alive,
so a worker that starts while others run leaves their trials alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from bigmodel_ops.errors import ConfigError
from bigmodel_ops.fsutil import flocked

_logger = logging.getLogger(__name__)

HEARTBEAT_ATTR = "heartbeat"
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with Optuna's heartbeat contract (see the module docstring).

    ``heartbeat_interval`` and ``grace_period`` are seconds (``grace_period`` should be a few
    intervals: a busy machine delays heartbeats). Clocks: every worker writes its own wall
    clock, so all workers must share one clock (one machine, or NTP-synchronised machines on a
    shared file system).
    """

    def __init__(
        self,
        path: Path,
        *,
        heartbeat_interval: int,
        grace_period: int,
        stale_trial_callback: StaleCallback | None = None,
    ) -> None:
        if heartbeat_interval <= 0 or grace_period <= 0:
            raise ValueError("heartbeat_interval and grace_period must be positive")
        self.path = Path(path)
        # A plain lock file, not Optuna's default symlink: the symlink's target is the journal's path
        # as given (relative under DVC), so one left by a killed process dangles, and `dvc repro`
        # then fails hashing the tune outputs with "No such file or directory: ...journal.lock".
        # A plain file left behind hashes like any file, and is taken over once it has not changed
        # for grace_period seconds (a write holds the lock for milliseconds; Optuna warns below 3).
        lock = JournalFileOpenLock(str(self.path), grace_period=max(grace_period, 3))
        super().__init__(JournalFileBackend(str(self.path), lock_obj=lock))
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last is None and trial.datetime_start is not None:
                last = _local_timestamp(trial.datetime_start)
            if last is not None and now - float(last) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback

    def get_failed_trial_callback(self) -> StaleCallback | None:  # Optuna < 4.9 asks this name
        return self._stale_callback


def _local_timestamp(value: datetime) -> float:
    """Optuna stores trial datetimes as naive local time."""
    return value.timestamp()


def open_storage(
    url: str | None,
    *,
    journal: Path,
    heartbeat_interval: int,
    grace_period: int,
    max_retry: int,
    setting: str = "tune.storage",
) -> BaseStorage:
    """The study storage: an RDB storage for ``url``, else a heartbeat journal at ``journal``
    (its folder is created). Both fail stale trials and queue at most ``max_retry`` retries
    of each.

    Raises ConfigError naming ``setting`` when the URL is malformed, its database driver is not
    installed or the database cannot be reached (RDBStorage connects at once).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if not url:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(
            journal,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            stale_trial_callback=retry,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
    except Exception as error:  # sqlalchemy ArgumentError / OperationalError, ImportError, ...
        from bigmodel_ops.tracking.scrub import mask_uris

        detail = " ".join(str(error).split())[:300]
        raise ConfigError(
            mask_uris(  # the URL's password never reaches the console
                f"{setting} = {url!r}: cannot open the Optuna storage ({type(error).__name__}: {detail}); "
                "give a reachable SQLAlchemy URL (e.g. postgresql+psycopg://host/db or sqlite:///study.db), "
                "or leave it unset for the journal file in outputs/tune"
            )
        ) from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    # A server that does not answer must fail in seconds, not after the driver's default.
    if url.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


@contextlib.contextmanager
def storage_lock(storage: BaseStorage) -> Iterator[None]:
    """An exclusive lock between the processes of one machine that use this storage (see
    :func:`lock_file`); a no-op for database servers, which serialise concurrent updates
    themselves."""
    lock_path = lock_file(storage)
    if lock_path is None:
        yield
        return
    with flocked(lock_path):
        yield


def lock_file(storage: BaseStorage) -> Path | None:
    """The file that serialises this machine's workers on ``storage``: beside a journal file, or
    beside an sqlite database. Optuna hands out a WAITING trial by reading its state, then updating
    it; sqlite runs the read outside the update's transaction, so without this lock two processes
    can both take the same trial. None for a database server (its ``SELECT ... FOR UPDATE`` holds
    the row) and for an in-memory sqlite database (one process only)."""
    if isinstance(storage, HeartbeatJournalStorage):
        return storage.path.with_name(storage.path.name + ".workers.lock")
    # A study wraps its RDBStorage in Optuna's cache (``_backend``).
    rdb = storage if isinstance(storage, RDBStorage) else getattr(storage, "_backend", None)
    if not isinstance(rdb, RDBStorage):
        return None
    url = make_url(rdb.url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = Path(url.database)
    return database.with_name(database.name + ".workers.lock")


def reap_stale_trials(
    study: optuna.Study, *, on_failed: Callable[[FrozenTrial], None] | None = None
) -> list[int]:
    """Fail the RUNNING trials whose worker stopped heartbeating, queue their retries (the
    storage's stale-trial callback) and call ``on_failed`` with each failed trial; return their
    numbers. Live trials (heartbeat within the grace period) are never touched. A trial another
    worker fails at the same moment is skipped (each stale trial is failed and retried once)."""
    storage = study._storage
    if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
        return []
    failed: list[FrozenTrial] = []
    with storage_lock(storage):
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            trial = storage.get_trial(trial_id)
            if trial.state != TrialState.RUNNING:
                continue
            try:
                storage.set_trial_user_attr(
                    trial_id,
                    "fail_reason",
                    f"worker stopped: no heartbeat for more than {_grace(storage)} s (killed or hung)",
                )
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            failed.append(storage.get_trial(trial_id))
        callback = storage.get_heartbeat_stale_trial_callback()
        for trial in failed:
            if callback is not None:
                callback(study, trial)
    for trial in failed:
        _logger.warning(
            "tune: trial %d's worker stopped heartbeating; failed and queued for retry", trial.number
        )
        if on_failed is not None:
            on_failed(trial)
    return [trial.number for trial in failed]


def _grace(storage: BaseStorage) -> Any:
    return getattr(storage, "_grace_period", None) or getattr(storage, "grace_period", "?")


def describe(storage: BaseStorage) -> str:
    """What a user would pass to reach this storage (the journal's path or the RDB URL)."""
    if isinstance(storage, HeartbeatJournalStorage):
        return str(storage.path)
    if isinstance(storage, RDBStorage):
        return storage.url
    return type(storage).__name__
