"""Evaluate the classifier on the test split, register it and promote it past the gate.

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
from typing import Any

import torch

from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.inputs import read_labeled_split
from bigmodel_ops.config import Params
from bigmodel_ops.contract import CONFIG_FILE
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.evaluation import evaluate_texts, plot_confusion, write_predictions
from bigmodel_ops.fsutil import publish
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run

_logger = logging.getLogger(__name__)

GATE_METRIC = "test_acc"


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the classifier on the test split, register it and promote it past the gate.

    Returns the report. Outputs are published only after registration and the gate succeeded.
    """
    from bigmodel_ops.tracking.registry import promote_if_better, register_run_model

    classifier = load_classifier(paths.classifier)
    config_file = paths.classifier / CONFIG_FILE
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

    with publish(paths.evaluate_dir, paths.evaluate_report) as pub:
        staging = pub.staged(paths.evaluate_dir)
        staging.mkdir()
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
        write_predictions(
            staging / "predictions.parquet", texts, labels, targets, result["preds"], result["scores"]
        )

        name = f"{params.project.name}-classifier"
        with stage_run(params, "evaluate") as run:
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
            pub.staged(paths.evaluate_report).write_text(json.dumps(report, indent=2) + "\n")
        _logger.info(
            "evaluate: test_acc %.4f; %s v%s -> %s (%s)",
            metrics["test_acc"],
            name,
            version.version,
            alias,
            reason,
        )
    return report
