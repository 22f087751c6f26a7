"""The pipeline run tree: one parent run per pipeline version, one child run per stage.

A pipeline id (lineage.py) names one version of the pipeline; its parent run ``pipeline-<id>`` is
tagged ``bigmodel_ops.pipeline_id`` and ``bigmodel_ops.role = pipeline``, and ends with the status
of the stage that ended last. DVC skips a stage whose inputs did not change, so a successful stage
tags the parent ``bigmodel_ops.stage_run.<stage> = <run id>`` and records itself in
``.bigmodel_ops/stage_runs.json`` (not a DVC output); a new parent copies every recorded stage run
as its tags (``bigmodel_ops.stage_from.<stage>``: that run's pipeline id). Find-or-create holds a
``flock`` on ``.bigmodel_ops/pipeline.lock``; machines sharing a server can still race, so after
creating a parent we search again and, if an older parent of the same id exists, use that one.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from bigmodel_ops.fsutil import flocked, write_json_atomic

PIPELINE_TAG = "bigmodel_ops.pipeline_id"
ROLE_TAG = "bigmodel_ops.role"
STAGE_RUN_TAG = "bigmodel_ops.stage_run."
STAGE_FROM_TAG = "bigmodel_ops.stage_from."
REGISTRY_FILE = Path(".bigmodel_ops") / "stage_runs.json"
LOCK_FILE = Path(".bigmodel_ops") / "pipeline.lock"


def read_registry(root: Path) -> dict[str, dict[str, Any]]:
    """The local stage-run registry ({stage: {run_id, pipeline_id, finished}}); {} if absent/corrupt."""
    try:
        data = json.loads((root / REGISTRY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def record_stage(root: Path, *, stage: str, run_id: str, pipeline_id: str | None) -> None:
    """Atomically record the run that produced a stage's current outputs."""
    with flocked(root / LOCK_FILE):
        stages = read_registry(root)
        finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        stages[stage] = {"run_id": run_id, "pipeline_id": pipeline_id, "finished": finished}
        write_json_atomic(root / REGISTRY_FILE, {"stages": dict(sorted(stages.items()))})


def _search(client: MlflowClient, experiment_id: str, pipeline_id: str) -> list[Any]:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=50,
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_or_create_parent(
    client: MlflowClient, *, experiment_id: str, pipeline_id: str, root: Path, tags: dict[str, str]
) -> tuple[str, bool]:
    """(parent run id, created) for a pipeline id; new parents inherit the registry's stage runs."""
    with flocked(root / LOCK_FILE):
        found = _search(client, experiment_id, pipeline_id)
        if found:
            return found[0].info.run_id, False
        stage_tags = ("bigmodel_ops.stage", "bigmodel_ops.params_hash")  # the stage's, not the pipeline's
        parent_tags = {
            k: v for k, v in tags.items() if not k.startswith("bigmodel_ops.dep.") and k not in stage_tags
        }
        parent_tags.update({PIPELINE_TAG: pipeline_id, ROLE_TAG: "pipeline"})
        for stage, entry in read_registry(root).items():
            if isinstance(entry, dict) and entry.get("run_id"):
                parent_tags[STAGE_RUN_TAG + stage] = str(entry["run_id"])
                parent_tags[STAGE_FROM_TAG + stage] = str(entry.get("pipeline_id"))
        run = client.create_run(experiment_id, tags=parent_tags, run_name=f"pipeline-{pipeline_id}")
        ours = run.info.run_id
        winner = next((r.info.run_id for r in _search(client, experiment_id, pipeline_id)), ours)
        if winner != ours:
            client.delete_run(ours)  # another machine won the race
        return winner, winner == ours


def mark_stage_done(
    client: MlflowClient, *, parent_id: str, stage: str, run_id: str, pipeline_id: str | None
) -> None:
    """Point the parent at the run that produced this stage's outputs."""
    client.set_tag(parent_id, STAGE_RUN_TAG + stage, run_id)
    client.set_tag(parent_id, STAGE_FROM_TAG + stage, str(pipeline_id))
