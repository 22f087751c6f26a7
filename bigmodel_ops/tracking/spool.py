"""Offline mode: what counts as an outage, and the spool that keeps data on disk until it ends.

One JSON-lines file per run, ``<spool_dir>/<run_id>.jsonl``: a first line naming its tracking
URI, then records replayed in order: ``create`` (a run started while the server was down: its
id is a placeholder ``offline-<hex>`` until replay creates it and ``idmap.json`` maps it),
``batch`` (metrics ``[key, value, timestamp_ms, step]``, params, tags), ``artifact`` (a copy
inside the spool), ``input`` (a dataset), ``update`` and ``terminate`` (the run's status).

Replay renames the file to ``.replaying`` first (new records go to a fresh file meanwhile) and
keeps a ``.done`` count of records sent, so a replay cut by a second outage resumes where it
stopped instead of logging metrics twice. A truncated last line (a process killed mid-write)
is skipped.
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

from bigmodel_ops.fsutil import flocked

_logger = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline-"


def new_offline_id() -> str:
    return OFFLINE_PREFIX + uuid.uuid4().hex[:24]


def is_offline_id(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(OFFLINE_PREFIX)


class Spool:
    """Append-only per-run record files under one directory, safe across threads and processes
    (appends and the rename that claims a file for replay hold a lock and a ``flock``)."""

    def __init__(self, directory: Path | str, *, uri: str) -> None:
        self.directory = Path(directory)
        self.uri = uri
        self.ids = _load_ids(self.directory)  # placeholder -> real run id, as far as known here
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._thread_lock, flocked(self.directory / ".lock"):
            yield

    def _file(self, run_id: str, suffix: str = "") -> Path:
        return self.directory / f"{run_id}{suffix}.jsonl"

    def append(self, run_id: str, record: dict[str, Any]) -> None:
        with self._lock(), self._file(run_id).open("a", encoding="utf-8") as handle:
            if handle.tell() == 0:
                handle.write(json.dumps({"op": "meta", "uri": self.uri, "run_id": run_id}) + "\n")
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def add_artifact(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        """Copy a file or folder into the spool now (the original may change) and record it."""
        target = self.directory / f"{run_id}.files" / uuid.uuid4().hex[:12] / local.name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if local.is_dir() else shutil.copy2)(local, target)
        self.append(run_id, {"op": "artifact", "file": str(target), "artifact_path": artifact_path})

    def resolve(self, run_id: str) -> str:
        """The real id of a placeholder once its run exists; any other id unchanged. The map is
        ``idmap.json``, shared by every process that uses the spool: unknown placeholders are
        looked up on disk again."""
        if run_id not in self.ids and is_offline_id(run_id):
            self.ids.update(_load_ids(self.directory))
        return self.ids.get(run_id, run_id)

    def record_id(self, placeholder: str, real: str) -> None:
        self.ids[placeholder] = real
        mapping = {**_load_ids(self.directory), placeholder: real}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"idmap.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(mapping, indent=1))
        os.replace(tmp, self.directory / "idmap.json")

    def pending(self) -> list[str]:
        """Run ids with spooled records for this spool's tracking URI."""
        paths = self.directory.glob("*.jsonl") if self.directory.is_dir() else []
        return sorted({p.name.split(".", 1)[0] for p in paths if _uri_of(p) == self.uri})

    def count_records(self) -> int:
        paths = [self._file(r, suffix) for r in self.pending() for suffix in (".replaying", "")]
        return sum(max(0, len(_read_records(p)) - _done(p)) for p in paths if p.exists())

    def replay(self, run_id: str, send: Callable[[str, dict[str, Any]], None]) -> int:
        """Send the records of one run with ``send(run_id, record)``; returns how many were sent.

        ``send`` raises on an outage: the replay stops there and resumes later from the same
        record. It runs twice when new records arrived while the first batch was being sent.
        """
        sent, path = 0, self._file(run_id, ".replaying")
        for _ in range(2):
            with self._lock():  # claim the file a cut replay left, else the run's file renamed
                if not path.exists():
                    if not self._file(run_id).exists():
                        break
                    os.replace(self._file(run_id), path)
            records = _read_records(path)
            for index in range(_done(path), len(records)):
                if records[index].get("op") != "meta":
                    send(run_id, records[index])
                    sent += 1
                path.with_suffix(".done").write_text(str(index + 1))
            path.unlink()
            path.with_suffix(".done").unlink(missing_ok=True)
        if not self._file(run_id).exists() and not path.exists():
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
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        try:
            records.append(json.loads(line))
        except ValueError:
            _logger.warning("%s: skipping a truncated spool record", path)
    return records


def _done(path: Path) -> int:
    try:
        return int(path.with_suffix(".done").read_text())
    except (OSError, ValueError):
        return 0


def _load_ids(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / "idmap.json").read_text())
    except (OSError, ValueError):
        return {}
