"""The tune section: the searchable fine-tuning settings, the search space and the study."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field, RootModel, ValidationError, model_validator

from bigmodel_ops.config._base import PositiveInt, _Strict
from bigmodel_ops.config.finetune import FinetuneParams, LoraParams

# The fine-tuning settings tune.search_space may draw, by the kind of distribution they take
# (any setting also takes a categorical of valid values). Names are the `finetune` keys
# (`lora.<key>` or `lora_<key>` for finetune.lora.<key>), the fields of
# bigmodel_ops.classification.training.HyperParams (tests/test_tune_space.py keeps them in step).
SEARCHABLE: dict[str, Literal["float", "int", "categorical"]] = {
    "lr": "float",
    "head_lr_mult": "float",
    "layer_lr_decay": "float",
    "weight_decay": "float",
    "dropout": "float",
    "warmup_ratio": "float",
    "grad_clip": "float",
    "label_smoothing": "float",
    "batch_size": "int",
    "freeze_layers": "int",
    "early_stopping_patience": "int",
    "ema_decay": "float",
    "swa_start": "float",
    "pooling": "categorical",
    "freeze_backbone": "categorical",
    "class_weights": "categorical",  # none | balanced (a list of weights cannot be an Optuna choice)
    "from_scratch": "categorical",
    "method": "categorical",
    "weight_averaging": "categorical",
    "group_by_length": "categorical",
    "lora.rank": "int",
    "lora.alpha": "float",
    "lora.dropout": "float",
}
# HyperParams fields a trial cannot draw, and why.
NOT_SEARCHABLE: dict[str, str] = {
    "max_epochs": "a trial's budget is tune.max_epochs (and tune.train_fraction), the same for every trial",
    "lora.target_modules": "a list cannot be an Optuna choice; set finetune.lora.target_modules",
    "max_length": "texts are tokenised once for all trials; set finetune.max_length",
    "truncation": "texts are tokenised once for all trials; set finetune.truncation",
    "head_tokens": "texts are tokenised once for all trials; set finetune.head_tokens",
}


def setting_name(key: str) -> str:
    """The canonical name of a fine-tuning setting: ``lora_rank`` -> ``lora.rank``."""
    return f"lora.{key[5:]}" if key.startswith("lora_") else key


def check_setting(key: str, value: Any) -> Any:
    """``value`` validated as the fine-tuning setting ``key`` (strict types, the finetune schema's
    ranges); ValueError naming the rule otherwise. Used by the search space and best_params."""
    name = setting_name(key)
    model, field = (LoraParams, name[5:]) if name.startswith("lora.") else (FinetuneParams, name)
    if field not in model.model_fields:
        raise ValueError(f"{name!r} is not a fine-tuning setting")
    try:
        return getattr(model.model_validate({field: value}, strict=True), field)
    except ValidationError as error:
        problems = "; ".join(e["msg"] for e in error.errors() if tuple(e["loc"][:1]) == (field,))
        raise ValueError(f"{json.dumps(value)} is not a valid {name}: {problems or error}") from None


Choice = bool | int | float | str | None


class Distribution(_Strict):
    """One searched setting: ``{type: float, low, high, log}``, ``{type: int, low, high, log,
    step}`` or ``{type: categorical, choices: [...]}``."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Choice] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical needs at least one value in choices")
            extra = [k for k in ("low", "high", "step") if getattr(self, k) is not None]
            if extra or self.log:
                raise ValueError(f"a categorical takes only choices (got {extra or ['log']})")
            if len({json.dumps(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat a value")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} range takes low/high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs low and high")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"{key} of an int range must be an integer, got {value!r}")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(
                f"low is {self.low}: a log-scaled range needs low > 0 (a log range cannot go through 0)"
            )
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be > 0, got {self.step}")
            if self.log and self.step != 1:
                raise ValueError("a log-scaled range takes no step (Optuna refuses both)")
        return self

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "batch_size": {"type": "categorical", "choices": [16, 32]},
}


