"""The params.yaml schema.

One pydantic v2 model validates the whole file before any stage does work.
Unknown keys are refused, numbers are range-checked and cross-field rules are
enforced, so a typo fails in milliseconds instead of after an hour of training.
Stages receive the validated params and pass typed sub-objects down; nothing re-reads
params.yaml later (the tracking layer hashes the validated params it is given).

The sections live in submodules (sections, tune, finetune, evaluate, compress); this module
holds the root model, the loading functions and re-exports every public name, so
``from bigmodel_ops.config import X`` is the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from bigmodel_ops.config._base import Fraction, PositiveInt, _Strict
from bigmodel_ops.config.compress import CompressParams
from bigmodel_ops.config.evaluate import (
    EVALUATE_HIGHER_IS_BETTER,
    EVALUATE_LOWER_IS_BETTER,
    EVALUATE_PER_LABEL,
    EVALUATE_PER_LABEL_COUNTS,
    BaselineParams,
    EvaluateParams,
    GateParams,
    evaluate_metric_names,
    metric_key,
)
from bigmodel_ops.config.finetune import LORA_TARGETS, FinetuneParams, LoraParams
from bigmodel_ops.config.sections import (
    DEFAULT_HEADLINE_METRICS,
    PIPELINE_STAGES,
    ModelParams,
    ModelPreset,
    PrepareParams,
    PretrainParams,
    ProjectParams,
    SizingProfile,
    SourceParams,
    SpecialTokens,
    SplitParams,
    TokenizerParams,
    TrackingParams,
)
from bigmodel_ops.config.tune import (
    DEFAULT_SEARCH_SPACE,
    NOT_SEARCHABLE,
    SEARCHABLE,
    Choice,
    Distribution,
    SearchSpace,
    TuneParams,
    check_setting,
    setting_name,
)
from bigmodel_ops.errors import ConfigError

__all__ = [
    "DEFAULT_HEADLINE_METRICS",
    "DEFAULT_PARAMS_PATH",
    "DEFAULT_SEARCH_SPACE",
    "EVALUATE_HIGHER_IS_BETTER",
    "EVALUATE_LOWER_IS_BETTER",
    "EVALUATE_PER_LABEL",
    "EVALUATE_PER_LABEL_COUNTS",
    "LORA_TARGETS",
    "NOT_SEARCHABLE",
    "PIPELINE_STAGES",
    "SEARCHABLE",
    "BaselineParams",
    "Choice",
    "CompressParams",
    "Distribution",
    "EvaluateParams",
    "FinetuneParams",
    "Fraction",
    "GateParams",
    "LoraParams",
    "ModelParams",
    "ModelPreset",
    "Params",
    "PositiveInt",
    "PrepareParams",
    "PretrainParams",
    "ProjectParams",
    "SearchSpace",
    "SizingProfile",
    "SourceParams",
    "SpecialTokens",
    "SplitParams",
    "TokenizerParams",
    "TrackingParams",
    "TuneParams",
    "check_setting",
    "evaluate_metric_names",
    "flatten",
    "load_params",
    "metric_key",
    "parse_params",
    "setting_name",
]

DEFAULT_PARAMS_PATH = Path("params.yaml")


class Params(_Strict):
    project: ProjectParams
    tracking: TrackingParams = TrackingParams()
    prepare: PrepareParams
    tokenizer: TokenizerParams = TokenizerParams()
    # Names the active entry of `profiles`: `dvc exp run -S profile=gpu` switches sizes.
    profile: str = "cpu"
    profiles: dict[str, SizingProfile]
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    tune: TuneParams = TuneParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    compress: CompressParams = CompressParams()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Params:
        if self.profile not in self.profiles:
            raise ValueError(
                f"profile {self.profile!r} is not defined; defined profiles: {sorted(self.profiles)}"
            )
        if len(set(self.tokenizer.special_tokens.as_list())) != 5:
            raise ValueError("tokenizer.special_tokens must be five distinct strings")
        weights = self.finetune.class_weights
        if isinstance(weights, list) and len(weights) != len(self.prepare.labels):
            raise ValueError(
                f"finetune.class_weights has {len(weights)} weight(s) but prepare.labels has "
                f"{len(self.prepare.labels)} labels: give one weight per label, in label order"
            )
        if self.compress.huggingface and self.finetune.truncation == "head_tail":
            raise ValueError(
                "compress.huggingface: true cannot export a classifier with finetune.truncation: "
                "head_tail (a transformers tokenizer keeps one end of a long text only); use head or tail"
            )
        if self.pretrain.task == "electra" and self.model.objective != "masked":
            raise ValueError(
                "pretrain.task: electra needs model.objective: masked (replaced-token detection "
                f"trains a bidirectional backbone); got model.objective: {self.model.objective}"
            )
        if self.finetune.weight_averaging != "none" and self.sizing.strategy == "fsdp":
            raise ValueError(
                f"finetune.weight_averaging: {self.finetune.weight_averaging} keeps a full copy of the "
                f"weights on each device, which strategy fsdp (profile {self.profile!r}) shards; use "
                "strategy ddp or auto, or weight_averaging: none"
            )
        self.evaluate.check_gate_metrics(labels=list(self.prepare.labels))
        return self

    @property
    def sizing(self) -> SizingProfile:
        """The active sizing profile."""
        return self.profiles[self.profile]

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.project.name

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named top-level sections (all when none are named)."""
        from bigmodel_ops.fsutil import short_hash

        data = self.model_dump(mode="json")
        return short_hash({k: data[k] for k in (sections or sorted(data))})


def _format_validation_error(path: Path, error: ValidationError, raw: dict[str, Any]) -> str:
    lines = [f"{path}: invalid parameters ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not in the schema; check the spelling)"
        if item["type"] == "missing":
            lines.append(f"  - {loc}: required field is missing")
            continue
        value = item.get("input")
        shown = json.dumps(value, default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {loc} = {shown}: {message}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], *, source: Path | str = "<params>") -> Params:
    """Validate an already-parsed mapping; raise ConfigError naming each bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(Path(str(source)), error, raw)) from None


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate a params file.

    Raises ConfigError when the file is missing, is not YAML, or breaks the schema;
    the message names the file, the dotted field path, the bad value and the rule.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw if raw is not None else {}, source=path)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat
