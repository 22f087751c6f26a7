"""Which parameters train, and how fast: per-layer AdamW groups, the LR schedule, freezing.

:func:`optimizer_groups` splits the trainable parameters by layer (:func:`layer_of`: head, blocks,
embeddings, final norm) and by weight decay, with the head's LR multiplier and layer-wise LR decay;
:func:`linear_warmup_decay` is the schedule; :func:`freeze` stops the gradients of the backbone or
of its first blocks. Used by :class:`~.training.ClassifierModule` and :func:`~.training.prepare_model`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:wte|wpe)\.")
_HEAD = re.compile(r"(?:^|\.)head\.")


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear ramp over warmup_steps (never 0 at step 0), then linear decay to 0."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def layer_of(name: str, n_layer: int) -> tuple[str, int | None]:
    """(group, depth) of a parameter name: ("head", None), ("top", 0) for ln_f / lm_head,
    ("block<i>", n_layer - i) and ("embeddings", n_layer + 1); depth is the LLRD exponent."""
    if _HEAD.search(name) and ".backbone." not in f".{name}":
        return "head", None
    match = _BLOCK.search(name)
    if match:
        i = int(match.group(1))
        return f"block{i}", n_layer - i
    if _EMBEDDING.search(name):
        return "embeddings", n_layer + 1
    return "top", 0


def optimizer_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 1.0,
    layer_lr_decay: float = 1.0,
    n_layer: int,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, by layer and by decay.

    LR: the head gets ``lr * head_lr_mult``; layer-wise decay gives block i
    ``lr * layer_lr_decay ** (n_layer - i)``, the embeddings ``lr * layer_lr_decay ** (n_layer + 1)``
    and the final norm ``lr``. Weight decay applies to the matrices of Linear layers (adapters
    included), never to norms, biases or embeddings (as in :func:`bigmodel_ops.model.parameter_groups`).
    Groups are named ``<layer>/<decay|no_decay>``; the first is the base-LR group when present.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings
    }
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():  # yields each shared tensor once
        if not param.requires_grad:
            continue
        layer, depth = layer_of(name, n_layer)
        scale = head_lr_mult if depth is None else layer_lr_decay**depth
        decays = id(param) in decay_ids
        key = f"{layer}/{'decay' if decays else 'no_decay'}"
        group = groups.setdefault(
            key,
            {"name": key, "params": [], "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0},
        )
        group["params"].append(param)

    def order(key: str) -> tuple[int, int]:
        layer = key.split("/")[0]
        if layer == "top":
            return (0, 0)
        if layer.startswith("block"):
            return (1, -int(layer[5:]))
        return (2, 0) if layer == "embeddings" else (3, 0)

    return [groups[k] for k in sorted(groups, key=order)]


def freeze(model: nn.Module, *, freeze_backbone: bool, freeze_layers: int) -> None:
    """Stop gradients: the whole backbone, or its embeddings and first ``freeze_layers`` blocks
    (LoRA adapters in those blocks included). The head always trains."""
    if not freeze_backbone and not freeze_layers:
        return
    for name, param in model.named_parameters():
        if not (name.startswith("backbone.") or ".backbone." in name):
            continue
        if freeze_backbone or _EMBEDDING.search(name):
            param.requires_grad_(False)
            continue
        match = _BLOCK.search(name)
        if match and int(match.group(1)) < freeze_layers:
            param.requires_grad_(False)
