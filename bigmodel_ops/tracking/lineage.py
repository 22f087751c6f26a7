"""Lineage tags (all prefixed ``bigmodel_ops.``) for every MLflow run started in a project.

MLflow loads :class:`LineageContextProvider` through the ``mlflow.run_context_provider`` entry
point, so ``mlflow.start_run()`` in a user's script gets the tags our stage runs get. The project
root is ``$DVC_ROOT`` (set by DVC for each stage command), else the nearest directory up that
holds ``dvc.yaml`` and ``params.yaml``; outside a project the provider adds nothing. Tags:
``git_commit``, ``git_dirty`` (untracked files do not count), ``stage`` (``$DVC_STAGE``, else
what ``stage_run`` announced), ``params_hash`` (of the sections the stage lists in dvc.yaml),
``params_hash_all``, ``pipeline_id`` (commit + dirty flag + all params: one pipeline version),
``version``, ``host``, and ``dep.<path>``: each dependency's data version, the md5 of the stage
output producing it in dvc.lock, else of ``<path>.dvc``, else this stage's last dvc.lock entry.
The params hashed are those the stage runs with; the plugin, which has none, reads params.yaml.
Files are re-read only when their (mtime, size) change. A failure warns and keeps the tags
computed so far: lineage never stops a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import re
import socket
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from bigmodel_ops.fsutil import short_hash

_logger = logging.getLogger(__name__)

PREFIX = "bigmodel_ops."
# Set by stage_run so that a run created outside DVC still knows its stage.
current_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("bigmodel_ops_stage", default=None)
_TAG_CHARS = re.compile(r"[^\w./\- :]")


class LineageWarning(UserWarning):
    """Lineage could not be (fully) computed; the run continues without some tags."""


def find_project_root() -> Path | None:
    """The project root by the rule in the module docstring, or None outside a project."""
    env_root = os.environ.get("DVC_ROOT")
    here = Path.cwd().resolve()
    candidates = ([Path(env_root).resolve()] if env_root else []) + [here, *here.parents]
    return next((p for p in candidates if (p / "dvc.yaml").is_file() and (p / "params.yaml").is_file()), None)


def read_yaml(path: Path) -> Any:
    """The parsed file (None when missing), cached until its (mtime, size) change."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _read_yaml_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_yaml_cached(path: str, _mtime: int, _size: int) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not valid YAML ({first})") from None


