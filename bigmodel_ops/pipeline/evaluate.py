"""Evaluate the classifier on the test split beside a TF-IDF baseline, register it, apply the gate.

1. Inputs (:func:`_load_inputs`): the exported classifier (its labels must be ``prepare.labels``,
   its config.json must name the finetune run), the test split and the train split (labels checked:
   an unseen label is a DataError naming the file and row).
2. Scores (:func:`_score`): the model's and the baseline's (TF-IDF + logistic regression trained on
   the train split, ``evaluate.baseline``) metrics on the test split, the differences, per-class
   precision / recall / F1 / support, CPU latency at batch 1 and 32 and the size on disk. Metric
   names: :mod:`bigmodel_ops.evaluation.metrics` and ``evaluate_metric_names`` in the params schema.
3. Files, each written once (:func:`_write_files`): ``paths.evaluate_report`` (every metric, plus
   ``promoted`` and ``model_version``; DVC metrics), the DVC plots ``paths.roc_curve``,
   ``paths.pr_curve``, ``paths.reliability_curve``, ``paths.confusion_rows`` (JSON lists of rows),
   and under ``paths.evaluate_dir``: per_class.csv, worst_errors.csv (the most confident errors),
   predictions.parquet, confusion_matrix.json, roc.png, precision_recall.png, reliability.png,
   confusion_matrix.png, promotion.json and model_card.md.
4. MLflow run ``evaluate`` (:func:`_log_run`): the metrics, and the same files as artifacts.
5. Registry (:func:`_register`): the finetune run's pyfunc becomes a new version of
   ``evaluate.registered_model`` (default ``<project>-classifier``), refused when the model's latest
   version has other labels; the version is tagged with its metrics, labels, the runs that made it,
   its data version (dvc.lock md5s), git commit and pipeline id; then the gate (``evaluate.gate``,
   registry.apply_gate): ``challenger`` always, ``champion`` when it passes, the reason on the version;
   then the version's model card (:mod:`bigmodel_ops.evaluation.card`: data, recipe, metrics beside
   the baseline, gate decision, the cost of producing it, intended use and limits) becomes its
   description and ``evaluate/model_card.md``; the cost (device-hours, CPU-hours, energy of the
   pretrain, tune (with its trials) and finetune runs of its lineage) also goes on the version as
   tags ``cost.device_hours``, ``cost.cpu_hours``, ``cost.energy_kwh``, ``cost.energy_source``.
6. Outputs are moved into place only after all of that succeeded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.inputs import read_labeled_split
from bigmodel_ops.config import Params
from bigmodel_ops.contract import CONFIG_FILE, CONTROL_FILE
from bigmodel_ops.errors import CheckpointError, ConfigError
from bigmodel_ops.evaluation import baseline, card, curves, latency, metrics, predict, tables
from bigmodel_ops.fsutil import publish
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run

_logger = logging.getLogger(__name__)

ERROR_COLUMNS = ("text", "label", "prediction", "confidence", "label_probability")
PER_CLASS_COLUMNS = ("label", "precision", "recall", "f1", "support")
LINEAGE_STAGES = ("pretrain", "tune", "finetune")


@dataclass
class Inputs:
    classifier: Any
    labels: list[str]
    source_run_id: str  # the finetune run that logged the pyfunc model
    artifact_path: str
    texts: list[str]
    y: np.ndarray
    train_texts: list[str]
    train_y: np.ndarray


@dataclass
class Scores:
    metrics: dict[str, float]
    probs: np.ndarray
    baseline_probs: np.ndarray
    per_class: list[dict[str, Any]]


def registered_model_name(params: Params) -> str:
    return params.evaluate.registered_model or f"{params.project.name}-classifier"


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the classifier on the test split beside a TF-IDF baseline, register it, apply the gate.

    Returns the report. Outputs are published only after registration and the gate succeeded.
    """
    inputs = _load_inputs(params, paths)
    scores = _score(params, paths, inputs, quiet=quiet)
    _check_gate_metrics(params, scores.metrics)
    name = registered_model_name(params)
    outputs = (
        paths.evaluate_dir,
        paths.evaluate_report,
        paths.roc_curve,
        paths.pr_curve,
        paths.reliability_curve,
        paths.confusion_rows,
    )
    with publish() as pub:
        # Staged under their own names: the same files go to MLflow, named as DVC sees them.
        staged = {target: pub.staged(target, name=target.name) for target in outputs}
        files = _write_files(params, paths, inputs, scores, staged)
        with stage_run(params, "evaluate") as stage:
            _log_run(stage, scores.metrics, files)
            promotion = _register(stage, params, paths, inputs, scores.metrics, name=name)
            promotion_file = staged[paths.evaluate_dir] / "promotion.json"
            promotion_file.write_text(json.dumps(promotion, indent=2) + "\n")
            stage.log_artifact(promotion_file, "evaluate")
            _publish_model_card(stage, params, paths, inputs, scores.metrics, promotion, staged)
            report = {
                **_json_safe(scores.metrics),
                "promoted": int(promotion["promoted"]),
                "model_version": promotion["version"],
            }
            staged[paths.evaluate_report].write_text(json.dumps(report, indent=2) + "\n")
            stage.log_artifact(staged[paths.evaluate_report], "metrics")
            stage.log_metrics({"promoted": float(promotion["promoted"])}, step=0)
            stage.log_metrics({"model_version": float(promotion["version"])}, step=0)
    _logger.info(
        "evaluate: test_acc %.4f (baseline %.4f); %s v%s -> %s (%s)",
        scores.metrics["test_acc"],
        scores.metrics["baseline_test_acc"],
        name,
        promotion["version"],
        promotion["alias"],
        promotion["reason"],
    )
    return report


