"""A registered, servable classifier without training: the evaluate helpers' fabricated project,
its classifier logged as the pyfunc model (bigmodel_ops.serving, as the finetune stage does), then
the real evaluate stage, which registers it, applies the gate (champion) and writes the model card."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline.evaluate import run as run_evaluate
from bigmodel_ops.serving import log_pyfunc_model
from tests.helpers_evaluate import MODEL_NAME, make_evaluate_project, write_pretrain_report

CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


@dataclass
class Registered:
    root: Path
    uri: str  # the tracking store
    params: Any
    paths: ProjectPaths
    params_file: Path
    finetune_run_id: str
    report: dict[str, Any]


def make_registered_model(root: Path, migrated_store: Path) -> Registered:
    """Fabricate, log, register and promote under root with its own sqlite store (copied from the
    migrated template). Sets MLFLOW_TRACKING_URI and the working directory only while it runs."""
    db = root / "mlflow.db"
    shutil.copy(migrated_store, db)
    uri = f"sqlite:///{db}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        from bigmodel_ops.serving import fluent_tracking_uri

        restore = fluent_tracking_uri(uri)
        restore.__enter__()
        params, paths, params_file, run_id = make_evaluate_project(root, gate={"min": 0.0, "max": {}})
        write_pretrain_report(paths, "pretrain-run-0")
        paths.tune_dir.mkdir(parents=True, exist_ok=True)
        paths.best_params.write_text(
            yaml.safe_dump({"lr": 0.003, "batch_size": 16, "value": 0.75, "trial": 1}, sort_keys=False)
        )
        client = MlflowClient(uri)
        client.update_run(run_id, status="RUNNING")
        log_pyfunc_model(
            SimpleNamespace(client=client, run_id=run_id),
            paths.classifier,
            tracking_uri=uri,
            input_texts=["a great film", "   "],
        )
        client.set_terminated(run_id)
        report = run_evaluate(params, paths=paths, quiet=True)
        restore.__exit__(None, None, None)
    return Registered(root, uri, params, paths, params_file, run_id, report)
