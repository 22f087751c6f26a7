"""Choosing the checkpoint to resume from, and refusing incompatible ones.

Lightning writes checkpoints through an fsspec transaction (a temporary file renamed into
place), and our last.ckpt is an atomic hard link, so a kill should never leave a torn file
behind. We still verify: every candidate is opened with ``torch.load(weights_only=True,
mmap=True)`` (cheap, and never unpickles arbitrary objects) and the newest one that loads
and carries our metadata wins; a corrupt newest file falls back to an older one with a
warning instead of crashing or, worse, silently starting from scratch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.fsutil import short_hash
from bigmodel_ops.pretraining.lm_module import CHECKPOINT_FORMAT, CHECKPOINT_KEY

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    global_step: int
    meta: dict[str, Any]  # checkpoint["bigmodel_ops"]["meta"]: run id, data fingerprint, ...
    model_config: dict[str, Any]


def read_checkpoint_header(path: Path) -> tuple[int, dict[str, Any]] | None:
    """(global_step, our checkpoint section) of a checkpoint, or None if it cannot be loaded.

    A file that loads but lacks our section (another program's checkpoint) raises
    CheckpointError: resuming from it, or ignoring it, would both be wrong.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not loadable"
        _logger.warning(
            "%s: checkpoint cannot be loaded (%s: %s); skipping it", path, type(error).__name__, error
        )
        return None
    if not isinstance(data, dict) or "state_dict" not in data or "global_step" not in data:
        _logger.warning("%s: not a Lightning checkpoint; skipping it", path)
        return None
    ours = data.get(CHECKPOINT_KEY)
    if not isinstance(ours, dict) or ours.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a bigmodel_ops pretraining checkpoint (no {CHECKPOINT_KEY!r} section of format "
            f"{CHECKPOINT_FORMAT!r}); move it out of {path.parent} or delete that folder to start over"
        )
    return int(data["global_step"]), ours


def find_resume_point(directory: Path | str) -> ResumePoint | None:
    """The newest loadable checkpoint in directory (last.ckpt preferred on a tie), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("*.ckpt") if p.is_file()]
    found: list[tuple[int, int, Path, dict[str, Any]]] = []
    for path in candidates:
        header = read_checkpoint_header(path)
        if header is not None:
            step, ours = header
            found.append((step, 1 if path.name == "last.ckpt" else 0, path, ours))
    if not found:
        if candidates:
            _logger.warning(
                "%s: no loadable checkpoint among %d file(s); starting from scratch",
                directory,
                len(candidates),
            )
        return None
    step, _, path, ours = max(found, key=lambda item: (item[0], item[1]))
    if len(found) < len(candidates):
        _logger.warning("resuming from %s (step %d), the newest loadable checkpoint", path, step)
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
    header = read_checkpoint_header(path)
    if header is None:
        raise CheckpointError(f"{path}: checkpoint named by pretrain.resume_from cannot be loaded")
    step, ours = header
    return ResumePoint(
        path=path, global_step=step, meta=dict(ours.get("meta", {})), model_config=ours["model_config"]
    )


def other_configurations(root: Path, current: Path) -> list[Path]:
    """Checkpoint folders of other configurations under root (kept for reference, never resumed)."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("config-*") if p != current and any(p.glob("*.ckpt")))