def _load_inputs(params: Params, paths: ProjectPaths) -> Inputs:
    """Step 1: the classifier (checked against params) and the test and train splits."""
    classifier = load_classifier(paths.classifier)
    config_file = paths.classifier / CONFIG_FILE
    labels = list(params.prepare.labels)
    if classifier.labels != labels:
        raise CheckpointError(
            f"{config_file}: the classifier was trained on labels {classifier.labels}, but prepare.labels "
            f"is {labels} (re-run the finetune stage)"
        )
    run_id = classifier.config.get("mlflow_run_id")
    artifact_path = classifier.config.get("mlflow_artifact_path")
    if not run_id or not artifact_path:
        raise CheckpointError(
            f"{config_file}: no mlflow_run_id / mlflow_artifact_path (re-run the finetune stage)"
        )
    texts, y = read_labeled_split(paths.prepared / "test.parquet", labels)
    train_texts, train_y = read_labeled_split(paths.prepared / "train.parquet", labels)
    return Inputs(classifier, labels, run_id, artifact_path, texts, y, train_texts, train_y)


def _score(params: Params, paths: ProjectPaths, inputs: Inputs, *, quiet: bool) -> Scores:
    """Step 2: model and baseline metrics, their differences, per-class rows, latency and size."""
    ev = params.evaluate
    probs = predict.predict_proba(inputs.classifier, inputs.texts, batch_size=ev.batch_size, quiet=quiet)
    baseline_probs = baseline.baseline_proba(
        inputs.train_texts,
        inputs.train_y,
        inputs.texts,
        n_labels=len(inputs.labels),
        settings=ev.baseline,
        seed=params.project.seed,
    )
    model = metrics.summary_metrics(inputs.y, probs, prefix="test_")
    base = metrics.summary_metrics(inputs.y, baseline_probs, prefix="baseline_test_")
    per_class = metrics.per_class(inputs.y, probs, inputs.labels)
    values = {
        **model,
        **metrics.per_class_metrics(per_class),
        **base,
        **metrics.versus_baseline(model, base),
        **latency.measure_latency(
            inputs.classifier, inputs.texts, repeats=ev.latency_repeats, warmup=ev.latency_warmup
        ),
        "model_size_mb": latency.size_on_disk_mb(paths.classifier),
    }
    control_acc = _control_test_acc(params, paths, inputs, quiet=quiet)
    if control_acc is not None:
        values.update(control_test_acc=control_acc, test_acc_minus_control=model["test_acc"] - control_acc)
    return Scores(values, probs, baseline_probs, per_class)


def _control_test_acc(params: Params, paths: ProjectPaths, inputs: Inputs, *, quiet: bool) -> float | None:
    """The from-scratch control's test accuracy (finetune.control: scratch); None when the finetune
    stage trained no control."""
    marker = paths.control_classifier / CONTROL_FILE
    if not marker.is_file() or not json.loads(marker.read_text()).get("trained"):
        return None
    control = load_classifier(paths.control_classifier)
    probs = predict.predict_proba(control, inputs.texts, batch_size=params.evaluate.batch_size, quiet=quiet)
    return float((probs.argmax(axis=1) == np.asarray(inputs.y)).mean())


