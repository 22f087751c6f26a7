"""Compress the classifier: int8 (torch) and ONNX (fp32, int8) variants, measured against fp32.

1. Inputs: the exported classifier (labels must be ``prepare.labels``), the test split, and the
   registered version the evaluate stage made of it (``paths.evaluate_report``: ``model_version``
   of ``evaluate.registered_model``, default ``<project>-classifier``).
2. Variants and figures (:func:`bigmodel_ops.compression.compress_classifier`): int8 dynamic
   quantisation of the Linear layers, an ONNX export run with onnxruntime (checked against torch on
   a fixed batch: beyond ``compress.tolerance`` a CheckpointError names the file and nothing is
   published) and its onnxruntime int8 quantisation; accuracy drop in points, prediction agreement,
   CPU latency at batch 1 and 32 and size, as ratios against the fp32 model measured in the same run.
   A variant that loses more than ``compress.max_acc_drop_points`` is flagged
   (``<variant>_within_budget`` 0, a warning, a tag on the version), or fails the stage with
   ``on_acc_drop: fail``.
3. Files: ``paths.compress_dir`` (model.int8.safetensors + config.json + tokenizer.json,
   model.onnx, model.int8.onnx, report.json; with ``compress.huggingface``, ``hf/classifier`` and
   ``hf/backbone`` in the transformers format, :func:`bigmodel_ops.export_hf.export_hf`) and
   ``paths.compress_report`` (DVC metrics).
4. MLflow: run ``compress`` with the metrics and the files as artifacts; the registered version is
   tagged ``compress.<metric>`` and ``compress_run_id``. Outputs are moved into place last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bigmodel_ops import compression
from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.inputs import read_labeled_split
from bigmodel_ops.config import Params
from bigmodel_ops.contract import CONFIG_FILE
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.export_hf import export_hf, require_transformers
from bigmodel_ops.fsutil import publish
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run

_logger = logging.getLogger(__name__)

# Tagged on the registered version as compress.<name> (every metric goes to the MLflow run).
VERSION_TAGS = (
    "int8_speedup",
    "int8_acc_drop_points",
    "int8_agreement",
    "int8_size_ratio",
    "int8_within_budget",
    "onnx_speedup",
    "onnx_acc_drop_points",
    "onnx_agreement",
    "onnx_size_ratio",
    "onnx_check_max_abs_diff",
    "onnx_int8_speedup",
    "onnx_int8_acc_drop_points",
    "onnx_int8_agreement",
    "onnx_int8_size_ratio",
    "onnx_int8_within_budget",
)


def registered_model_name(params: Params) -> str:
    """The evaluate stage's registered model (the same rule as bigmodel_ops.pipeline.evaluate,
    not imported from there so this stage does not depend on the evaluation code)."""
    return params.evaluate.registered_model or f"{params.project.name}-classifier"


def settings_from(params: Params) -> compression.Settings:
    c = params.compress
    return compression.Settings(
        exporter=c.exporter,
        onnx_opset=c.onnx_opset,
        onnx_int8=c.onnx_int8,
        tolerance=c.tolerance,
        check_batch=c.check_batch,
        batch_size=c.batch_size,
        latency_repeats=c.latency_repeats,
        latency_warmup=c.latency_warmup,
        max_acc_drop_points=c.max_acc_drop_points,
        threads=c.latency_threads,
    )


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Compress the classifier (int8, ONNX fp32 and int8) and measure each against the fp32 model.

    Returns the metrics. Outputs are published only after every check and the MLflow logging passed.
    """
    if not params.compress.enabled:
        return _skip(paths)
    if params.compress.huggingface:
        require_transformers("compress.huggingface: true")  # before any compute
    classifier = load_classifier(paths.classifier)
    labels = list(params.prepare.labels)
    if classifier.labels != labels:
        raise CheckpointError(
            f"{paths.classifier / CONFIG_FILE}: the classifier was trained on labels {classifier.labels}, "
            f"but prepare.labels is {labels} (re-run the finetune stage)"
        )
    texts, y = read_labeled_split(paths.prepared / "test.parquet", labels)
    name, version = registered_model_name(params), _model_version(paths.evaluate_report)
    with publish() as pub:
        folder = pub.staged(paths.compress_dir, name=paths.compress_dir.name)
        folder.mkdir()
        result = compression.compress_classifier(
            classifier, paths.classifier, texts, y, folder, settings=settings_from(params)
        )
        _check_budget(params, result)
        if params.compress.huggingface:
            exported = export_hf(paths, out=folder / "hf")
            _logger.info(
                "compress: Hugging Face export of %s in %s", ", ".join(sorted(exported)), folder / "hf"
            )
        report = {**result.metrics, "model_version": version}
        metrics_file = pub.staged(paths.compress_report, name=paths.compress_report.name)
        metrics_file.write_text(json.dumps(report, indent=2) + "\n")
        with stage_run(params, "compress") as stage:
            _check_version(stage.client, name, version, classifier.config.get("mlflow_run_id"))
            stage.log_metrics(result.metrics, step=0)
            stage.log_artifacts(folder, "compress")
            stage.log_artifact(metrics_file, "metrics")
            stage.set_tags({"registered_model": name, "model_version": str(version)})
            stage.flush()
            tags = {f"compress.{k}": f"{result.metrics[k]:.6g}" for k in VERSION_TAGS if k in result.metrics}
            tags["compress_run_id"] = stage.run_id
            for key, value in tags.items():
                stage.client.set_model_version_tag(name, str(version), key, value)
    m = result.metrics
    _logger.info(
        "compress: int8 x%.2f speed, %.2f size, %+.2f points; onnx x%.2f speed, %+.2f points (%s v%s)",
        m["int8_speedup"],
        m["int8_size_ratio"],
        -m["int8_acc_drop_points"],
        m["onnx_speedup"],
        -m["onnx_acc_drop_points"],
        name,
        version,
    )
    return report


