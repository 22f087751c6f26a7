"""The project, tracking, prepare, tokenizer, model, sizing-profile and pretrain sections."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bigmodel_ops.config._base import Fraction, PositiveInt, _Strict
from bigmodel_ops.errors import FSDP_NEEDS_GPU


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
    # token: each token is picked on its own; word: whole-word masking, a word's pieces (WordPiece
    # "##" pieces, byte-level BPE pieces without a leading space) are picked together. Val loss
    # is always measured with token masking, so it compares across the two.
    masking: Literal["token", "word"] = "token"
    # mlm: the backbone predicts the masked tokens. electra (masked objective only): replaced-token
    # detection (Clark et al. 2020): a smaller generator fills the masked positions with its own
    # samples and the backbone learns, at every position, whether a token was replaced.
    task: Literal["mlm", "electra"] = "mlm"
    # electra: the generator's depth (it shares the backbone's embeddings and width).
    generator_layers: PositiveInt = 1
    # electra: weight of the replaced-token loss against the generator's MLM loss.
    rtd_weight: float = Field(default=50.0, gt=0.0)
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
