"""Model Registry helpers: register a run's model, promote it past a gate with aliases.

Aliases, not the deprecated stages. Both helpers take an ``MlflowClient`` so they work with any
tracking / registry store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bigmodel_ops.errors import CheckpointError

_logger = logging.getLogger(__name__)

MLMODEL_FILE = "MLmodel"


def _logged_model_id(client: MlflowClient, *, run_id: str, experiment_id: str, name: str) -> str | None:
    """The newest MLflow 3 LoggedModel named ``name`` whose source run is ``run_id``, if any."""
    found = []
    page_token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'", page_token=page_token
        )
        found.extend(m for m in page if m.source_run_id == run_id)
        page_token = page.token
        if not page_token:
            break
    if not found:
        return None
    return max(found, key=lambda m: m.creation_timestamp or 0).model_id


def register_run_model(
    client: MlflowClient,
    *,
    run_id: str,
    artifact_path: str,
    name: str,
    tags: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register what run ``run_id`` logged at ``artifact_path`` as a new version of model ``name``.

    Works for any model: an MLflow 3 logged model named ``artifact_path`` (``log_model(name=...)``;
    the version then links to it), or a plain artifact folder of the run (an MLmodel directory or
    just safetensors + config). Creates the registered model on first use. Tag values are stored
    as strings.

    Raises CheckpointError when the run does not exist in this store or holds nothing at
    ``artifact_path``.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise CheckpointError(
            f"MLflow run {run_id} not found in the tracking store ({error.message.splitlines()[0]}); "
            "re-run the stage that logged the model against this store"
        ) from None
    model_id = _logged_model_id(
        client, run_id=run_id, experiment_id=run.info.experiment_id, name=artifact_path
    )
    if model_id is not None:
        source = f"models:/{model_id}"
    elif client.list_artifacts(run_id, artifact_path):
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    else:
        raise CheckpointError(f"MLflow run {run_id} has no model or artifacts at {artifact_path!r}")
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name=name,
        source=source,
        run_id=run_id,
        tags={str(k): str(v) for k, v in (tags or {}).items()},
        model_id=model_id,
    )
    _logger.info("registered %s version %s from run %s (%s)", name, version.version, run_id, source)
    return version


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def promote_if_better(
    client: MlflowClient,
    *,
    name: str,
    version: str | int,
    metric: str,
    value: float,
    alias: str = "champion",
    min_value: float = 0.0,
    challenger_alias: str = "challenger",
) -> tuple[bool, str]:
    """The promotion gate (higher ``metric`` is better). Returns (promoted, reason).

    ``version`` gets ``alias`` when ``value >= min_value`` and ``value`` is not below the
    ``metric`` tag of the version that holds ``alias`` now (ties promote: the newer model wins).
    Otherwise it gets ``challenger_alias``. Edge cases: no current holder -> only the threshold
    applies; the holder is this version -> kept; a holder without a readable ``metric`` tag cannot
    be compared and is replaced (the reason says so). The version is tagged ``promoted``
    (true/false) and ``promotion_reason``.
    """
    version = str(version)
    promoted, reason = _decide(
        client, name=name, version=version, metric=metric, value=value, alias=alias, min_value=min_value
    )
    client.set_registered_model_alias(name, alias if promoted else challenger_alias, version)
    client.set_model_version_tag(name, version, "promoted", str(promoted).lower())
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    _logger.info("%s version %s: %s", name, version, reason)
    return promoted, reason


def _decide(
    client: MlflowClient, *, name: str, version: str, metric: str, value: float, alias: str, min_value: float
) -> tuple[bool, str]:
    if not value >= min_value:  # also refuses NaN
        return False, f"{metric} {value:.4f} is below the minimum {min_value:.4f}"
    holder = _alias_holder(client, name, alias)
    if holder is None:
        return True, f"{metric} {value:.4f} >= minimum {min_value:.4f}; no current {alias}"
    if str(holder.version) == version:
        return True, f"version {version} already holds {alias}"
    raw = holder.tags.get(metric)
    try:
        current = float(raw) if raw is not None else None
    except ValueError:
        current = None
    if current is None:
        return (
            True,
            f"{metric} {value:.4f} >= minimum {min_value:.4f}; current {alias} v{holder.version} has no {metric} tag",
        )
    if value < current:
        return False, f"{metric} {value:.4f} is worse than {alias} v{holder.version} ({current:.4f})"
    return (
        True,
        f"{metric} {value:.4f} >= minimum {min_value:.4f} and >= {alias} v{holder.version} ({current:.4f})",
    )