def _skip(paths: ProjectPaths) -> dict[str, Any]:
    report = {"enabled": 0}
    with publish() as pub:
        folder = pub.staged(paths.compress_dir)
        folder.mkdir()
        (folder / compression.REPORT_FILE).write_text(json.dumps({"enabled": False}) + "\n")
        pub.staged(paths.compress_report).write_text(json.dumps(report) + "\n")
    _logger.info("compress: disabled (compress.enabled: false)")
    return report


def _model_version(report: Path) -> int:
    try:
        version = json.loads(report.read_text()).get("model_version")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"{report}: cannot read the evaluate report (run the evaluate stage first): {error}"
        ) from None
    if not isinstance(version, int):
        raise CheckpointError(f"{report}: no model_version (re-run the evaluate stage)")
    return version


def _check_budget(params: Params, result: compression.Result) -> None:
    budget = params.compress.max_acc_drop_points
    for variant in result.over_budget:
        drop = result.metrics[f"{variant}_acc_drop_points"]
        message = (
            f"compress: the {variant} model loses {drop:.2f} points of test accuracy against fp32, more "
            f"than compress.max_acc_drop_points {budget:g}"
        )
        if params.compress.on_acc_drop == "fail":
            raise CheckpointError(message + " (on_acc_drop: fail); nothing was published")
        _logger.warning("%s (flagged as %s_within_budget 0)", message, variant)


def _check_version(client: Any, name: str, version: int, run_id: str | None) -> None:
    """The version evaluate registered must come from the classifier compressed here."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise CheckpointError(
            f"registered model {name} version {version} (from the evaluate report) not found: "
            f"{error.message.splitlines()[0]} (re-run the evaluate stage)"
        ) from None
    if run_id and found.run_id != run_id:
        raise CheckpointError(
            f"registered model {name} version {version} comes from run {found.run_id}, but the classifier "
            f"was logged by run {run_id}: the evaluate report is stale (re-run the evaluate stage)"
        )
