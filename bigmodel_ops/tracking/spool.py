"""The offline spool: what could not reach the tracking server, kept on disk until it can.

One JSON-lines file per run, ``<spool_dir>/<run_id>.jsonl``. The first line names the tracking
URI it belongs to; the others are records, replayed in order:

- ``{"op": "create", ...}``: the run itself, for a run started while the server was down (its id
  is a placeholder ``offline-<hex>`` until the run is created; ``idmap.json`` then maps it);
- ``{"op": "batch", "metrics": [[key, value, timestamp_ms, step], ...], "params": [[k, v]],
  "tags": [[k, v]]}``;
- ``{"op": "artifact", "file": <copy inside the spool>, "artifact_path": ...}``;
- ``{"op": "terminate", "status": ..., "end_time": ...}``.

Replay renames the file to ``.replaying`` first (new records go to a fresh file meanwhile) and
keeps a ``.done`` counter of records already sent, so a replay interrupted by a second outage
resumes where it stopped instead of logging metrics twice. A file is deleted once fully sent.
Edge cases: a record that the server refuses as invalid (not an outage) is skipped with a
warning; a truncated last line (process killed mid-write) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: threads only
    fcntl = None  # type: ignore[assignment]

_logger = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline-"


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

    def _file(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.jsonl"

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
        runs: set[str] = set()
        for path in self.directory.glob("*.jsonl"):
            run_id = path.name.split(".", 1)[0]
            if self._uri_of(path) == self.uri:
                runs.add(run_id)
        return sorted(runs)

    def count_records(self) -> int:
        total = 0
        for run_id in self.pending():
            for path in (self.directory / f"{run_id}.replaying.jsonl", self._file(run_id)):
                if path.exists():
                    total += max(0, len(_read_records(path)) - _done(path))
        return total

    @staticmethod
    def _uri_of(path: Path) -> str | None:
        try:
            with path.open(encoding="utf-8") as handle:
                first = json.loads(handle.readline() or "{}")
        except (OSError, ValueError):
            return None
        return first.get("uri")

    @contextlib.contextmanager
    def _claim(self, run_id: str) -> Iterator[Path | None]:
        replaying = self.directory / f"{run_id}.replaying.jsonl"
        with self._lock():
            if not replaying.exists():
                current = self._file(run_id)
                if not current.exists():
                    yield None
                    return
                os.replace(current, replaying)
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
                done = _done(path)
                for index in range(done, len(records)):
                    record = records[index]
                    if record.get("op") != "meta":
                        send(run_id, record)
                        sent += 1
                    _set_done(path, index + 1)
                path.unlink()
                _done_file(path).unlink(missing_ok=True)
        if not self._file(run_id).exists() and not (self.directory / f"{run_id}.replaying.jsonl").exists():
            shutil.rmtree(self.directory / f"{run_id}.files", ignore_errors=True)
        return sent


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


def _set_done(path: Path, count: int) -> None:
    _done_file(path).write_text(str(count))


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
        if real is not None:
            return real
        if is_offline_id(run_id):
            self._mapping.update(_load_idmap(self.directory))
            return self._mapping.get(run_id, run_id)
        return run_id

    def record(self, placeholder: str, real: str) -> None:
        self._mapping[placeholder] = real
        mapping = _load_idmap(self.directory)
        mapping[placeholder] = real
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"idmap.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(mapping, indent=1))
        os.replace(tmp, self.directory / "idmap.json")


def _load_idmap(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / "idmap.json").read_text())
    except (OSError, ValueError):
        return {}
