"""The one tiny configuration the tests' params builders derive from.

``tiny_params()`` is the repository's params.yaml made small and fast on one CPU: the ``tiny``
model preset at block 32 and width 32, batch 4, 12 steps, single process, float32, metrics every
2 steps, no system metrics. The test helpers (``helpers_pretrain``, ``helpers_finetune``) add
only what their stages need on top of it, with :func:`merge`, the way lightning-hydra-template's
test configs derive from one base.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from bigmodel_ops.model import ModelConfig, config_from_preset

REPO = Path(__file__).resolve().parents[1]

TINY_PRESET = "tiny"
# Over the preset: the width and context every test model has (the test tokenizers have ~100-200 ids).
TINY_MODEL: dict[str, int] = {"block_size": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
TINY_PROFILE: dict[str, Any] = {
    "model_preset": TINY_PRESET,
    "accelerator": "cpu",
    "devices": 1,
    "precision": "32-true",
    "compile": False,
    "batch_size": 4,
    "max_steps": 12,
    "num_workers": 0,
}


def merge(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{section: value}`` overrides to a params mapping, in place, and return it.

    A dict updates the section (``profiles`` updates the active profile); anything else replaces
    the section.
    """
    for section, values in copy.deepcopy(overrides).items():
        if section == "profiles" and isinstance(values, dict):
            raw["profiles"][raw["profile"]].update(values)
        elif isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def tiny_params(**overrides: Any) -> dict[str, Any]:
    """The tiny params mapping (see the module doc), with ``overrides`` merged in (:func:`merge`)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["project"] = {"name": "tiny-test", "seed": 7}
    raw["tracking"].update({"log_every_n_steps": 2, "system_metrics": False, "flush_interval_s": 0.2})
    raw["profile"] = "cpu"
    raw["profiles"] = {"cpu": dict(TINY_PROFILE)}
    raw["model"] = {"objective": "causal", **TINY_MODEL}
    return merge(raw, overrides)


def tiny_model_config(*, vocab_size: int, objective: str) -> ModelConfig:
    """The model the tiny params describe, for tests that build one without the pretrain stage."""
    return config_from_preset(TINY_PRESET, vocab_size=vocab_size, objective=objective, **TINY_MODEL)
