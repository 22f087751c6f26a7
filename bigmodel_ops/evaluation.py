"""The evaluate stage: test-split metrics, then registration and the promotion gate.

1. Load the exported classifier (safetensors) and the test split (labels checked against
   ``prepare.labels`` and against the classifier's own labels).
2. Metrics: ``test_acc``, ``test_f1`` (macro), ``test_loss`` (mean cross-entropy),
   ``test_precision_<label>`` / ``test_recall_<label>``, and the confusion matrix (rows = true
   labels, columns = predictions) as JSON and PNG.
3. MLflow run ``evaluate``: the metrics and artifacts; then the finetune run's pyfunc model
   (``mlflow_run_id`` / ``mlflow_artifact_path`` in the classifier's config.json) is registered as
   ``<project>-classifier``, the version tagged with the test metrics, and the gate applied
   (registry.promote_if_better): alias ``evaluate.promote_alias`` when ``test_acc >=
   evaluate.min_accuracy`` and not below the current holder's ``test_acc`` tag, else
   ``evaluate.challenger_alias``.
4. Outputs, moved into place only after all of that succeeded: ``paths.evaluate_dir/``
   (confusion_matrix.png, confusion_matrix.json, predictions.parquet with text / label / pred /
   score, promotion.json with version, alias and reason) and ``paths.evaluate_report`` (the metrics
   plus ``promoted`` 0/1 and ``model_version``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bigmodel_ops.classification import (
    confusion_matrix,
    load_classifier,
    metrics_from_confusion,
    read_labeled_split,
)
from bigmodel_ops.config import Params
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.fsutil import replace_dir, write_json_atomic
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.progress import progress

_logger = logging.getLogger(__name__)

GATE_METRIC = "test_acc"


def _metric_key(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def evaluate_texts(
    classifier: Any, texts: list[str], targets: torch.Tensor, *, batch_size: int, quiet: bool
) -> dict[str, Any]:
    """Predictions and metrics for texts with true class ids ``targets``."""
    chunks = []
    for start in progress(
        range(0, len(texts), batch_size),
        desc="evaluate",
        total=-(-len(texts) // batch_size),
        unit="batch",
        quiet=quiet,
    ):
        chunks.append(classifier.logits(texts[start : start + batch_size], batch_size=batch_size))
    logits = torch.cat(chunks)
    probs = torch.softmax(logits, dim=-1)
    scores, preds = probs.max(dim=-1)
    cm = confusion_matrix(preds, targets, len(classifier.labels))
    summary = metrics_from_confusion(cm)
    metrics: dict[str, float] = {
        "test_acc": summary["accuracy"],
        "test_f1": summary["macro_f1"],
        "test_loss": float(F.cross_entropy(logits, targets)),
    }
    for label, precision, recall in zip(
        classifier.labels, summary["precision"], summary["recall"], strict=True
    ):
        metrics[f"test_precision_{_metric_key(label)}"] = precision
        metrics[f"test_recall_{_metric_key(label)}"] = recall
    return {"metrics": metrics, "confusion": cm, "preds": preds, "scores": scores}


def plot_confusion(cm: torch.Tensor, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    try:
        axes.imshow(cm.numpy(), cmap="Blues")
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        peak = int(cm.max()) if cm.numel() else 0
        for (i, j), count in zip(
            ((i, j) for i in range(len(labels)) for j in range(len(labels))),
            cm.flatten().tolist(),
            strict=True,
        ):
            axes.text(
                j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black"
            )
        axes.set_title("confusion matrix (test)")
        figure.savefig(path, bbox_inches="tight", dpi=100)
    finally:
        plt.close(figure)


def _write_predictions(
    path: Path,
    texts: list[str],
    labels: list[str],
    targets: torch.Tensor,
    preds: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array([labels[i] for i in targets.tolist()], pa.string()),
            "pred": pa.array([labels[i] for i in preds.tolist()], pa.string()),
            "score": pa.array(scores.tolist(), pa.float32()),
        }
    )
    pq.write_table(table, path)


def run_evaluate(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Evaluate on the test split, register and gate the model; return the report."""
    from bigmodel_ops.registry import promote_if_better, register_run_model
    from bigmodel_ops.tracking import stage_run

    classifier = load_classifier(paths.classifier)
    config_file = paths.classifier / "config.json"
    if classifier.labels != list(params.prepare.labels):
        raise CheckpointError(
            f"{config_file}: the classifier was trained on labels {classifier.labels}, but prepare.labels is "
            f"{list(params.prepare.labels)} (re-run the finetune stage)"
        )
    run_id = classifier.config.get("mlflow_run_id")
    artifact_path = classifier.config.get("mlflow_artifact_path")
    if not run_id or not artifact_path:
        raise CheckpointError(
            f"{config_file}: no mlflow_run_id / mlflow_artifact_path (re-run the finetune stage)"
        )
    texts, ids = read_labeled_split(paths.prepared / "test.parquet", params.prepare.labels)
    targets = torch.as_tensor(ids, dtype=torch.long)
    result = evaluate_texts(classifier, texts, targets, batch_size=params.evaluate.batch_size, quiet=quiet)
    metrics = result["metrics"]
    labels = classifier.labels

    target = paths.evaluate_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        plot_confusion(result["confusion"], labels, staging / "confusion_matrix.png")
        (staging / "confusion_matrix.json").write_text(
            json.dumps(
                {
                    "labels": labels,
                    "rows": "true",
                    "columns": "predicted",
                    "matrix": result["confusion"].tolist(),
                },
                indent=2,
            )
        )
        _write_predictions(
            staging / "predictions.parquet", texts, labels, targets, result["preds"], result["scores"]
        )

        name = f"{params.project.name}-classifier"
        with stage_run(params, stage="evaluate") as run:
            run.log_metrics(metrics, step=0)
            run.log_artifact(staging / "confusion_matrix.png", "evaluate")
            run.log_artifact(staging / "confusion_matrix.json", "evaluate")
            run.log_artifact(staging / "predictions.parquet", "evaluate")
            run.flush()
            version = register_run_model(
                run.client,
                run_id=run_id,
                artifact_path=artifact_path,
                name=name,
                tags={**{k: str(v) for k, v in metrics.items()}, "evaluate_run_id": run.run_id},
            )
            promoted, reason = promote_if_better(
                run.client,
                name=name,
                version=version.version,
                metric=GATE_METRIC,
                value=metrics[GATE_METRIC],
                alias=params.evaluate.promote_alias,
                min_value=params.evaluate.min_accuracy,
                challenger_alias=params.evaluate.challenger_alias,
            )
            alias = params.evaluate.promote_alias if promoted else params.evaluate.challenger_alias
            promotion = {
                "model": name,
                "version": int(version.version),
                "alias": alias,
                "promoted": promoted,
                "reason": reason,
                "source_run_id": run_id,
            }
            (staging / "promotion.json").write_text(json.dumps(promotion, indent=2))
            run.log_metrics({"promoted": float(promoted), "model_version": float(version.version)}, step=0)
            run.set_tags(
                {
                    "registered_model": name,
                    "model_version": version.version,
                    "model_alias": alias,
                    "promotion_reason": reason,
                }
            )
            report = {**metrics, "promoted": int(promoted), "model_version": int(version.version)}
            replace_dir(staging, target)
            write_json_atomic(paths.evaluate_report, report)
        _logger.info(
            "evaluate: test_acc %.4f; %s v%s -> %s (%s)",
            metrics["test_acc"],
            name,
            version.version,
            alias,
            reason,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
