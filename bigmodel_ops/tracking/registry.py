"""Model Registry helpers: register a run's model (:func:`register_run_model`, guarded by
:func:`check_labels`), tag where it came from (:func:`run_lineage`), promote it past a gate
(:func:`apply_gate`). Aliases, not the deprecated stages; every helper takes an ``MlflowClient``,
so they work with any tracking / registry store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bigmodel_ops.errors import CheckpointError, ConfigError
from bigmodel_ops.tracking.pipeline import STAGE_RUN_TAG

_logger = logging.getLogger(__name__)

LABELS_TAG = "labels"
_LINEAGE = "bigmodel_ops."
_CODE_DEPS = ("bigmodel_ops/", "stages/")  # code is versioned by the git commit, not as data


def _logged_model_id(client: MlflowClient, *, run_id: str, experiment_id: str, name: str) -> str | None:
    """The newest MLflow 3 LoggedModel named ``name`` whose source run is ``run_id``, if any."""
    found, page_token = [], None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'", page_token=page_token
        )
        found.extend(m for m in page if m.source_run_id == run_id)
        if not (page_token := page.token):
            break
    newest = max(found, key=lambda m: m.creation_timestamp or 0, default=None)
    return None if newest is None else newest.model_id


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
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version = client.create_model_version(
        name=name, source=source, run_id=run_id, tags=tags, model_id=model_id
    )
    _logger.info("registered %s version %s from run %s (%s)", name, version.version, run_id, source)
    return version


def _unless_missing(fn: Callable[[], Any], *codes: str) -> Any:
    """``fn()``, or None when the registry answers that what it asked for does not exist."""
    try:
        return fn()
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", *codes):
            return None
        raise


def labels_tag(labels: Iterable[str]) -> str:
    """The ``labels`` tag of a version: its labels in order, as JSON."""
    return json.dumps(list(labels))


def check_labels(client: MlflowClient, name: str, labels: Iterable[str]) -> None:
    """ConfigError when registered model ``name`` exists and its latest version is tagged with other
    labels: its versions would not be interchangeable behind an alias. A latest version without the
    tag (registered before versions were tagged) is accepted."""
    labels = list(labels)
    versions = _unless_missing(lambda: client.search_model_versions(f"name = '{name}'")) or []
    latest = max(versions, key=lambda v: int(v.version), default=None)
    raw = latest.tags.get(LABELS_TAG) if latest is not None else None
    if raw is None:
        return
    try:
        theirs = json.loads(raw)
    except ValueError:
        theirs = raw
    if theirs != labels:
        raise ConfigError(
            f"registered model {name!r} already holds a classifier of other labels (version "
            f"{latest.version}: {theirs}; this one: {labels}); set evaluate.registered_model to another "
            "name, or delete the old model"
        )


def run_lineage(
    client: MlflowClient, run_id: str, *, stages: Iterable[str], known: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """Version tags that lead back to what produced a model, from the lineage tags of run ``run_id``
    (the evaluate run) and of its pipeline parent run.

    ``git_commit``, ``pipeline_id``; ``data.<path>``: the dvc.lock md5 of each data dependency of
    the run's stage (code deps are covered by the commit) and ``data_version``, a hash of them all;
    ``<stage>_run_id`` for each of ``stages``: ``known[stage]`` when given, else the run the parent
    records as having produced that stage's outputs. Unknown values are ``unknown``.
    """
    tags = client.get_run(run_id).data.tags
    parent_tags: Mapping[str, str] = {}
    if parent := tags.get("mlflow.parentRunId"):
        with contextlib.suppress(MlflowException):
            parent_tags = client.get_run(parent).data.tags
    dep = _LINEAGE + "dep."
    data = {
        key[len(dep) :]: value
        for key, value in sorted(tags.items())
        if key.startswith(dep) and not key[len(dep) :].startswith(_CODE_DEPS)
    }
    result = {key: tags.get(_LINEAGE + key, "unknown") for key in ("git_commit", "git_dirty", "pipeline_id")}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    result["data_version"] = digest if data else "unknown"
    result.update({f"data.{path}": md5 for path, md5 in data.items()})
    for stage in stages:
        result[f"{stage}_run_id"] = (
            (known or {}).get(stage) or parent_tags.get(STAGE_RUN_TAG + stage) or "unknown"
        )
    return result


@dataclass(frozen=True)
class Gate:
    """The promotion gate: ``metric`` (higher is better) must reach ``min`` and the current
    champion's value plus ``min_margin_over_champion``; each ``max`` metric must not exceed its
    ceiling. NaN fails every check."""

    metric: str
    min: float = 0.0
    min_margin_over_champion: float = 0.0
    max: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "max": dict(self.max)}


def _champion_check(
    client: MlflowClient, *, name: str, version: str, gate: Gate, value: float, alias: str
) -> tuple[bool, str]:
    holder = _unless_missing(
        lambda: client.get_model_version_by_alias(name, alias), "INVALID_PARAMETER_VALUE"
    )
    if holder is None:
        return True, f"no current {alias}"
    if str(holder.version) == version:
        return True, f"version {version} already holds {alias}"
    try:
        current = float(holder.tags.get(gate.metric, "nan"))
    except ValueError:
        current = math.nan
    if math.isnan(current):
        return True, f"current {alias} v{holder.version} has no {gate.metric} tag to compare with"
    needed = current + gate.min_margin_over_champion
    margin = f" + margin {gate.min_margin_over_champion:g}" if gate.min_margin_over_champion else ""
    if value >= needed:
        return True, f"{gate.metric} {value:.4f} >= {alias} v{holder.version} {current:.4f}{margin}"
    return False, f"{gate.metric} {value:.4f} < {alias} v{holder.version} {current:.4f}{margin}"


def decide(
    client: MlflowClient,
    *,
    name: str,
    version: str | int,
    gate: Gate,
    metrics: Mapping[str, float],
    alias: str,
) -> tuple[bool, str]:
    """(passed, reason) for a version with these metrics; the reason lists every check, failed
    ones first. KeyError when the gate names a metric missing from ``metrics``."""
    value = float(metrics[gate.metric])
    passed = value >= gate.min  # False for NaN
    checks = [(passed, f"{gate.metric} {value:.4f} {'>=' if passed else '<'} min {gate.min:g}")]
    for key, ceiling in gate.max.items():
        observed = float(metrics[key])
        ok = observed <= ceiling
        checks.append((ok, f"{key} {observed:.4f} {'<=' if ok else '>'} max {ceiling:g}"))
    checks.append(
        _champion_check(client, name=name, version=str(version), gate=gate, value=value, alias=alias)
    )
    failed = [text for ok, text in checks if not ok]
    if failed:
        return False, "failed: " + "; ".join(failed + [text for ok, text in checks if ok])
    return True, "passed: " + "; ".join(text for _, text in checks)


def apply_gate(
    client: MlflowClient,
    *,
    name: str,
    version: str | int,
    gate: Gate,
    metrics: Mapping[str, float],
    promote_alias: str = "champion",
    challenger_alias: str = "challenger",
) -> tuple[bool, str]:
    """Decide (:func:`decide`), then: ``challenger_alias`` on the version in any case,
    ``promote_alias`` too when it passed; tags ``promoted`` (true/false), ``promotion_reason`` and
    ``gate`` (the gate as JSON) and the reason as the version's description. Returns (promoted, reason).
    """
    version = str(version)
    promoted, reason = decide(
        client, name=name, version=version, gate=gate, metrics=metrics, alias=promote_alias
    )
    client.set_registered_model_alias(name, challenger_alias, version)
    if promoted:
        client.set_registered_model_alias(name, promote_alias, version)
    client.set_model_version_tag(name, version, "promoted", str(promoted).lower())
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    client.set_model_version_tag(name, version, "gate", json.dumps(gate.as_dict(), sort_keys=True))
    outcome = f"promoted to {promote_alias}" if promoted else f"kept as {challenger_alias}"
    client.update_model_version(name, version, description=f"Gate: {outcome}. {reason}")
    _logger.info("%s version %s: %s (%s)", name, version, outcome, reason)
    return promoted, reason
