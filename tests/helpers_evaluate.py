"""A project ready for the evaluate stage, without training: fabricated splits, an untrained tiny
classifier exported like the finetune stage does, and a ``finetune`` MLflow run holding it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.classification.export import save_classifier
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.config import Params, parse_params
from bigmodel_ops.model import TransformerLM, read_exported_config
from bigmodel_ops.paths import ProjectPaths
from tests.helpers_finetune import make_project, tiny_params

EXPERIMENT = "ft-test"
MODEL_NAME = "ft-test-classifier"
FAST = {"latency_repeats": 2, "latency_warmup": 0, "batch_size": 16}


def evaluate_params(root: Path, **evaluate: Any) -> tuple[Params, Path]:
    """The tiny params with ``evaluate`` overrides (no old ``min_accuracy``), written to root/params.yaml."""
    raw = tiny_params()
    raw["evaluate"].pop("min_accuracy", None)
    raw["evaluate"].update({**FAST, **evaluate})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw), path


def make_evaluate_project(root: Path, *, n_train: int = 48, n_eval: int = 24, seed: int = 0, **evaluate: Any):
    """(params, paths, params file, finetune run id) for a project whose classifier is untrained."""
    _, paths, _ = make_project(root, n_train=n_train, n_eval=n_eval)
    params, params_file = evaluate_params(root, **evaluate)
    config, _ = read_exported_config(paths.pretrained_model)
    torch.manual_seed(seed)
    model = SequenceClassifier(TransformerLM(config), num_labels=len(params.prepare.labels))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    )
    run_id = client.create_run(experiment_id, run_name="finetune").info.run_id
    save_classifier(
        model,
        paths.classifier,
        labels=params.prepare.labels,
        max_length=24,
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
        extra={"mlflow_run_id": run_id, "mlflow_artifact_path": "classifier"},
    )
    client.log_artifacts(run_id, str(paths.classifier), "classifier")
    client.set_terminated(run_id)
    return params, paths, params_file, run_id


def write_pretrain_report(paths: ProjectPaths, run_id: str) -> None:
    paths.pretrain_report.parent.mkdir(parents=True, exist_ok=True)
    paths.pretrain_report.write_text(json.dumps({"run_id": run_id}))
