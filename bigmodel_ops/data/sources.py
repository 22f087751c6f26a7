"""The input of the prepare stage: which files a ``prepare.source`` names, and their batches.

One job: resolve and check the configured paths up front (:func:`plan_sources`, a
:class:`SourcePlan`), then stream every batch of the source, followed by those of the extra
unlabeled files (:func:`iter_source`), through the readers of :mod:`bigmodel_ops.data.readers`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_ops.config import PrepareParams, SourceParams
from bigmodel_ops.data.readers import (
    RawBatch,
    check_encoding,
    read_aclimdb,
    read_csv,
    read_hf,
    read_jsonl,
    read_parquet,
    read_text_lines,
)
from bigmodel_ops.errors import DataError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourcePlan:
    """The resolved input: every file that will be read, checked to exist up front."""

    source: SourceParams
    files: list[Path]
    unlabeled_files: list[Path]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.source.kind,
            "path": self.source.path,
            "files": len(self.files),
            "text_column": self.source.text_column,
            "label_column": self.source.label_column,
            "unlabeled_path": self.source.unlabeled_path,
            "unlabeled_files": len(self.unlabeled_files),
        }


def expand_path(pattern: str, *, what: str) -> list[Path]:
    """Expand a path or glob into a sorted list of existing files.

    Raises DataError for a missing file or a glob that matches no file.
    """
    if _GLOB_CHARS & set(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{what}: no files match the glob {pattern!r} (cwd: {os.getcwd()})")
        return matches
    path = Path(pattern)
    if path.is_dir():
        raise DataError(f"{what}: {pattern} is a folder, expected a file or a glob (e.g. {pattern}/*.csv)")
    if not path.is_file():
        raise DataError(f"{what}: file not found: {pattern} (cwd: {os.getcwd()})")
    return [path]


def plan_sources(prepare: PrepareParams) -> SourcePlan:
    """Resolve and check the configured paths before any work starts."""
    source = prepare.source
    check_encoding(source.encoding)
    if source.kind in ("csv", "jsonl", "parquet", "text"):
        files = expand_path(source.path, what="prepare.source.path")
    elif source.kind in ("aclimdb", "hf_disk"):
        root = Path(source.path)
        if not root.is_dir():
            raise DataError(f"prepare.source.path: folder not found: {source.path} (cwd: {os.getcwd()})")
        files = [root]
    else:  # hf_hub: resolved by `datasets` (needs a network or its cache)
        files = []
    unlabeled = (
        expand_path(source.unlabeled_path, what="prepare.source.unlabeled_path")
        if source.unlabeled_path
        else []
    )
    return SourcePlan(source=source, files=files, unlabeled_files=unlabeled)


def iter_source(plan: SourcePlan, prepare: PrepareParams) -> Iterator[RawBatch]:
    """Yield every batch of the source, then of the extra unlabeled files."""
    source = plan.source
    chunk = prepare.chunk_rows
    kind = source.kind
    if kind == "csv":
        for path in plan.files:
            yield from read_csv(path, source=source, chunk_rows=chunk)
    elif kind == "jsonl":
        for path in plan.files:
            yield from read_jsonl(path, source=source, chunk_rows=chunk)
    elif kind == "parquet":
        for path in plan.files:
            yield from read_parquet(path, source=source, chunk_rows=chunk)
    elif kind == "text":
        for path in plan.files:
            yield from read_text_lines(path, encoding=source.encoding, chunk_rows=chunk)
    elif kind == "aclimdb":
        yield from read_aclimdb(
            Path(source.path), labels=prepare.labels, encoding=source.encoding, chunk_rows=chunk
        )
    elif kind in ("hf_disk", "hf_hub"):
        yield from read_hf(source, chunk_rows=chunk)
    else:  # pragma: no cover - the schema's Literal makes this unreachable
        raise DataError(f"prepare.source.kind: unsupported kind {kind!r}")
    for path in plan.unlabeled_files:
        yield from read_text_lines(path, encoding=source.encoding, chunk_rows=chunk)
