"""Model Registry helpers: register a model folder logged as run artifacts.

Our models are plain folders (``model.safetensors`` + ``config.json`` + tokenizer), not MLflow
flavours, so they are registered straight from the run's artifact URI. Promotion uses aliases
(stages are deprecated in MLflow).
"""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


def register_run_artifact(
    client: MlflowClient,
    *,
    run_id: str,
    artifact_path: str,
    name: str,
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> ModelVersion:
    """Create a new version of registered model ``name`` (created if absent) from a run's
    artifact folder; optionally point ``alias`` at it. Returns the ModelVersion."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    artifact_uri = client.get_run(run_id).info.artifact_uri.rstrip("/")
    version = client.create_model_version(
        name, source=f"{artifact_uri}/{artifact_path}", run_id=run_id, tags=dict(tags or {})
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return version
