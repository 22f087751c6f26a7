"""Stage runs: one MLflow child run per stage under one parent run per pipeline.

FIRST VERSION: synchronous, minimal. The tracking owner deepens this module
(pipeline ids, lineage, async/spooled logging, signal handling) without changing
the public surface used by stages: stage_run(...) and the StageRun methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import Params, flatten


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params.tracking.uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


class StageRun:
    """Handle on the active MLflow run of one stage."""

    def __init__(self, client: MlflowClient, run_id: str, params: Params) -> None:
        self.client = client
        self.run_id = run_id
        self.params = params

    def log_params(self, values: Mapping[str, Any]) -> None:
        flat = flatten(dict(values))
        for key, value in flat.items():
            self.client.log_param(self.run_id, key, value)

    def log_metrics(self, values: Mapping[str, float], *, step: int = 0) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_text(json.dumps(data, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.log_artifact(target, None if parent == "." else parent)

    def flush(self) -> None:
        """Block until everything logged so far has reached the store."""


@contextlib.contextmanager
def stage_run(
    params: Params,
    *,
    stage: str,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Start (or, with resume_run_id, re-attach to) the MLflow run of a stage.

    The run ends FINISHED on success and FAILED on an exception (re-raised).
    """
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(
            params.experiment_name, artifact_location=_artifact_location(params, uri)
        )
    else:
        experiment_id = experiment.experiment_id
    if resume_run_id is not None:
        run_id = resume_run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {"bigmodel_ops.stage": stage, "mlflow.runName": run_name or stage}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(experiment_id, tags=tags, run_name=run_name or stage).info.run_id
    run = StageRun(client, run_id, params)
    try:
        yield run
    except BaseException:
        run.flush()
        client.set_terminated(run_id, status="FAILED")
        raise
    run.flush()
    client.set_terminated(run_id, status="FINISHED")


def _artifact_location(params: Params, uri: str) -> str | None:
    location = params.tracking.artifact_location
    if "://" in location:
        return location
    if uri.startswith(("http://", "https://")):
        return None  # the server decides
    return Path(location).resolve().as_uri()