def git_info(root: Path) -> tuple[str, bool | None]:
    """(commit sha or "none", dirty flag or None when unknown), asked of git on every call: an
    edit to a tracked file changes neither HEAD nor the index until ``git status`` refreshes it,
    so no file stamp can say when a cached answer went stale."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return ("none", None)
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ("none", None)
    return (commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None)


def _stage_spec(dvc_yaml: Any, stage: str) -> dict[str, Any]:
    stages = (dvc_yaml or {}).get("stages") or {}
    return stages.get(stage) or stages.get(stage.split("@", 1)[0]) or {}  # foreach: name@item


def stage_param_keys(dvc_yaml: Any, stage: str) -> list[str]:
    """The params.yaml keys a stage depends on: its dvc.yaml ``params:`` entries, each a key
    (``project``, dotted ``tune.n_trials``) or ``{file: [keys]}`` (only params.yaml counts)."""
    keys: list[str] = []
    for entry in _stage_spec(dvc_yaml, stage).get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, names in entry.items():
                if Path(str(file)).name == "params.yaml":
                    keys.extend(str(n) for n in names or [])
    return keys


def _pick(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def params_hash(params: Mapping[str, Any] | None, keys: list[str] | None) -> str:
    """Hash of the named (dotted) keys of the params; of all of them when keys is None."""
    data = dict(params or {})
    return short_hash(data if keys is None else {key: _pick(data, key) for key in sorted(set(keys))})


def stage_params(params: Mapping[str, Any], root: Path | None, stage: str) -> dict[str, Any]:
    """The params sections a stage depends on (its dvc.yaml ``params:``); all when unknown."""
    keys: list[str] = []
    with contextlib.suppress(Exception):
        keys = stage_param_keys(read_yaml(root / "dvc.yaml"), stage) if root is not None else []
    if not keys:
        return dict(params)
    picked: dict[str, Any] = {}
    for key in keys:
        if (value := _pick(params, key)) is not None:
            *parents, last = key.split(".")
            node = picked
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return picked


def pipeline_id(commit: str, dirty: bool | None, all_params_hash: str) -> str:
    """One id per pipeline version: code (commit + dirty flag) and all params."""
    return hashlib.sha256(f"{commit}:{dirty}:{all_params_hash}".encode()).hexdigest()[:12]


def _dep_hash(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    return next((str(entry[algo]) for algo in ("md5", "etag", "checksum") if entry.get(algo)), None)


def dep_versions(root: Path, dvc_yaml: Any, lock: Any, stage: str) -> dict[str, str]:
    """{dep path: DVC hash} for a stage, resolved as the module docstring says."""
    lock_stages = (lock or {}).get("stages") or {}
    outs = [out for name, entry in lock_stages.items() if name != stage for out in entry.get("outs") or []]
    produced = {_norm(out["path"]): h for out in outs if (h := _dep_hash(out)) and out.get("path")}
    own_deps = (lock_stages.get(stage) or {}).get("deps") or []
    own = {_norm(dep["path"]): h for dep in own_deps if (h := _dep_hash(dep)) and dep.get("path")}
    versions = {}
    for dep in (_norm(str(d)) for d in _stage_spec(dvc_yaml, stage).get("deps") or []):
        if value := produced.get(dep) or _dvc_file_hash(root, dep) or own.get(dep):
            versions[dep] = value
    return versions


def _dvc_file_hash(root: Path, dep: str) -> str | None:
    dvc_file = root / f"{dep}.dvc"
    outs = ((read_yaml(dvc_file) or {}).get("outs") or []) if dvc_file.is_file() else []
    return next((h for out in outs if (h := _dep_hash(out))), None)


def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def tag_key(name: str) -> str:
    """A valid MLflow tag key from an arbitrary path-like name."""
    cleaned = _TAG_CHARS.sub("_", name).strip("/")
    cleaned = os.path.normpath(cleaned) if cleaned else "_"
    return cleaned.lstrip("./") or "_"


def lineage_tags(
    *,
    stage: str | None = None,
    root: Path | None = None,
    params: Mapping[str, Any] | None = None,
    into: dict[str, str] | None = None,
) -> dict[str, str]:
    """Compute the lineage tags (see module docstring). Raises on broken project files.

    ``params``: the params the run uses (JSON-able); None reads ``<root>/params.yaml``. Tags
    are added to ``into`` as they are computed, so a caller that catches the error keeps the
    ones computed before the failure.
    """
    from bigmodel_ops import __version__

    tags: dict[str, str] = {} if into is None else into
    root = root or find_project_root()
    if root is None:
        return tags
    stage = stage or os.environ.get("DVC_STAGE") or current_stage.get()
    tags.update({PREFIX + "version": __version__, PREFIX + "host": socket.gethostname()})
    if stage is not None:
        tags[PREFIX + "stage"] = stage
    commit, dirty = git_info(root)
    tags[PREFIX + "git_commit"] = commit
    tags[PREFIX + "git_dirty"] = "unknown" if dirty is None else str(dirty).lower()
    if params is None:
        params = read_yaml(root / "params.yaml")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{root / 'params.yaml'}: the top level must be a mapping")
    all_hash = tags[PREFIX + "params_hash_all"] = params_hash(params, None)
    tags[PREFIX + "pipeline_id"] = pipeline_id(commit, dirty, all_hash)
    if stage is None:
        tags[PREFIX + "params_hash"] = all_hash
        return tags
    # Partial results survive a broken dvc.yaml/dvc.lock: the tags above are already set.
    dvc_yaml = read_yaml(root / "dvc.yaml")
    if not isinstance(dvc_yaml, dict):
        raise ValueError(f"{root / 'dvc.yaml'}: not a mapping of stages")
    keys = stage_param_keys(dvc_yaml, stage)
    tags[PREFIX + "params_hash"] = params_hash(params, keys) if keys else all_hash
    lock_path = root / "dvc.lock"
    lock = read_yaml(lock_path) if lock_path.is_file() else None
    if lock is not None and not isinstance(lock, dict):
        raise ValueError(f"{lock_path}: not a DVC lock file (top level is not a mapping)")
    for path, value in dep_versions(root, dvc_yaml, lock, stage).items():
        tags[PREFIX + "dep." + tag_key(path)] = value
    return tags


def safe_lineage_tags(
    *, stage: str | None = None, root: Path | None = None, params: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """lineage_tags that never raises: on failure warn and return what could be computed."""
    tags: dict[str, str] = {}
    try:
        lineage_tags(stage=stage, root=root, params=params, into=tags)
    except Exception as error:  # lineage must never stop a run
        message = f"bigmodel_ops lineage tags incomplete: {type(error).__name__}: {error}"
        warnings.warn(message, LineageWarning, stacklevel=2)
        _logger.warning(message)
        tags[PREFIX + "lineage_error"] = f"{type(error).__name__}: {error}"[:500]
    return tags


class LineageContextProvider:
    """MLflow run context provider (entry point ``mlflow.run_context_provider``)."""

    def in_context(self) -> bool:
        try:
            return find_project_root() is not None
        except Exception:  # noqa: BLE001 - a provider must never stop a run
            return False

    def tags(self) -> dict[str, str]:
        try:
            return safe_lineage_tags()
        except Exception as error:  # noqa: BLE001 - never stop a run, and record why tags are missing
            # MLflow would swallow it with a log line only; the run itself must say so.
            _logger.warning("bigmodel_ops lineage plugin failed: %s: %s", type(error).__name__, error)
            return {PREFIX + "lineage_error": f"{type(error).__name__}: {error}"[:500]}
