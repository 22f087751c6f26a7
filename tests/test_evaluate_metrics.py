"""The evaluate stage's algorithms: metrics against scikit-learn and by hand, ECE, curves, tables,
the baseline, latency, and the metric names the params schema knows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from bigmodel_ops.config import evaluate_metric_names, parse_params
from bigmodel_ops.evaluation import baseline, curves, latency, metrics, tables
from tests.helpers_finetune import make_texts, tiny_params


def _three_classes(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_summary_metrics_match_scikit_learn_multiclass():
    y, probs = _three_classes()
    got = metrics.summary_metrics(y, probs, prefix="test_")
    preds = probs.argmax(1)
    assert got["test_acc"] == pytest.approx(accuracy_score(y, preds))
    assert got["test_f1"] == pytest.approx(f1_score(y, preds, average="macro"))
    assert got["test_f1_micro"] == pytest.approx(f1_score(y, preds, average="micro"))
    assert got["test_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert got["test_log_loss"] == pytest.approx(log_loss(y, probs))
    assert 0.0 <= got["test_ece"] <= 1.0


def test_binary_roc_auc_is_of_the_second_label_and_nan_when_a_class_is_missing():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    assert metrics.roc_auc(y, probs) == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert math.isnan(metrics.roc_auc(np.array([1, 1]), probs[2:]))


def test_ece_by_hand():
    # bins of width 1/15: confidences 0.95 (2 right, 1 wrong) and 0.6 (1 right)
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.4, 0.6]])
    expected = 3 / 4 * abs(2 / 3 - 0.95) + 1 / 4 * abs(1.0 - 0.6)
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(expected)
    bins = metrics.reliability_bins(y, probs)
    assert [b["count"] for b in bins] == [1, 3]
    assert bins[1]["bin_upper"] == 1.0 and bins[1]["accuracy"] == pytest.approx(2 / 3)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.expected_calibration_error(np.array([0, 1]), perfect) == 0.0


def test_per_class_rows_and_names():
    y, probs = _three_classes()
    rows = metrics.per_class(y, probs, ["a b", "c", "d"])
    assert [r["support"] for r in rows] == [30, 30, 30]
    named = metrics.per_class_metrics(rows)
    assert named["test_recall_a_b"] == rows[0]["recall"] and named["test_support_d"] == 30.0
    assert np.mean([r["f1"] for r in rows]) == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))


def test_curves_rows():
    y, probs = _three_classes()
    roc = curves.roc_rows(y, probs)
    assert roc[0]["fpr"] == 0.0 and roc[-1]["tpr"] == 1.0 and all(math.isfinite(r["threshold"]) for r in roc)
    pr = curves.pr_rows(y, probs)
    assert [r["recall"] for r in pr] == sorted(r["recall"] for r in pr)
    rows = curves.confusion_rows(y, probs.argmax(1), ["a", "b", "c"])
    assert len(rows) == 90 and set(rows[0]) == {"actual", "predicted"}
    cm = curves.confusion_counts(y, probs.argmax(1), 3)
    assert cm.sum() == 90 and cm.trace() == int((probs.argmax(1) == y).sum())
    json.dumps([roc, pr, rows])  # plain JSON for DVC
    many = np.arange(5000) % 2
    assert len(curves.pr_rows(many, np.random.default_rng(1).dirichlet([1, 1], 5000))) <= curves.MAX_ROWS


def test_worst_errors_are_the_most_confident_mistakes():
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.7, 0.3], [0.45, 0.55]])
    rows = tables.worst_errors(["a", "b", "c", "d"], y, probs, ["neg", "pos"], limit=5)
    assert [r["text"] for r in rows] == ["b", "a"]
    assert rows[0] == {
        "text": "b",
        "label": "pos",
        "prediction": "neg",
        "confidence": 0.9,
        "label_probability": 0.1,
    }
    assert len(tables.worst_errors(["a", "b", "c", "d"], y, probs, ["neg", "pos"], limit=1)) == 1


def test_baseline_learns_the_cue_words():
    train = make_texts(80, seed=1)
    test = make_texts(40, seed=3)
    labels = ["negative", "positive"]
    settings = parse_params(tiny_params()).evaluate.baseline
    probs = baseline.baseline_proba(
        [t for t, _ in train],
        np.array([labels.index(lab) for _, lab in train]),
        [t for t, _ in test],
        n_labels=2,
        settings=settings,
    )
    y = np.array([labels.index(lab) for _, lab in test])
    assert probs.shape == (40, 2) and np.allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == y).mean() >= 0.9


def test_baseline_settings_are_validated():
    raw = tiny_params(evaluate={"baseline": {"ngram_max": 0, "C": -1}})
    with pytest.raises(Exception, match=r"evaluate.baseline.ngram_max[\s\S]*evaluate.baseline.C"):
        parse_params(raw)


def test_latency_metrics():
    class Fake:
        calls: list[int] = []

        def logits(self, texts, *, batch_size):
            self.calls.append(len(texts))

    fake = Fake()
    out = latency.measure_latency(fake, ["x", "y"], repeats=3, warmup=1)
    assert set(out) == {
        "latency_b1_median_ms",
        "latency_b1_p95_ms",
        "latency_b32_median_ms",
        "latency_b32_p95_ms",
    }
    assert fake.calls == [1] * 4 + [32] * 4


def test_the_schema_lists_exactly_what_the_stage_computes():
    """evaluate_metric_names (what the gate may name) == the metric names of a real report."""
    y, probs = _three_classes()
    labels = ["neg", "neu", "pos"]
    model = metrics.summary_metrics(y, probs, prefix="test_")
    base = metrics.summary_metrics(y, probs[:, ::-1], prefix="baseline_test_")
    computed = {
        **model,
        **metrics.per_class_metrics(metrics.per_class(y, probs, labels)),
        **base,
        **metrics.versus_baseline(model, base),
        **dict.fromkeys(
            ["latency_b1_median_ms", "latency_b1_p95_ms", "latency_b32_median_ms", "latency_b32_p95_ms"], 1.0
        ),
        "model_size_mb": 1.0,
    }
    names = evaluate_metric_names(labels)
    assert set(computed) == set(names["higher"]) | set(names["lower"]) | set(names["counts"])
