"""Where each stage reads and writes, relative to the project root.

dvc.yaml names the same paths; keeping them in one place in code means a stage
and its DVC declaration cannot drift apart silently (tests/test_dvc_deps.py checks
that every output here is declared in dvc.yaml and the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path = Path(".")

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    # prepare
    @property
    def prepared(self) -> Path:
        """train/val/test/pretrain Parquet files."""
        return self.outputs / "prepared"

    @property
    def prepare_report(self) -> Path:
        return self.outputs / "metrics" / "prepare.json"

    # tokenize
    @property
    def tokenizer_dir(self) -> Path:
        """tokenizer.json."""
        return self.outputs / "tokenizer"

    @property
    def tokenizer_file(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    @property
    def shards(self) -> Path:
        """Packed token shards + index.json."""
        return self.outputs / "shards"

    @property
    def tokenize_report(self) -> Path:
        return self.outputs / "metrics" / "tokenize.json"

    # pretrain
    @property
    def pretrain_checkpoints(self) -> Path:
        """Lightning checkpoints (persisted across `dvc repro` so a killed run resumes)."""
        return self.outputs / "pretrain" / "checkpoints"

    @property
    def pretrained_model(self) -> Path:
        """model.safetensors + config.json + tokenizer.json."""
        return self.outputs / "pretrain" / "model"

    @property
    def pretrain_report(self) -> Path:
        return self.outputs / "metrics" / "pretrain.json"

    # tune
    @property
    def tune_dir(self) -> Path:
        return self.outputs / "tune"

    @property
    def best_params(self) -> Path:
        return self.tune_dir / "best_params.yaml"

    @property
    def tune_journal(self) -> Path:
        """The study's journal file when no ``tune.storage`` URL is given."""
        return self.tune_dir / "study.journal"

    @property
    def tune_report(self) -> Path:
        return self.outputs / "metrics" / "tune.json"

    # finetune
    @property
    def classifier(self) -> Path:
        """model.safetensors + config.json + tokenizer.json + labels."""
        return self.outputs / "finetune" / "model"

    @property
    def control_classifier(self) -> Path:
        """The from-scratch control (finetune.control: scratch), or only control.json without one."""
        return self.outputs / "finetune" / "control"

    @property
    def finetune_report(self) -> Path:
        return self.outputs / "metrics" / "finetune.json"

    # evaluate
    @property
    def evaluate_report(self) -> Path:
        return self.outputs / "metrics" / "evaluate.json"

    @property
    def evaluate_dir(self) -> Path:
        """Tables (predictions.parquet, per_class.csv, worst_errors.csv, confusion_matrix.json),
        figures (PNG) and promotion.json."""
        return self.outputs / "evaluate"

    # evaluate: DVC plots (JSON lists of rows, declared with templates in dvc.yaml; cached by DVC like every output)
    @property
    def roc_curve(self) -> Path:
        """Rows {fpr, tpr, threshold}."""
        return self.outputs / "plots" / "roc.json"

    @property
    def pr_curve(self) -> Path:
        """Rows {recall, precision, threshold}."""
        return self.outputs / "plots" / "precision_recall.json"

    @property
    def reliability_curve(self) -> Path:
        """Rows {confidence, accuracy, count, bin_lower, bin_upper}: one per non-empty bin."""
        return self.outputs / "plots" / "reliability.json"

    @property
    def confusion_rows(self) -> Path:
        """Rows {actual, predicted}: one per test example (DVC's confusion template)."""
        return self.outputs / "plots" / "confusion.json"

    # compress
    @property
    def compress_dir(self) -> Path:
        """model.int8.safetensors + config.json + tokenizer.json (the int8 classifier), model.onnx,
        model.int8.onnx and report.json."""
        return self.outputs / "compress"

    @property
    def compress_report(self) -> Path:
        return self.outputs / "metrics" / "compress.json"
