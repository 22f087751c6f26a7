"""Offline mode: what counts as an outage, and the on-disk spool that keeps data until it ends.

One JSON-lines file per run, ``<spool_dir>/<run_id>.jsonl``. The first line names the tracking
URI it belongs to; the others are records, replayed in order:

- ``{"op": "create", ...}``: a run started while the server was down; its id is a placeholder
  ``offline-<hex>`` until replay creates it, and ``idmap.json`` then maps it to the real id;
- ``{"op": "batch", "metrics": [[key, value, timestamp_ms, step], ...], "params": [[k, v]],
  "tags": [[k, v]]}``;
- ``{"op": "artifact", "file": <copy inside the spool>, "artifact_path": ...}``;
- ``{"op": "input", "dataset": {...}, "context": ...}``: a dataset the run used;
- ``{"op": "terminate", "status": ..., "end_time": ...}`` and ``{"op": "update", "status": ...}``.

Replay renames the file to ``.replaying`` first (new records go to a fresh file meanwhile) and
keeps a ``.done`` counter of records already sent, so a replay interrupted by a second outage
resumes where it stopped instead of logging metrics twice. A file is deleted once fully sent;
a truncated last line (process killed mid-write) is ignored.

:class:`StoreLink` is what the caller side (transport.py) and the sending side (sender.py) of
the log sender share: the offline flag, the id map, and going offline with one warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

try:
    import fcntl
except ImportError:  # Windows: threads only
    fcntl = None  # type: ignore[assignment]

_logger = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline-"
# Error codes that mean "the server looked at the data and refused it": retrying cannot help.
_DATA_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}


class TrackingOfflineWarning(UserWarning):
    """The tracking server could not be reached; data is spooled locally and replayed later."""


def is_outage(error: BaseException) -> bool:
    """True when an error means the store is unreachable or busy, not that the data is bad."""
    if isinstance(error, MlflowException):
        return error.error_code not in _DATA_ERRORS
    return isinstance(error, OSError | TimeoutError | ConnectionError) or "OperationalError" in type(error).__name__


def new_offline_id() -> str:
    return OFFLINE_PREFIX + uuid.uuid4().hex[:24]


def is_offline_id(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(OFFLINE_PREFIX)


class Spool:
    """Append-only per-run record files under one directory.

    Safe across threads and processes (a sender process replays while the training process may
    append): appends and the rename that claims a file for replay hold a thread lock and an
    advisory ``flock`` on ``<directory>/.lock``.
    """

    def __init__(self, directory: Path | str, *, uri: str) -> None:
        self.directory = Path(directory)
        self.uri = uri
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._thread_lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / ".lock", "a+b") as handle:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                yield  # closing the file releases the flock

    def _file(self, run_id: str, suffix: str = "") -> Path:
        return self.directory / f"{run_id}{suffix}.jsonl"

    def append(self, run_id: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock():
            path = self._file(run_id)
            new = not path.exists()
            with path.open("a", encoding="utf-8") as handle:
                if new:
                    handle.write(json.dumps({"op": "meta", "uri": self.uri, "run_id": run_id}) + "\n")
                handle.write(line + "\n")

    def add_artifact(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        """Copy a file or folder into the spool now (the original may change) and record it."""
        target = self.directory / f"{run_id}.files" / uuid.uuid4().hex[:12] / local.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, target)
        else:
            shutil.copy2(local, target)
        self.append(run_id, {"op": "artifact", "file": str(target), "artifact_path": artifact_path})

    def pending(self) -> list[str]:
        """Run ids with spooled records for this spool's tracking URI."""
        if not self.directory.is_dir():
            return []
        paths = self.directory.glob("*.jsonl")
        return sorted({p.name.split(".", 1)[0] for p in paths if _uri_of(p) == self.uri})

    def count_records(self) -> int:
        total = 0
        for run_id in self.pending():
            for path in (self._file(run_id, ".replaying"), self._file(run_id)):
                if path.exists():
                    total += max(0, len(_read_records(path)) - _done(path))
        return total

    @contextlib.contextmanager
    def _claim(self, run_id: str) -> Iterator[Path | None]:
        replaying = self._file(run_id, ".replaying")
        with self._lock():
            if not replaying.exists():
                if not self._file(run_id).exists():
                    yield None
                    return
                os.replace(self._file(run_id), replaying)
        yield replaying

    def replay(self, run_id: str, send: Callable[[str, dict[str, Any]], None]) -> int:
        """Send the records of one run with ``send(run_id, record)``; returns how many were sent.

        ``send`` raises on an outage: the replay stops there and resumes later from the same
        record. It runs twice when new records arrived while the first batch was being sent.
        """
        sent = 0
        for _ in range(2):
            with self._claim(run_id) as path:
                if path is None:
                    break
                records = _read_records(path)
                for index in range(_done(path), len(records)):
                    if records[index].get("op") != "meta":
                        send(run_id, records[index])
                        sent += 1
                    _done_file(path).write_text(str(index + 1))
                path.unlink()
                _done_file(path).unlink(missing_ok=True)
        if not self._file(run_id).exists() and not self._file(run_id, ".replaying").exists():
            shutil.rmtree(self.directory / f"{run_id}.files", ignore_errors=True)
        return sent


