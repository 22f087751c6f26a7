"""Outputs that are never half-written, and the project's hashes.

Every stage builds its outputs beside their final paths and moves them into place only at the
very end (:func:`publish`), so a crash, a full disk or bad input leaves either the previous
complete output or nothing; a full disk is reported as :class:`DiskFullError` (a user error naming
the outputs). No third-party imports: the GPU benchmark imports the training code bare.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bigmodel_ops.errors import BigModelOpsError


class Publication:
    """Staged copies of output files and folders, swapped into place together by :meth:`commit`.

    ``staged(target)`` names the temporary path to write ``target``'s new content to (a sibling,
    so the final rename stays on one file system). The caller creates it (a file, or a folder
    with ``mkdir``). ``commit`` moves every staged path that exists over its target; a previous
    target is deleted only after its replacement is in place, and restored if the move fails.
    ``abort`` removes the staged paths and the parent folders this object created.
    """

    def __init__(self, *targets: Path) -> None:
        self._suffix = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._staged: dict[Path, Path] = {}
        self._created: list[Path] = []
        self._wrappers: list[Path] = []
        self._swept: set[Path] = set()
        for target in targets:
            self.staged(target)

    def staged(self, target: Path, *, name: str | None = None) -> Path:
        """The staging path of target (its parent folders are created, and removed on abort).

        With ``name``, the staging path is ``<a staging folder>/<name>`` instead, for outputs
        whose own folder name is seen elsewhere (an MLflow artifact is named after its folder).
        """
        target = Path(target)
        if target not in self._staged:
            if target.parent.is_dir() and target.parent not in self._swept:
                self._swept.add(target.parent)
                sweep_leftovers(target.parent)
            self._make_dirs(target.parent)
            wrapper = target.parent / f".{target.name}.{self._suffix}"
            if name is not None:
                wrapper.mkdir()
                self._wrappers.append(wrapper)
                self._staged[target] = wrapper / name
            else:
                self._staged[target] = wrapper
        return self._staged[target]

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def commit(self) -> None:
        """Move every staged path over its target (targets without a staged path are left alone)."""
        for target, staged in self._staged.items():
            if staged.exists():
                _swap(staged, target)
        for wrapper in self._wrappers:
            _remove(wrapper)
        self._created.clear()

    def abort(self) -> None:
        for staged in [*self._staged.values(), *self._wrappers]:
            _remove(staged)
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: something else may live there now
        self._created.clear()


# `.NAME.tmp-PID-XXXXXXXX` (staged) and `.NAME.old-PID-XXXXXXXX` (moved aside by _swap).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# A staged file younger than this is left alone even when its PID is not alive here: on a shared
# file system it may belong to a live process of another machine.
LEFTOVER_MIN_AGE_S = 60.0


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` between processes (created, with its folder, when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(folder: Path, *, min_age_s: float = LEFTOVER_MIN_AGE_S) -> list[Path]:
    """Clean up after publishes into ``folder`` that were killed mid-way; the paths acted on.

    A ``.NAME.old-PID-…`` (the previous NAME, moved aside just before the kill) whose process is
    gone is moved back to NAME when NAME is missing (the finished work is not lost), else removed.
    A staged ``.NAME.tmp-PID-…`` whose process is gone and which is older than ``min_age_s`` is
    removed. Entries of live processes (this one included) are left alone. Never raises on a
    file that vanishes meanwhile.
    """
    acted: list[Path] = []
    now = time.time()
    for entry in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        match = _LEFTOVER.match(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            target = entry.with_name(match["name"])
            if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
                os.replace(entry, target)
            elif match["kind"] == "old" or now - entry.lstat().st_mtime >= min_age_s:
                _remove(entry)
            else:
                continue
            acted.append(entry)
    return acted


class DiskFullError(BigModelOpsError, OSError):
    """The file system ran out of space (or quota) while outputs were staged: nothing published."""

    def __str__(self) -> str:
        return str(self.strerror)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: BaseException, targets: tuple[Path, ...]) -> DiskFullError | None:
    if not isinstance(error, OSError) or isinstance(error, DiskFullError) or error.errno not in _DISK_FULL:
        return None
    names = ", ".join(str(t) for t in targets)
    return DiskFullError(
        error.errno,
        f"no space left on the device while writing {names} ({error}); nothing was published and the "
        "previous outputs are intact. Free space and run the stage again.",
    )


@contextlib.contextmanager
def publish(*targets: Path) -> Iterator[Publication]:
    """Stage outputs for ``targets``; commit them when the block ends cleanly, else abort.

    ::

        with publish(out_dir, report) as pub:
            build(pub.staged(out_dir))
            pub.staged(report).write_text(...)

    A full disk (ENOSPC / EDQUOT) while staging or committing becomes :class:`DiskFullError`
    naming the targets, after the staged files are removed.
    """
    publication = Publication(*targets)
    try:
        yield publication
    except BaseException as error:
        publication.abort()
        if (full := _disk_full(error, targets)) is not None:
            raise full from error
        raise
    try:
        publication.commit()
    except BaseException as error:
        publication.abort()
        if (full := _disk_full(error, targets)) is not None:
            raise full from error
        raise


def _swap(staged: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a staged file next to path, then rename it into place."""
    with publish(path) as pub:
        pub.staged(path).write_text(json.dumps(dict(data), indent=2, default=str) + "\n")


def short_hash(value: Any, *, length: int = 12) -> str:
    """sha256 (hex, first ``length`` characters) of a JSON value, key order ignored.

    The one hash the project uses for configurations, params sections and pipeline ids.
    Non-JSON leaves (paths, numpy scalars) are hashed as their ``str``.
    """
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