def _check_gate_metrics(params: Params, computed: dict[str, float]) -> None:
    """ConfigError before anything is registered when the gate names a metric not computed (the
    params schema refuses such names already; this guards against the two lists drifting)."""
    gate = params.evaluate.gate
    missing = [m for m in (gate.metric, *gate.max) if m not in computed]
    if missing:
        raise ConfigError(
            f"evaluate.gate names metric(s) {missing} that the evaluate stage does not compute; "
            f"computed: {sorted(computed)}"
        )


def _write_files(
    params: Params, paths: ProjectPaths, inputs: Inputs, scores: Scores, staged: dict[Path, Path]
) -> list[tuple[Path, str]]:
    """Step 3: DVC plots, tables and figures, each once. Returns (file, MLflow folder) pairs."""
    y, probs, labels = inputs.y, scores.probs, inputs.labels
    preds = probs.argmax(axis=1)
    model_curves = {"roc": curves.roc_rows(y, probs), "pr": curves.pr_rows(y, probs)}
    rows = {
        paths.roc_curve: model_curves["roc"],
        paths.pr_curve: model_curves["pr"],
        paths.reliability_curve: metrics.reliability_bins(y, probs),
        paths.confusion_rows: curves.confusion_rows(y, preds, labels),
    }
    files: list[tuple[Path, str]] = []
    for target, data in rows.items():
        staged[target].write_text(json.dumps(data, indent=1) + "\n")
        files.append((staged[target], "plots"))
    folder = staged[paths.evaluate_dir]
    folder.mkdir()
    cm = curves.confusion_counts(y, preds, len(labels))
    (folder / "confusion_matrix.json").write_text(
        json.dumps(
            {"labels": labels, "rows": "true", "columns": "predicted", "matrix": cm.tolist()}, indent=2
        )
    )
    tables.write_csv(folder / "per_class.csv", scores.per_class, PER_CLASS_COLUMNS)
    errors = tables.worst_errors(inputs.texts, y, probs, labels, limit=params.evaluate.worst_errors)
    tables.write_csv(folder / "worst_errors.csv", errors, ERROR_COLUMNS)
    tables.write_predictions(folder / "predictions.parquet", inputs.texts, y, probs, labels)
    _draw_figures(folder, inputs, scores, model_curves, cm)
    files.extend((path, "evaluate") for path in sorted(folder.iterdir()))
    return files


def _draw_figures(
    folder: Path, inputs: Inputs, scores: Scores, model_curves: dict[str, list], cm: np.ndarray
) -> None:
    """The PNGs of the curves (model beside baseline) and of the confusion matrix."""
    y, base = inputs.y, scores.baseline_probs
    roc = {"model": model_curves["roc"], "baseline": curves.roc_rows(y, base)}
    pr = {"model": model_curves["pr"], "baseline": curves.pr_rows(y, base)}
    reliability = {
        "model": metrics.reliability_bins(y, scores.probs),
        "baseline": metrics.reliability_bins(y, base),
    }
    curves.plot_curve(folder / "roc.png", roc, x="fpr", y="tpr", title="ROC (test)", diagonal=True)
    curves.plot_curve(
        folder / "precision_recall.png", pr, x="recall", y="precision", title="precision-recall (test)"
    )
    curves.plot_curve(
        folder / "reliability.png",
        reliability,
        x="confidence",
        y="accuracy",
        title=f"reliability, {metrics.ECE_BINS} bins (test)",
        diagonal=True,
    )
    curves.plot_confusion(cm, inputs.labels, folder / "confusion_matrix.png")


# ---- model card (bigmodel_ops/evaluation/card.py) ---------------------------------------------


def _publish_model_card(
    stage: Any,
    params: Params,
    paths: ProjectPaths,
    inputs: Inputs,
    values: dict[str, float],
    promotion: dict[str, Any],
    staged: dict[Path, Path],
) -> None:
    """Step 5b: the version's model card: written to ``evaluate/model_card.md``, logged to this run,
    and set as the version's description (replacing the gate's one-line description, which the
    card contains)."""
    name, version = promotion["model"], str(promotion["version"])
    cost = _lineage_cost(stage.client, promotion)
    _tag_cost(stage.client, name, version, cost)
    text = card.model_card(
        name=name,
        version=version,
        labels=inputs.labels,
        metrics=values,
        promotion=promotion,
        version_tags=stage.client.get_model_version(name, version).tags,
        params=params,
        classifier_config=inputs.classifier.config,
        pretrain_report=paths.pretrain_report,
        best_params=paths.best_params,
        n_test=len(inputs.texts),
        n_train=len(inputs.train_texts),
        cost=cost,
    )
    card_file = staged[paths.evaluate_dir] / card.CARD_FILE
    card_file.write_text(text)
    stage.log_artifact(card_file, "evaluate")
    stage.client.update_model_version(name, version, description=card.description(stage.scrub(text)))


