"""Lineage tags for every MLflow run started inside a bigmodel_ops project.

MLflow loads :class:`LineageContextProvider` through the ``mlflow.run_context_provider``
entry point, so ``mlflow.start_run()`` in a user's own script gets the same tags as our
stage runs (``stage_run`` resolves context tags explicitly, because ``MlflowClient.create_run``
does not).

Project rule: the project root is ``$DVC_ROOT`` when DVC runs the command (DVC 3 sets
``DVC_ROOT`` and ``DVC_STAGE`` for every stage command), otherwise the current directory or the
nearest parent that holds both ``dvc.yaml`` and ``params.yaml``. Outside a project the provider
is not in context and adds nothing.

Tags (all prefixed ``bigmodel_ops.``):

- ``git_commit``, ``git_dirty`` ("true"/"false"; untracked files do not count), or
  ``git_commit = none`` outside a git repository;
- ``stage``: ``$DVC_STAGE`` under DVC, else the stage a ``stage_run`` announced (absent in a plain
  user script);
- ``params_hash``: sha256 (12 hex) of the params sections the stage lists under ``params:`` in
  dvc.yaml (all of them when no stage is known); ``params_hash_all``: of all params. The params
  are those the stage runs with (validated, as ``stage_run`` is given them); the plugin, which
  has none, reads ``<root>/params.yaml``;
- ``pipeline_id``: sha256 (12 hex) of git commit + dirty flag + ``params_hash_all``; one pipeline
  version = one id = one parent run (see pipeline.py);
- ``dep.<path>``: for each dependency of the stage, its DVC hash (the data version): the md5 of
  the stage output that produces it, read from dvc.lock (current, because the producing stage
  completed before this one started), else from ``<path>.dvc`` (data added with ``dvc add``),
  else the md5 dvc.lock recorded for this stage's previous completed run (DVC rewrites dvc.lock
  only after a stage finishes, so this one may lag; the git tags cover code). Deps with no
  recorded hash get no tag;
- ``version`` (the package), ``host``.

Edge cases: everything is cached per process, keyed on the files' (mtime, size), so a run costs
a few ``stat`` calls after the first. Any failure (corrupt dvc.lock, missing git, unreadable
YAML) is reported with a warning and the run starts with whatever tags could be computed:
lineage must never stop a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
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

_logger = logging.getLogger(__name__)

PREFIX = "bigmodel_ops."
# Set by stage_run so that a run created outside DVC still knows its stage.
current_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("bigmodel_ops_stage", default=None)

_TAG_CHARS = re.compile(r"[^\w./\- :]")


class LineageWarning(UserWarning):
    """Lineage could not be (fully) computed; the run continues without some tags."""


def find_project_root(start: Path | None = None) -> Path | None:
    """The project root by the rule in the module docstring, or None outside a project."""
    env_root = os.environ.get("DVC_ROOT")
    if env_root and _is_project(Path(env_root)):
        return Path(env_root).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if _is_project(candidate):
            return candidate
    return None


def _is_project(path: Path) -> bool:
    return (path / "dvc.yaml").is_file() and (path / "params.yaml").is_file()


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_yaml_cached(key: tuple[str, int, int]) -> Any:
    path = Path(key[0])
    if key[1] < 0:
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not valid YAML ({first})") from None


def _read_yaml(path: Path) -> Any:
    return _read_yaml_cached(_file_key(path))


def _git_key(root: Path) -> tuple[str, ...]:
    # HEAD, the index and the checked-out ref change on commit/checkout/add: re-ask git then.
    git_dir = root / ".git"
    parts = [str(root)]
    for name in ("HEAD", "index"):
        parts.append(repr(_file_key(git_dir / name)[1:]))
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            parts.append(repr(_file_key(git_dir / head[5:])[1:]))
    except OSError:
        pass
    return tuple(parts)


@functools.lru_cache(maxsize=16)
def _git_info_cached(key: tuple[str, ...]) -> tuple[str, bool | None]:
    root = key[0]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ("none", None)
    if commit.returncode != 0:
        return ("none", None)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return (commit.stdout.strip(), dirty)


def git_info(root: Path) -> tuple[str, bool | None]:
    """(commit sha or "none", dirty flag or None when unknown)."""
    return _git_info_cached(_git_key(root))


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_param_keys(dvc_yaml: Any, stage: str) -> list[str]:
    """Top-level params.yaml keys a stage depends on (dvc.yaml `params:`; other files are ignored).

    Entries are either a key (``project``, or dotted ``tune.n_trials``) or a mapping
    ``{file: [keys]}``; only keys of params.yaml count.
    """
    stages = (dvc_yaml or {}).get("stages") or {}
    base = stage.split("@", 1)[0]  # foreach stages are addressed as name@item
    spec = stages.get(stage) or stages.get(base) or {}
    keys: list[str] = []
    for entry in spec.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, names in entry.items():
                if Path(str(file)).name == "params.yaml":
                    keys.extend(str(n) for n in names or [])
    return keys


def _pick(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def params_hash(params_data: Mapping[str, Any] | None, keys: list[str] | None) -> str:
    """Hash of the named (dotted) keys of the params; of all of them when keys is None."""
    data = dict(params_data or {})
    if keys is None:
        return _hash(data)
    return _hash({key: _pick(data, key) for key in sorted(set(keys))})


def stage_params(params: Mapping[str, Any], root: Path | None, stage: str) -> dict[str, Any]:
    """The params sections a stage depends on (its dvc.yaml ``params:``); all when unknown."""
    keys: list[str] = []
    if root is not None:
        with contextlib.suppress(Exception):
            keys = stage_param_keys(_read_yaml(root / "dvc.yaml"), stage)
    if not keys:
        return dict(params)
    picked: dict[str, Any] = {}
    for key in keys:
        value = _pick(dict(params), key)
        if value is not None:
            *parents, last = key.split(".")
            node = picked
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return picked


def pipeline_id(commit: str, dirty: bool | None, all_params_hash: str) -> str:
    """One id per pipeline version: code (commit + dirty flag) and the whole params file."""
    return hashlib.sha256(f"{commit}:{dirty}:{all_params_hash}".encode()).hexdigest()[:12]


def _dep_hash(entry: dict[str, Any]) -> str | None:
    for algo in ("md5", "etag", "checksum"):
        if entry.get(algo):
            return str(entry[algo])
    return None


def dep_versions(root: Path, dvc_yaml: Any, lock: Any, stage: str) -> dict[str, str]:
    """{dep path: DVC hash} for a stage, resolved as the module docstring says."""
    stages = (dvc_yaml or {}).get("stages") or {}
    spec = stages.get(stage) or stages.get(stage.split("@", 1)[0]) or {}
    deps = [str(d) for d in spec.get("deps") or []]
    lock_stages = (lock or {}).get("stages") or {}
    produced: dict[str, str] = {}
    for name, entry in lock_stages.items():
        if name == stage:
            continue
        for out in entry.get("outs") or []:
            if isinstance(out, dict) and out.get("path") and _dep_hash(out):
                produced[_norm(out["path"])] = _dep_hash(out)  # type: ignore[assignment]
    own: dict[str, str] = {}
    for dep in (lock_stages.get(stage) or {}).get("deps") or []:
        if isinstance(dep, dict) and dep.get("path") and _dep_hash(dep):
            own[_norm(dep["path"])] = _dep_hash(dep)  # type: ignore[assignment]
    versions: dict[str, str] = {}
    for dep in deps:
        key = _norm(dep)
        value = produced.get(key) or _dvc_file_hash(root, key) or own.get(key)
        if value:
            versions[key] = value
    return versions


def _dvc_file_hash(root: Path, dep: str) -> str | None:
    dvc_file = root / f"{dep}.dvc"
    if not dvc_file.is_file():
        return None
    data = _read_yaml(dvc_file) or {}
    for out in data.get("outs") or []:
        if isinstance(out, dict) and _dep_hash(out):
            return _dep_hash(out)
    return None


def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def tag_key(name: str) -> str:
    """A valid MLflow tag key from an arbitrary path-like name."""
    cleaned = _TAG_CHARS.sub("_", name).strip("/")
    cleaned = os.path.normpath(cleaned) if cleaned else "_"
    return cleaned.lstrip("./") or "_"


def _package_version() -> str:
    from bigmodel_ops import __version__

    return __version__


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
    tags: dict[str, str] = {} if into is None else into
    root = root or find_project_root()
    if root is None:
        return tags
    stage = stage or os.environ.get("DVC_STAGE") or current_stage.get()
    tags[PREFIX + "version"] = _package_version()
    tags[PREFIX + "host"] = socket.gethostname()
    if stage is not None:
        tags[PREFIX + "stage"] = stage
    commit, dirty = git_info(root)
    tags[PREFIX + "git_commit"] = commit
    tags[PREFIX + "git_dirty"] = "unknown" if dirty is None else str(dirty).lower()
    params_data = dict(params) if params is not None else _read_yaml(root / "params.yaml")
    if params_data is not None and not isinstance(params_data, dict):
        raise ValueError(f"{root / 'params.yaml'}: the top level must be a mapping")
    all_hash = params_hash(params_data, None)
    tags[PREFIX + "params_hash_all"] = all_hash
    tags[PREFIX + "pipeline_id"] = pipeline_id(commit, dirty, all_hash)
    if stage is None:
        tags[PREFIX + "params_hash"] = all_hash
        return tags
    # Partial results survive a broken dvc.yaml/dvc.lock: the tags above are already set.
    dvc_yaml = _read_yaml(root / "dvc.yaml")
    if not isinstance(dvc_yaml, dict):
        raise ValueError(f"{root / 'dvc.yaml'}: not a mapping of stages")
    keys = stage_param_keys(dvc_yaml, stage)
    tags[PREFIX + "params_hash"] = params_hash(params_data, keys) if keys else all_hash
    lock_path = root / "dvc.lock"
    lock = _read_yaml(lock_path) if lock_path.is_file() else None
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
        return safe_lineage_tags()
