"""The evaluate section: the metrics the stage computes, the promotion gate and the baseline."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from bigmodel_ops.config._base import PositiveInt, _Strict


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