def _lineage_cost(client: Any, promotion: dict[str, Any]) -> dict[str, Any]:
    """{stage: Cost or None} of the pretrain, tune and finetune runs that made the version (their
    ``cost/*`` metrics, a run's child runs, i.e. tune's trials, included); None where the run is
    unknown, unreadable or logged no cost."""
    from bigmodel_ops.tracking.frontpage import run_cost

    cost: dict[str, Any] = {}
    for stage in LINEAGE_STAGES:
        run_id = promotion.get(f"{stage}_run_id")
        cost[stage] = None
        if run_id and run_id != "unknown":
            try:
                cost[stage] = run_cost(client, run_id)
            except Exception as error:  # noqa: BLE001 - a deleted run only leaves a gap on the card
                _logger.warning("evaluate: no cost for the %s run %s: %s", stage, run_id, error)
    return cost


def _tag_cost(client: Any, name: str, version: str, cost: dict[str, Any]) -> None:
    """The version's total cost as tags ``cost.<key>`` (nothing when no run logged a cost)."""
    from bigmodel_ops.cost import SOURCE_TAG

    found = [c for c in cost.values() if c is not None]
    if not found:
        return
    total = sum(found[1:], found[0])
    tags = {f"cost.{k}": f"{v:.6g}" for k, v in total.as_dict().items()}
    tags[SOURCE_TAG] = total.energy_source or "estimate"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _json_safe(values: dict[str, float]) -> dict[str, float | None]:
    """Non-finite values (an undefined ROC-AUC) become null: JSON has no NaN."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def _log_run(stage: Any, values: dict[str, float], files: list[tuple[Path, str]]) -> None:
    """Step 4: the metrics (finite ones) and the files written in step 3."""
    stage.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=0)
    for path, folder in files:
        stage.log_artifact(path, folder)


def _read_run_id(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _register(
    stage: Any, params: Params, paths: ProjectPaths, inputs: Inputs, values: dict[str, float], *, name: str
) -> dict[str, Any]:
    """Step 5: check the labels, register the version with its lineage tags, apply the gate."""
    from bigmodel_ops.tracking import registry

    ev = params.evaluate
    client = stage.client
    registry.check_labels(client, name, inputs.labels)
    stage.flush()  # the run's lineage tags must be in the store before they are read back
    known = {
        "pretrain": _read_run_id(paths.pretrain_report),
        "tune": _read_run_id(paths.tune_report),
        "finetune": inputs.source_run_id,
    }
    lineage = registry.run_lineage(client, stage.run_id, stages=LINEAGE_STAGES, known=known)
    tags = {
        **{k: repr(v) if not math.isfinite(v) else str(v) for k, v in values.items()},
        registry.LABELS_TAG: registry.labels_tag(inputs.labels),
        "evaluate_run_id": stage.run_id,
        **lineage,
    }
    version = registry.register_run_model(
        client, run_id=inputs.source_run_id, artifact_path=inputs.artifact_path, name=name, tags=tags
    )
    gate = registry.Gate(**ev.gate.model_dump())
    promoted, reason = registry.apply_gate(
        client,
        name=name,
        version=version.version,
        gate=gate,
        metrics=values,
        promote_alias=ev.promote_alias,
        challenger_alias=ev.challenger_alias,
    )
    alias = ev.promote_alias if promoted else ev.challenger_alias
    stage.set_tags(
        {
            "registered_model": name,
            "model_version": version.version,
            "model_alias": alias,
            "promotion_reason": reason,
        }
    )
    return {
        "model": name,
        "version": int(version.version),
        "alias": alias,
        "aliases": [ev.challenger_alias, ev.promote_alias] if promoted else [ev.challenger_alias],
        "promoted": promoted,
        "reason": reason,
        "gate": gate.as_dict(),
        "source_run_id": inputs.source_run_id,
        **{k: v for k, v in lineage.items() if k.endswith("_run_id")},
    }
