"""Choosing the checkpoint to resume from, and refusing incompatible ones.

Checkpoints are written to a temporary file beside their final name and renamed into place
(:class:`bigmodel_ops.pretraining.callbacks.AtomicCheckpointIO`), and our last.ckpt is an atomic
hard link, so a kill or a full disk should never leave a torn file behind. We still verify:
every candidate is opened with ``torch.load(weights_only=True, mmap=True)`` (cheap, and never
unpickles arbitrary objects: a planted pickle is refused, not run) and the newest one that
loads and carries our metadata wins. A corrupt file is named in a warning; the stage falls back
to the newest valid checkpoint only if there is one, and says so; when every checkpoint of the
folder is corrupt it stops with a CheckpointError naming them, never restarting from scratch.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.fsutil import sha256_file, short_hash
from bigmodel_ops.pretraining.lm_module import CHECKPOINT_FORMAT, CHECKPOINT_KEY

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    global_step: int
    meta: dict[str, Any]  # checkpoint["bigmodel_ops"]["meta"]: run id, data fingerprint, ...
    model_config: dict[str, Any]


def read_checkpoint_header(path: Path) -> tuple[int, dict[str, Any]] | None:
    """(global_step, our checkpoint section) of a checkpoint, or None if it cannot be loaded
    (the reason is logged as a warning naming the file; :func:`checkpoint_problem` returns it).

    A file that loads but lacks our section (another program's checkpoint) raises
    CheckpointError: resuming from it, or ignoring it, would both be wrong.
    """
    header, problem = _read_header(path)
    if problem is not None:
        _logger.warning("%s: %s; skipping it", path, problem)
    return header


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint (None: it loads and is one of ours)."""
    return _read_header(path)[1]


def _read_header(path: Path) -> tuple[tuple[int, dict[str, Any]] | None, str | None]:
    # The sha256 written beside it catches what loading cannot (flipped bytes inside a tensor).
    digest = Path(f"{path}.sha256")
    if digest.is_file():
        try:
            expected = digest.read_text().split()[0]
        except (OSError, IndexError, UnicodeDecodeError) as error:
            return None, f"unreadable checksum file {digest.name} ({error})"
        actual = sha256_file(path)
        if actual != expected:
            return (
                None,
                f"corrupt or truncated checkpoint: its sha256 {actual[:12]}... does not match {digest.name} ({expected[:12]}...)",
            )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, (
            "refused: not a weights-only checkpoint (it holds pickled objects, which are never loaded: "
            f"{first})"
        )
    except Exception as error:  # noqa: BLE001 - any failure means "not loadable"
        return None, f"corrupt or truncated checkpoint ({type(error).__name__}: {error})"
    if not isinstance(data, dict) or "state_dict" not in data or "global_step" not in data:
        return None, "not a Lightning checkpoint"
    ours = data.get(CHECKPOINT_KEY)
    if not isinstance(ours, dict) or ours.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a bigmodel_ops pretraining checkpoint (no {CHECKPOINT_KEY!r} section of format "
            f"{CHECKPOINT_FORMAT!r}); move it out of {path.parent} or delete that folder to start over"
        )
    return (int(data["global_step"]), ours), None


def find_resume_point(directory: Path | str) -> ResumePoint | None:
    """The newest valid checkpoint in directory (last.ckpt preferred on a tie), or None if the
    folder holds no checkpoint at all.

    Every corrupt, truncated or refused file is named in a warning. If valid ones remain, the
    newest is used and a warning says that it is a fallback; if none is valid, CheckpointError
    names each file and why (pretraining never restarts from scratch on its own).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(p for p in directory.glob("*.ckpt") if p.is_file())
    found: list[tuple[int, int, Path, dict[str, Any]]] = []
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        header, problem = _read_header(path)
        if header is None:
            _logger.warning("%s: %s", path, problem)
            bad.append((path, str(problem)))
        else:
            step, ours = header
            found.append((step, 1 if path.name == "last.ckpt" else 0, path, ours))
    if not found:
        if bad:
            listing = "\n  - ".join(f"{path}: {problem}" for path, problem in bad)
            raise CheckpointError(
                f"{directory}: no valid checkpoint to resume from:\n  - {listing}\n"
                "Pretraining does not restart from scratch on its own: restore a good checkpoint into "
                f"that folder, name one with pretrain.resume_from, or delete {directory} to start over."
            )
        return None
    step, _, path, ours = max(found, key=lambda item: (item[0], item[1]))
    if bad:
        _logger.warning(
            "falling back to %s (step %d), the newest valid checkpoint; not usable: %s",
            path,
            step,
            ", ".join(str(p) for p, _ in bad),
        )
    return ResumePoint(
        path=path, global_step=step, meta=dict(ours.get("meta", {})), model_config=ours["model_config"]
    )


def check_compatible(
    point: ResumePoint, *, model_config: dict[str, Any], fingerprint: dict[str, Any]
) -> None:
    """CheckpointError naming every field where the checkpoint differs from the current setup.

    model_config: the ModelConfig the params give now. fingerprint: everything else that
    fixes the data order and the optimisation (batch size, accumulation, sampling, seed,
    device count, tokenizer). The budget (max_steps / max_tokens) may change freely.
    """
    problems = [
        f"model.{key}: checkpoint {point.model_config.get(key)!r}, params {value!r}"
        for key, value in model_config.items()
        if point.model_config.get(key) != value
    ]
    stored = point.meta.get("fingerprint", {})
    problems += [
        f"{key}: checkpoint {stored.get(key)!r}, now {value!r}"
        for key, value in fingerprint.items()
        if key in stored and stored[key] != value
    ]
    if problems:
        raise CheckpointError(
            f"{point.path}: checkpoint (step {point.global_step}) was made with a different configuration:\n  - "
            + "\n  - ".join(problems)
            + f"\nRestore the params it was trained with, or delete {point.path.parent} to start "
            "pretraining from scratch (it will not restart silently)."
        )


def checkpoint_dir(root: Path, identity: dict[str, Any]) -> Path:
    """The checkpoint folder of one training configuration: `root/config-<hash of identity>`.

    identity holds everything that makes a checkpoint meaningful to continue (model config,
    data order, optimisation settings) but not the budget, so raising max_steps continues
    the same folder while `dvc exp run -S pretrain.lr=...` trains afresh in its own folder
    instead of resuming a run made with other settings. Other folders are kept, never deleted.
    """
    return Path(root) / f"config-{short_hash(identity)}"


def resume_point_from_file(path: Path | str) -> ResumePoint:
    """The resume point of an explicitly named checkpoint; CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint named by pretrain.resume_from does not exist")
    header, problem = _read_header(path)
    if header is None:
        raise CheckpointError(f"{path}: checkpoint named by pretrain.resume_from cannot be used: {problem}")
    step, ours = header
    return ResumePoint(
        path=path, global_step=step, meta=dict(ours.get("meta", {})), model_config=ours["model_config"]
    )


def other_configurations(root: Path, current: Path) -> list[Path]:
    """Checkpoint folders of other configurations under root (kept for reference, never resumed)."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("config-*") if p != current and any(p.glob("*.ckpt")))
