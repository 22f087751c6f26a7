"""The params.yaml schema.

One pydantic v2 model validates the whole file before any stage does work.
Unknown keys are refused, numbers are range-checked and cross-field rules are
enforced, so a typo fails in milliseconds instead of after an hour of training.
Stages receive the validated params and pass typed sub-objects down; nothing re-reads
params.yaml later (the tracking layer hashes the validated params it is given).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from bigmodel_ops.errors import FSDP_NEEDS_GPU, ConfigError

DEFAULT_PARAMS_PATH = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectParams(_Strict):
    # Names the MLflow experiment and the registered models (`<name>-base`, `<name>-classifier`).
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # One seed for splits, sampling, init and Optuna, so reruns are reproducible.
    seed: int = Field(default=1337, ge=0)


PIPELINE_STAGES = ("prepare", "tokenize", "pretrain", "tune", "finetune", "evaluate", "compress")
DEFAULT_HEADLINE_METRICS: dict[str, list[str]] = {
    "prepare": ["data.rows.train"],
    "pretrain": ["val/loss", "val/gap_to_unigram"],
    "tune": ["best_value"],
    "finetune": ["best_val_acc"],
    "evaluate": ["test_acc", "baseline_test_acc", "test_acc_minus_baseline"],
    "compress": ["int8_speedup", "int8_acc_drop_points"],
}


class TrackingParams(_Strict):
    # MLFLOW_TRACKING_URI in the environment wins over this value.
    uri: str = "sqlite:///mlflow.db"
    # Where a fresh experiment stores artifacts (a local folder unless a URI is given).
    artifact_location: str = "mlartifacts"
    # Defaults to project.name.
    experiment: str | None = None
    # Training metrics are logged every N optimizer steps, buffered and sent in batches.
    log_every_n_steps: PositiveInt = 10
    # Record CPU/memory/GPU utilisation of training stages through MLflow system metrics.
    system_metrics: bool = True
    # Metrics that cannot reach the tracking server are spooled here and replayed later.
    spool_dir: str = ".bigmodel_ops/spool"
    # Seconds between system-metrics samples (CPU, memory, GPU) of training stages.
    system_metrics_interval_s: float = Field(default=10.0, gt=0.0)
    # The background sender writes queued metrics at least this often.
    flush_interval_s: float = Field(default=2.0, gt=0.0)
    # While the server is unreachable, the spool is retried this often.
    retry_interval_s: float = Field(default=5.0, gt=0.0)
    # Where the sender runs: "process" (Linux; a forked child at CPU priority `sender_nice`,
    # so MLflow's per-metric Python cost neither holds the training loop's GIL nor takes the CPU
    # it uses) or "thread" (also the fallback where fork is unavailable).
    sender: Literal["process", "thread"] = "process"
    sender_nice: int = Field(default=19, ge=0, le=19)
    # Linux: also put the sender process in the SCHED_IDLE class, below every nice level. On a
    # core that training keeps busy it then gets ~0.3% of the time (CFS weight 3 against 1024),
    # and a waking training thread preempts it at once.
    sender_sched_idle: bool = True
    # HTTP retries/timeout while a stage runs (MLflow's defaults can stall ~4 minutes on an outage);
    # MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT in the environment win.
    http_max_retries: int = Field(default=1, ge=0, le=10)
    http_timeout_s: PositiveInt = 20
    # Copied from each stage's run onto the pipeline run as `<stage>.<metric>`: the runs table's columns.
    headline_metrics: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_HEADLINE_METRICS))
    # A running stage tags its run with a heartbeat this often; `bigmodel-ops runs reap` (and every
    # stage start) ends FAILED a run whose heartbeat is older than heartbeat_stale_s AND whose
    # process is gone.
    heartbeat_interval_s: float = Field(default=30.0, gt=0.0)
    heartbeat_stale_s: float = Field(default=120.0, gt=0.0)

    @field_validator("spool_dir", "artifact_location")
    @classmethod
    def _inside_the_project(cls, value: str, info: Any) -> str:
        """A relative folder must stay in the project: no ``..`` segment, also %-encoded. A folder
        elsewhere is an explicit choice: an absolute path, or for artifact_location a URI."""
        if info.field_name == "artifact_location" and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
            return value
        decoded = urllib.parse.unquote(value)
        if ".." in re.split(r"[/\\]", decoded):
            raise ValueError(
                f"{value!r} leaves the project through '..'; give a folder inside it or an absolute path"
            )
        return value

    @model_validator(mode="after")
    def _check_front_page(self) -> TrackingParams:
        unknown = sorted(set(self.headline_metrics) - set(PIPELINE_STAGES))
        if unknown:
            raise ValueError(
                f"tracking.headline_metrics: unknown stage(s) {unknown}; stages: {list(PIPELINE_STAGES)}"
            )
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"tracking.heartbeat_stale_s ({self.heartbeat_stale_s:g}) must exceed "
                f"tracking.heartbeat_interval_s ({self.heartbeat_interval_s:g})"
            )
        return self


class SourceParams(_Strict):
    """Where the raw data comes from."""

    # csv/jsonl/parquet/text: local files (a path or glob); aclimdb: a folder in the
    # aclImdb layout; hf_hub: a Hugging Face hub id (needs a network); hf_disk: a
    # dataset saved with `save_to_disk`.
    kind: Literal["csv", "jsonl", "parquet", "text", "aclimdb", "hf_hub", "hf_disk"]
    path: str
    text_column: str = "text"
    # None means the source is unlabeled (it then only feeds the pretraining pool).
    label_column: str | None = "label"
    # Extra unlabeled text (one document per line, or a glob of .txt files) for pretraining.
    unlabeled_path: str | None = None
    encoding: str = "utf-8"
    # For hf sources: which splits to read (None = all); a split called "unsup" is unlabeled.
    hf_splits: list[str] | None = None
    # For hf_hub: an optional dataset config name.
    hf_config: str | None = None

    @model_validator(mode="after")
    def _text_sources_have_no_labels(self) -> SourceParams:
        if self.kind == "text" and self.label_column is not None:
            raise ValueError("source.kind 'text' has no label column: set source.label_column: null")
        return self


class SplitParams(_Strict):
    train: Fraction = 0.8
    val: Fraction = 0.1
    test: Fraction = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1.0, got {total:g}")
        if self.train == 0 or self.val == 0 or self.test == 0:
            raise ValueError("every split (train, val, test) needs a fraction > 0")
        return self


class PrepareParams(_Strict):
    source: SourceParams
    # The label set the data must have, in class-index order. Values are compared as strings.
    labels: list[str] = Field(min_length=2)
    lowercase: bool = False
    strip_markup: bool = True
    # Rows whose normalised text is shorter than this are dropped.
    min_chars: PositiveInt = 1
    # A longer normalised text is refused (DataError naming the row): a line of megabytes is
    # almost always a broken file (a lost newline or quote), not a document.
    max_chars: PositiveInt = 1_000_000
    split: SplitParams = SplitParams()
    # all: every text (labeled + unlabeled) feeds pretraining; unlabeled: only the unlabeled pool.
    pretrain_pool: Literal["all", "unlabeled"] = "all"
    # Rows per streamed chunk: memory stays flat whatever the corpus size.
    chunk_rows: PositiveInt = 5000

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        return labels


class SpecialTokens(_Strict):
    pad: str = "[PAD]"
    unk: str = "[UNK]"
    cls: str = "[CLS]"
    # Also separates documents in the packed pretraining stream.
    sep: str = "[SEP]"
    mask: str = "[MASK]"

    def as_list(self) -> list[str]:
        """Special tokens in id order: pad=0, unk=1, cls=2, sep=3, mask=4."""
        return [self.pad, self.unk, self.cls, self.sep, self.mask]


class TokenizerParams(_Strict):
    kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = Field(default=8000, ge=64, le=1_000_000)
    min_frequency: PositiveInt = 2
    # WordPiece only: keep at most this many distinct characters in the initial alphabet
    # (rarer ones become [UNK]), so a few exotic characters cannot eat the vocabulary.
    limit_alphabet: PositiveInt = 1000
    lowercase: bool = True
    strip_accents: bool = False
    special_tokens: SpecialTokens = SpecialTokens()
    # Documents per encode_batch call when packing shards.
    encode_batch_size: PositiveInt = 1000
    # Fraction of pretraining documents held out for validation perplexity.
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    # Tokens per shard file (a new file is started when one fills up).
    shard_tokens: int = Field(default=50_000_000, ge=1024)


ModelPreset = Literal["tiny", "mini", "small", "gpt2-124m", "bert-base"]


class ModelParams(_Strict):
    # causal: decoder LM (next token); masked: bidirectional encoder (BERT-style MLM).
    objective: Literal["causal", "masked"] = "masked"
    # Overrides of the preset named by the active profile; None keeps the preset's value.
    n_layer: PositiveInt | None = None
    n_head: PositiveInt | None = None
    n_embd: PositiveInt | None = None
    block_size: PositiveInt | None = None
    dropout: Fraction | None = None
    bias: bool | None = None
    # ALiBi attention bias (a per-head distance penalty). None: on for the masked objective, where
    # a small model with learned positions alone sits at the unigram plateau for thousands of steps.
    alibi: bool | None = None


class SizingProfile(_Strict):
    """Everything that differs between a CPU demo run and a GPU run."""

    model_preset: ModelPreset
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt | Literal["auto"] = 1
    num_nodes: PositiveInt = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # auto: bf16-mixed on CUDA, 32-true elsewhere.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    compile: bool = False
    batch_size: PositiveInt = 16
    # Token budget of pretraining: stop after max_steps optimizer steps or max_tokens tokens.
    max_steps: PositiveInt | None = 200
    max_tokens: PositiveInt | None = None
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _has_budget(self) -> SizingProfile:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set max_steps or max_tokens (the pretraining budget)")
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError(FSDP_NEEDS_GPU)
        return self


class PretrainParams(_Strict):
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    min_lr: float = Field(default=1e-4, ge=0.0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    beta1: float = Field(default=0.9, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.95, gt=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)
    grad_accum: PositiveInt = 1
    # BERT-style masking: this fraction of tokens is selected, then 80/10/10 mask/random/keep.
    # Higher than BERT's 0.15 learns faster on small data (more predictions per step).
    mask_rate: float = Field(default=0.15, gt=0.0, lt=1.0)
    # The masking rate of the fixed validation batches: kept apart from mask_rate so that val loss
    # (and its gap to the unigram entropy) compares across training mask rates.
    val_mask_rate: float = Field(default=0.15, gt=0.0, lt=1.0)
    # random: windows at random offsets; sequential: contiguous packing, epoch after epoch.
    sampling: Literal["random", "sequential"] = "random"
    val_every_n_steps: PositiveInt = 50
    val_batches: PositiveInt = 10
    checkpoint_every_n_steps: PositiveInt = 50
    # Resume from this checkpoint file instead of the latest one of the current configuration
    # (checkpoints live in one folder per configuration). It must match the model config.
    resume_from: str | None = None
    register_model: bool = True

    @model_validator(mode="after")
    def _lr_order(self) -> PretrainParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


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
    "pooling": "categorical",
    "freeze_backbone": "categorical",
    "class_weights": "categorical",  # none | balanced (a list of weights cannot be an Optuna choice)
    "from_scratch": "categorical",
    "method": "categorical",
    "lora.rank": "int",
    "lora.alpha": "float",
    "lora.dropout": "float",
}
# HyperParams fields a trial cannot draw, and why.
NOT_SEARCHABLE: dict[str, str] = {
    "max_epochs": "a trial's budget is tune.max_epochs (and tune.train_fraction), the same for every trial",
    "lora.target_modules": "a list cannot be an Optuna choice; set finetune.lora.target_modules",
    "max_length": "texts are tokenised once for all trials; set finetune.max_length",
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
    # pruner acts on the reports of the validation subset every report_every_n_steps steps.
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
    report_val_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    # For pruner: threshold.
    prune_threshold: float | None = None
    # Trials the median pruner lets finish before it prunes any (Optuna's default of 5 would
    # never prune a study of a few trials).
    pruner_startup_trials: int = Field(default=2, ge=0)
    # median / threshold: no pruning before this optimizer step (early reports are noisy).
    pruner_warmup_steps: int = Field(default=0, ge=0)
    # hyperband / successive_halving, in optimizer steps: the first rung (null =
    # report_every_n_steps), the most a trial runs (hyperband; "auto": the steps of the first
    # complete trial) and the reduction factor.
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
        if isinstance(self.max_resource, int) and self.max_resource < (self.min_resource or 1):
            raise ValueError(
                f"max_resource ({self.max_resource}) is below min_resource ({self.min_resource})"
            )
        return self


LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


class LoraParams(_Strict):
    """LoRA adapters (finetune.method: lora), through peft."""

    # Rank of the low-rank update of each targeted layer.
    rank: PositiveInt = 8
    # Scaling numerator: the update is multiplied by alpha / rank.
    alpha: float = Field(default=16.0, gt=0.0)
    # Dropout on the adapters' input.
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # Linear layers of the backbone's blocks that get adapters: attn.qkv / attn.proj (attention),
    # mlp.fc / mlp.proj (MLP), or any dotted suffix of a layer's name ("proj" = both projections).
    # An entry that matches no layer is refused before training.
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class FinetuneParams(_Strict):
    max_epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    # Peak learning rate of the backbone (linear warmup, then linear decay to 0).
    lr: float = Field(default=5e-4, gt=0.0, le=1.0)
    # The classification head's learning rate is lr * head_lr_mult.
    head_lr_mult: float = Field(default=1.0, gt=0.0, le=1000.0)
    # Layer-wise LR decay: block i of n gets lr * layer_lr_decay ** (n - i), the embeddings
    # lr * layer_lr_decay ** (n + 1); 1.0 turns it off.
    layer_lr_decay: float = Field(default=1.0, gt=0.0, le=1.0)
    # AdamW weight decay of the Linear matrices (never norms, biases or embeddings).
    weight_decay: float = Field(default=0.01, ge=0.0)
    # Dropout of the backbone and of the head.
    dropout: Fraction = 0.1
    # Fraction of the optimizer steps spent warming the learning rate up.
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Texts are truncated to this many tokens (at most the model's block_size).
    max_length: PositiveInt = 128
    # One vector per text for the head: cls (masked backbone), last (causal backbone), mean
    # (either: the mean of the real tokens), auto = cls for masked, last for causal. Checked
    # against the backbone's objective once the backbone is known.
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    # Use the tune stage's best hyperparameters instead of the values above.
    use_tuned: bool = True
    # Freeze the pretrained backbone and train only the classification head.
    freeze_backbone: bool = False
    # Freeze the embeddings and the first k transformer blocks (0 = off; at most n_layer).
    freeze_layers: int = Field(default=0, ge=0)
    # Gradient-norm clipping; 0 turns it off.
    grad_clip: float = Field(default=1.0, ge=0.0)
    # Label smoothing of the training cross-entropy (val_loss stays the plain cross-entropy).
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Class weights of the training loss: none, balanced (n / (k * count) on the train split), or
    # one positive weight per label of prepare.labels, in that order.
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(gt=0.0)]] = "none"
    # Train the same architecture from random init (seeded) instead of the pretrained weights.
    from_scratch: bool = False
    # scratch: also train the from-scratch control with the same recipe and report its val
    # metrics (control_val_acc, ...) beside the pretrained classifier's; none: do not.
    control: Literal["none", "scratch"] = "none"
    # full: train every (unfrozen) weight; lora: LoRA adapters (peft), merged into the weights at
    # export, so the exported model is the same plain classifier.
    method: Literal["full", "lora"] = "full"
    lora: LoraParams = LoraParams()
    # Stop after this many epochs without a better val_acc; 0 or null = off. Either way the
    # best epoch's weights (by val_acc) are exported, not the last epoch's.
    early_stopping_patience: int | None = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneParams:
        if self.freeze_backbone and self.freeze_layers:
            raise ValueError(
                "freeze_backbone and freeze_layers are both set: freeze_backbone freezes everything, "
                "freeze_layers the embeddings and the first k blocks; keep one"
            )
        if self.from_scratch and self.control == "scratch":
            raise ValueError(
                "control: scratch compares with a from-scratch model, but from_scratch is already true"
            )
        return self


def metric_key(label: str) -> str:
    """The form a label takes inside a metric name (``test_recall_<key>``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


# What the evaluate stage computes (bigmodel_ops/evaluation, checked by tests/test_evaluate_metrics.py),
# by the direction in which a value is better. The gate names metrics from these lists.
EVALUATE_HIGHER_IS_BETTER = (
    "test_acc",
    "test_f1",  # macro F1
    "test_f1_micro",
    "test_roc_auc",  # binary; one-vs-rest macro for more classes
    "baseline_test_acc",
    "baseline_test_f1",
    "baseline_test_f1_micro",
    "baseline_test_roc_auc",
    "test_acc_minus_baseline",
    "test_f1_minus_baseline",
    "test_roc_auc_minus_baseline",
)
EVALUATE_LOWER_IS_BETTER = (
    "test_log_loss",
    "test_ece",  # expected calibration error, 15 equal-width bins of the top-class confidence
    "baseline_test_log_loss",
    "baseline_test_ece",
    "latency_b1_median_ms",
    "latency_b1_p95_ms",
    "latency_b32_median_ms",
    "latency_b32_p95_ms",
    "model_size_mb",
)
# Per label: test_<kind>_<metric_key(label)>; support is a count, not a score.
EVALUATE_PER_LABEL = ("precision", "recall", "f1")
EVALUATE_PER_LABEL_COUNTS = ("support",)


def evaluate_metric_names(labels: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """{"higher": names where higher is better, "lower": ..., "counts": ...} for these labels."""
    keys = [metric_key(label) for label in labels]
    return {
        "higher": EVALUATE_HIGHER_IS_BETTER
        + tuple(f"test_{k}_{key}" for k in EVALUATE_PER_LABEL for key in keys),
        "lower": EVALUATE_LOWER_IS_BETTER,
        "counts": tuple(f"test_{k}_{key}" for k in EVALUATE_PER_LABEL_COUNTS for key in keys),
    }


class GateParams(_Strict):
    # The metric that decides promotion (one where higher is better, see EVALUATE_HIGHER_IS_BETTER or
    # test_<precision|recall|f1>_<label>) and its floor.
    metric: str = "test_acc"
    min: float = 0.6
    # A version must reach the current champion's `metric` plus this margin (0: a tie promotes).
    min_margin_over_champion: float = 0.0
    # Ceilings on other computed metrics, each `name: value` (the version fails above it).
    max: dict[str, float] = Field(default_factory=lambda: {"test_ece": 0.2})


class BaselineParams(_Strict):
    """TF-IDF + logistic regression (scikit-learn), trained on the train split in every evaluation."""

    ngram_max: int = Field(default=2, ge=1, le=5)
    C: float = Field(default=10.0, gt=0.0)
    sublinear_tf: bool = True
    min_df: PositiveInt = 1
    max_features: PositiveInt | None = None
    max_iter: PositiveInt = 1000


class EvaluateParams(_Strict):
    batch_size: PositiveInt = 64
    # The registered model's name; default `<project.name>-classifier`.
    registered_model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    # The promotion gate. Every new version gets `challenger_alias`; one that passes also gets
    # `promote_alias`. `min_accuracy` (old name) is still read as gate.min for gate.metric test_acc.
    gate: GateParams = GateParams()
    promote_alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,254}$")
    challenger_alias: str = Field(default="challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,254}$")
    baseline: BaselineParams = BaselineParams()
    # CPU latency of batches of 1 and 32 texts: median and p95 over `latency_repeats` timed calls.
    latency_repeats: PositiveInt = 20
    latency_warmup: int = Field(default=2, ge=0)
    # The most confident misclassified test examples kept in outputs/evaluate/worst_errors.csv.
    worst_errors: int = Field(default=20, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_min_accuracy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "min_accuracy" not in data:
            return data
        data = dict(data)
        value = data.pop("min_accuracy")
        gate = dict(data.get("gate") or {})
        if gate.get("metric", "test_acc") != "test_acc":
            raise ValueError(
                f"min_accuracy is the old name of gate.min for gate.metric test_acc, but gate.metric is "
                f"{gate['metric']!r}: set gate.min instead"
            )
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"min_accuracy must be a number in [0, 1], got {value!r}")
        gate["min"] = value
        data["gate"] = gate
        return data

    @model_validator(mode="after")
    def _check(self) -> EvaluateParams:
        if self.promote_alias == self.challenger_alias:
            raise ValueError("promote_alias and challenger_alias must differ")
        # Label-independent names here; per-label names are checked against prepare.labels in Params.
        self.check_gate_metrics(labels=None)
        return self

    def check_gate_metrics(self, labels: list[str] | None) -> None:
        """ValueError when the gate names a metric the stage does not compute (per-label names are
        only checked when ``labels`` is given)."""
        names = evaluate_metric_names(labels or [])
        per_label = re.compile(rf"^test_({'|'.join(EVALUATE_PER_LABEL)})_.+$")

        def unknown(name: str, allowed: tuple[str, ...]) -> bool:
            return name not in allowed and (labels is not None or not per_label.match(name))

        higher = names["higher"]
        if unknown(self.gate.metric, higher):
            raise ValueError(
                f"evaluate.gate.metric {self.gate.metric!r} is not a computed metric where higher is "
                f"better; choose one of {list(higher)}"
            )
        everything = higher + names["lower"] + names["counts"]
        for name in self.gate.max:
            if unknown(name, everything):
                raise ValueError(
                    f"evaluate.gate.max names {name!r}, which the evaluate stage does not compute; "
                    f"computed metrics: {list(everything)}"
                )


class CompressParams(_Strict):
    """The compress stage: int8 dynamic quantisation (torch) and ONNX (onnxruntime, fp32 and int8)
    of the fine-tuned classifier, each measured against the fp32 model (bigmodel_ops/compression.py)."""

    enabled: bool = True  # false: the stage writes a report saying so and measures nothing
    # dynamo: torch.export-based (torch's default exporter, needs onnxscript); torchscript: the older
    # tracing exporter (dynamo=False), deprecated by torch but a few seconds faster.
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    onnx_opset: int = Field(default=18, ge=14, le=23)
    onnx_int8: bool = True  # also onnxruntime's dynamic int8 quantisation of the ONNX model
    # ONNX vs torch: max abs logit difference allowed on a fixed batch (the first check_batch test
    # texts); above it the stage fails naming the file and publishes nothing.
    tolerance: float = Field(default=1e-3, gt=0.0)
    check_batch: PositiveInt = 32
    batch_size: PositiveInt = 64
    # Median CPU latency at batch 1 and 32 over this many rounds, fp32 and variants interleaved.
    latency_repeats: PositiveInt = 20
    latency_warmup: int = Field(default=2, ge=0)
    # Intra-op threads of torch and onnxruntime while compressing and measuring; 0: torch's default
    # (all cores). 1 keeps the ratios meaningful on a shared machine, where torch's multi-threaded
    # kernels stall when the cores are oversubscribed.
    latency_threads: int = Field(default=1, ge=0)
    # Test accuracy a variant may lose, in points; beyond it: warn (report and tags say so) or fail.
    max_acc_drop_points: float = Field(default=1.0, ge=0.0)
    on_acc_drop: Literal["warn", "fail"] = "warn"
    # Also write the classifier and the pretrained backbone in the Hugging Face transformers format
    # under outputs/compress/hf (what `bigmodel-ops export-hf` writes); needs the transformers package.
    huggingface: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        if self.exporter == "dynamo" and self.onnx_opset < 18:
            raise ValueError("compress.onnx_opset must be >= 18 with the dynamo exporter")
        return self


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