class SearchSpace(RootModel[dict[str, Distribution]]):
    """tune.search_space: fine-tuning setting -> distribution (see :data:`SEARCHABLE`)."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _known_settings(self) -> SearchSpace:
        if not self.root:
            raise ValueError(
                "tune.search_space is empty: declare at least one fine-tuning setting to search, "
                "e.g. lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}"
            )
        seen: dict[str, str] = {}
        for key, dist in self.root.items():
            where = f"tune.search_space.{key}"
            name = setting_name(key)
            if name in seen:
                raise ValueError(f"{where}: the same setting as tune.search_space.{seen[name]}")
            seen[name] = key
            if name in NOT_SEARCHABLE:
                raise ValueError(f"{where}: not searchable: {NOT_SEARCHABLE[name]}")
            kind = SEARCHABLE.get(name)
            if kind is None:
                raise ValueError(
                    f"{where}: unknown fine-tuning setting {key!r}; searchable: {sorted(SEARCHABLE)}"
                )
            if dist.type != "categorical" and dist.type != kind:
                allowed = "a categorical" if kind == "categorical" else f"type {kind} or categorical"
                raise ValueError(f"{where}: type {dist.type} does not fit {name} (takes {allowed})")
            for value in dist.values_to_check():
                try:
                    check_setting(name, value)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
        return self

    def items(self):
        return self.root.items()

    def names(self) -> list[str]:
        """The canonical names of the searched settings (``lora.rank``, not ``lora_rank``)."""
        return [setting_name(k) for k in self.root]


class TuneParams(_Strict):
    n_trials: PositiveInt = 4
    timeout_s: PositiveInt | None = None
    # tpe: multivariate TPE with a constant liar; random; cmaes (CMA-ES: categorical settings are
    # drawn independently, at random); gp: Optuna's Gaussian-process sampler. Seeded by project.seed.
    sampler: Literal["tpe", "random", "cmaes", "gp"] = "tpe"
    # Random trials before a model-based sampler (tpe, cmaes, gp) starts; null = Optuna's default.
    sampler_startup_trials: int | None = Field(default=None, ge=0)
    # median | hyperband | successive_halving | threshold (needs prune_threshold) | none. Every
    # pruner acts on the reports of the validation subset every report_every_n_steps steps (or
    # report_every_n_examples training examples).
    pruner: Literal["median", "hyperband", "successive_halving", "threshold", "none"] = "median"
    # Optuna storage URL (SQLAlchemy, e.g. postgresql://... for workers on many machines); None =
    # a journal file in the stage's output folder (workers on one machine). `--storage` overrides.
    storage: str | None = None
    # Worker processes on the study (`bigmodel-ops tune --workers N` overrides); the study runs
    # exactly n_trials trials whatever their number.
    workers: PositiveInt = 1
    # Liveness of running trials: each worker records a heartbeat every heartbeat_interval_s; a
    # RUNNING trial silent for more than grace_period_s is failed and retried (at most
    # max_retry times) with the same parameters.
    heartbeat_interval_s: PositiveInt = 5
    grace_period_s: PositiveInt = 30
    max_retry: int = Field(default=2, ge=0)
    # The first trial of a new study runs the finetune settings as they are (each searched
    # setting at its finetune value, where the space can draw it): the search then never ships
    # settings worse than the defaults on its own metric, and the report says what it gained.
    baseline_trial: bool = True
    # Epochs of fine-tuning per trial (the full val split is measured at each epoch's end).
    max_epochs: PositiveInt = 2
    # Fraction of the training batches each trial epoch sees (Lightning's limit_train_batches):
    # ranking hyperparameters on a subsample is the usual way to afford more trials.
    # Validation always uses the whole val split, so trials stay comparable.
    train_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    search_space: SearchSpace = Field(
        default_factory=lambda: SearchSpace.model_validate(DEFAULT_SEARCH_SPACE)
    )
    # The objective and the value the pruner watches: val_acc is maximised, val_loss minimised.
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    # Every this many optimizer steps a trial measures `metric` on a fixed, seeded subset of the
    # val split (report_val_fraction of it) and reports it to the pruner. The objective (the
    # trial's final value) is measured on the whole val split.
    report_every_n_steps: PositiveInt = 10
    # Report on the training examples axis instead (null: on optimizer steps, as above): a trial
    # reports at the first optimizer step at which the examples it has trained on (optimizer steps
    # x its batch_size: a trial runs on one device, without accumulation) reach the next multiple
    # of this, and reports them as the step (trial.report(value, step=examples)), so trials
    # of different batch sizes meet the pruner at equal training. pruner_warmup_steps,
    # min_resource and max_resource then count examples. report_every_n_steps is unused and must
    # stay at its default. A multiple of every batch size puts all trials' reports at the same
    # examples (the median pruner compares trials only at equal report steps).
    report_every_n_examples: PositiveInt | None = None
    report_val_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    # For pruner: threshold.
    prune_threshold: float | None = None
    # Trials the median pruner lets finish before it prunes any (Optuna's default of 5 would
    # never prune a study of a few trials).
    pruner_startup_trials: int = Field(default=2, ge=0)
    # median / threshold: no pruning before this optimizer step (this training example with
    # report_every_n_examples); early reports are noisy.
    pruner_warmup_steps: int = Field(default=0, ge=0)
    # hyperband / successive_halving, in optimizer steps (training examples with
    # report_every_n_examples): the first rung (null = report_every_n_steps, or
    # report_every_n_examples; never below that first report), the most a trial runs
    # (hyperband; "auto": the last report step of the first complete trial) and the reduction factor.
    min_resource: PositiveInt | None = None
    max_resource: PositiveInt | Literal["auto"] = "auto"
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _threshold_is_set(self) -> TuneParams:
        if self.pruner == "threshold" and self.prune_threshold is None:
            raise ValueError("pruner 'threshold' needs prune_threshold")
        if self.grace_period_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"grace_period_s ({self.grace_period_s}) must be above heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): a live worker would look dead between two heartbeats"
            )
        default_steps = type(self).model_fields["report_every_n_steps"].default
        examples = self.report_every_n_examples
        if examples is not None and self.report_every_n_steps != default_steps:
            raise ValueError(
                f"tune.report_every_n_steps ({self.report_every_n_steps}) and "
                f"tune.report_every_n_examples ({examples}) are two cadences of the same reports: "
                f"set tune.report_every_n_examples to null, or tune.report_every_n_steps back to its "
                f"default ({default_steps}; unused when reporting on examples)"
            )
        every, key = (
            (examples, "report_every_n_examples")
            if examples
            else (self.report_every_n_steps, "report_every_n_steps")
        )
        if self.pruner in ("hyperband", "successive_halving") and (self.min_resource or every) < every:
            unit = "; with report_every_n_examples set it counts training examples" if examples else ""
            raise ValueError(
                f"tune.min_resource ({self.min_resource} {self.report_unit}) is below the first report, "
                f"at tune.{key} ({every}): every rung up to that report would be judged on it at once. "
                f"Set tune.min_resource to null (the first report) or to at least {every}{unit}"
            )
        if isinstance(self.max_resource, int):
            if self.max_resource < (self.min_resource or 1):
                raise ValueError(
                    f"tune.max_resource ({self.max_resource} {self.report_unit}) is below "
                    f"tune.min_resource ({self.min_resource} {self.report_unit})"
                )
            if examples is not None and self.min_resource is None and self.max_resource < examples:
                raise ValueError(
                    f"tune.max_resource ({self.max_resource}, in training examples) is below the "
                    f"first rung, tune.report_every_n_examples ({examples}; tune.min_resource is "
                    "null): with report_every_n_examples set, max_resource counts examples, not steps"
                )
        return self

    @property
    def report_unit(self) -> str:
        """What a report step counts: "optimizer steps", or "training examples" when
        ``report_every_n_examples`` is set (the unit of pruner_warmup_steps, min_resource and
        max_resource)."""
        return "optimizer steps" if self.report_every_n_examples is None else "training examples"

    @property
    def first_rung(self) -> int:
        """min_resource, else the report cadence in the report unit (report_every_n_examples when
        set, else report_every_n_steps): the first rung of hyperband / successive halving."""
        return self.min_resource or self.report_every_n_examples or self.report_every_n_steps
