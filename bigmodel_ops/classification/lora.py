"""LoRA fine-tuning through ``peft`` (``finetune.method: lora``).

peft wraps our plain ``nn.Module`` classifier (:class:`~.model.SequenceClassifier`) directly:
``LoraConfig(target_modules=[...])`` + ``get_peft_model`` replace the named ``nn.Linear`` layers of
the backbone's blocks with LoRA layers and freeze everything else; the classification head is then
made trainable again (it is new, so it must learn). At export :func:`merge_lora` folds the adapters
into the weights (``merge_and_unload``): what is saved, registered and served is one plain
:class:`~.model.SequenceClassifier` with the same state-dict keys as full fine-tuning.

Target modules are names of the backbone blocks' Linear layers: ``attn.qkv`` / ``attn.proj`` (self
attention) and ``mlp.fc`` / ``mlp.proj`` (MLP), or any dotted suffix of a layer's full name (``qkv``,
``proj`` = both projections, ``blocks.3.mlp.fc`` = one layer). Each entry must match at least one
layer (:func:`resolve_targets`), checked before any training.

peft is imported only here and only when LoRA is used (it pulls in ``transformers``: seconds of
import time); the served model never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from bigmodel_ops.errors import ConfigError

TARGETS_SETTING = "finetune.lora.target_modules"
# The default of finetune.lora.target_modules (HyperParams.lora_target_modules).
DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def linear_layers(model: nn.Module) -> list[str]:
    """Full names of the Linear layers inside the transformer blocks (what LoRA may target)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".blocks." in f".{name}"
    ]


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the block Linear layers the targets name (a name matches a target when
    it equals it or ends with ``.<target>``). ConfigError naming ``finetune.lora.target_modules``
    when the list is empty or an entry matches no layer."""
    names = linear_layers(model)
    if not targets:
        raise ConfigError(f"{TARGETS_SETTING} is empty: name at least one layer (e.g. attn.qkv)")
    matched: list[str] = []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            kinds = sorted({".".join(n.split(".")[-2:]) for n in names})
            raise ConfigError(
                f"{TARGETS_SETTING}: {target!r} matches no Linear layer of the backbone's blocks "
                f"(valid names: {', '.join(kinds)}, or a suffix of a full name such as "
                f"{names[0] if names else 'blocks.0.attn.qkv'!r})"
            )
        matched.extend(n for n in hits if n not in matched)
    return matched


def apply_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]
) -> nn.Module:
    """Wrap model with LoRA adapters on the target layers (peft); the head stays trainable.

    Returns the ``PeftModel``: it is called like the model itself (``model(idx, lengths)``).
    """
    names = resolve_targets(model, targets)  # before importing peft: a bad target fails fast
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=names, bias="none"
    )
    wrapped = get_peft_model(model, config)
    # peft freezes every non-adapter weight; the classification head is new and must train.
    model.head.requires_grad_(True)
    return wrapped


def is_lora(model: nn.Module) -> bool:
    return type(model).__name__ == "PeftModel" or hasattr(model, "merge_and_unload")


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters merged into its weights (a no-op without adapters)."""
    if not is_lora(model):
        return model
    return model.merge_and_unload()
