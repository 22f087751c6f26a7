"""The pretrained model folder, written from the final Lightning checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from bigmodel_ops.contract import TOKENIZER_FILE
from bigmodel_ops.fsutil import publish
from bigmodel_ops.model import ModelConfig, TransformerLM, save_pretrained


def export_from_checkpoint(
    checkpoint: Path, *, config: ModelConfig, target: Path, tokenizer_file: Path, extra: dict[str, Any]
) -> None:
    """Write model.safetensors + config.json + tokenizer.json from a Lightning checkpoint.

    Reading the weights back from the final checkpoint gives one code path for every
    strategy (single device, DDP, FSDP with full state dicts) and guarantees that the
    export is exactly the state a resume would continue from. The folder is published
    atomically: a failure leaves the previous export.
    """
    data = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    state = {k.removeprefix("model."): v for k, v in data["state_dict"].items() if k.startswith("model.")}
    model = TransformerLM(config)
    model.load_state_dict(state, strict=True)
    with publish(target) as pub:
        folder = pub.staged(target)
        folder.mkdir()
        save_pretrained(model, folder, extra=extra)
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