def _uri_of(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.loads(handle.readline() or "{}").get("uri")
    except (OSError, ValueError):
        return None


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            _logger.warning("%s: skipping a truncated spool record", path)
    return records


def _done_file(path: Path) -> Path:
    return path.with_suffix(".done")


def _done(path: Path) -> int:
    try:
        return int(_done_file(path).read_text())
    except (OSError, ValueError):
        return 0


class IdMap:
    """Placeholder run id -> real run id, kept in ``<spool dir>/idmap.json``.

    Shared by every process that uses the spool: a placeholder unknown here may have been
    created by another process's replay, so unknown placeholders are looked up on disk again.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mapping = _load_idmap(directory)

    def __contains__(self, placeholder: str) -> bool:
        return placeholder in self._mapping

    def resolve(self, run_id: str) -> str:
        """The real id of a placeholder once its run exists; any other id unchanged."""
        real = self._mapping.get(run_id)
        if real is not None or not is_offline_id(run_id):
            return real or run_id
        self._mapping.update(_load_idmap(self.directory))
        return self._mapping.get(run_id, run_id)

    def record(self, placeholder: str, real: str) -> None:
        self._mapping[placeholder] = real
        mapping = {**_load_idmap(self.directory), placeholder: real}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"idmap.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(mapping, indent=1))
        os.replace(tmp, self.directory / "idmap.json")


def _load_idmap(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / "idmap.json").read_text())
    except (OSError, ValueError):
        return {}


class SharedStatus:
    """The offline flag and the time of the last replay attempt, shared by caller and sender.

    Backed by a 2-slot array of doubles: a ``multiprocessing`` shared array for a sender process,
    a plain list for a sender thread. ``time.monotonic`` is system-wide on Linux, so both
    processes compare the same clock.
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


class StoreLink:
    """One side of the log sender: a spool, the shared status and the id map.

    Subclasses say how a warning reaches the user (``warn``): the caller emits it, the sending
    side hands it to the caller (the warnings module is neither thread- nor process-shared).
    """

    def __init__(self, spool: Spool, status: SharedStatus) -> None:
        self.spool = spool
        self.status = status
        self._idmap = IdMap(spool.directory)

    @property
    def offline(self) -> bool:
        """True while the tracking server is unreachable and data goes to the spool."""
        return self.status.offline

    def resolve(self, run_id: str) -> str:
        """The real run id of a placeholder once the run exists (see :class:`IdMap`)."""
        return self._idmap.resolve(run_id)

    def go_offline(self, error: BaseException) -> None:
        """The server was found unreachable: spool from now on; warn once per outage."""
        self.status.last_retry = time.monotonic()
        if self.status.offline:
            return
        self.status.offline = True
        self.warn(
            f"tracking server unreachable ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}); "
            f"training continues and metrics are spooled to {self.spool.directory}, "
            "to be replayed when it is back",
            TrackingOfflineWarning,
        )

    def warn(self, message: str, category: type[Warning]) -> None:
        raise NotImplementedError
