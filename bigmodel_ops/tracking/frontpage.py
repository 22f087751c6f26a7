"""The pipeline parent run as the front page of a pipeline in the MLflow UI.

When a stage finishes, the parent gets its headline metrics (``<stage>.<metric>``, those named
in ``tracking.headline_metrics``; a new parent copies them from the runs of the stages DVC will
skip), the recomputed cost sums of its stage runs (``cost.*``), and a redrawn DAG of dvc.yaml's
stages (``pipeline/dag.mmd`` and ``pipeline/dag.png``, each stage marked ran, reused, failed,
killed or not run). A shared view of the runs table shows those columns (:func:`table_url`), and
the parent records the prepared splits and token shards (:data:`DATASETS`) as dataset inputs
whose digest is their ``dvc.lock`` md5, once their producing stages have run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from bigmodel_ops.cost import KEYS as COST_KEYS
from bigmodel_ops.cost import SOURCE_TAG, Cost
from bigmodel_ops.tracking.pipeline import STAGE_FROM_TAG, STAGE_RUN_TAG

# The runs table with the headline columns: /#/experiments/<id>/runs?viewStateShareKey=<VIEW_KEY>
VIEW_KEY = "bigmodel-ops"
DATASETS = {"outputs/prepared": ("prepared", "training"), "outputs/shards": ("shards", "pretraining")}
DAG_DIR = "pipeline"
_COLOURS = {
    "ran": "#a5d6a7",
    "reused": "#e0e0e0",
    "failed": "#ef9a9a",
    "killed": "#ffcc80",
    "not run": "#ffffff",
}


def copy_headline(
    client: MlflowClient, *, parent_id: str, runs: Mapping[str, str], wanted: Mapping[str, list[str]]
) -> dict[str, float]:
    """Copy the metrics named in ``wanted`` of ``runs`` ({stage: run id}) onto the parent as
    ``<stage>.<metric>`` and return them; a missing metric, or a run that cannot be read (deleted,
    another store), contributes nothing."""
    values: dict[str, float] = {}
    for stage, run_id in runs.items():
        if wanted.get(stage):
            try:
                metrics = client.get_run(run_id).data.metrics
            except Exception:  # noqa: BLE001 - a missing run only leaves a gap on the front page
                continue
            values.update({f"{stage}.{key}": float(metrics[key]) for key in wanted[stage] if key in metrics})
    now = int(time.time() * 1000)
    if values:
        client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
    return values


PIPELINE_COST_PREFIX = "cost."  # the parent's sums: cost.device_hours, cost.cpu_hours, cost.energy_kwh


def run_cost(client: MlflowClient, run_id: str) -> Cost | None:
    """The cost a run logged (``cost/*`` metrics, tag ``cost.energy_source``) plus that of its
    child runs (the tune run's trials); None when none of them logged any. Raises when the run
    cannot be read."""
    run = client.get_run(run_id)
    runs, token = [run], None
    while True:
        children = f"tags.`mlflow.parentRunId` = '{run_id}'"
        page = client.search_runs([run.info.experiment_id], children, max_results=1000, page_token=token)
        runs.extend(page)
        if not (token := page.token):
            break
    costs = [Cost.from_metrics(r.data.metrics, r.data.tags.get(SOURCE_TAG, "")) for r in runs]
    found = [c for c in costs if c is not None]
    return sum(found[1:], found[0]) if found else None


def log_pipeline_cost(client: MlflowClient, *, parent_id: str) -> Cost | None:
    """Log onto the parent the sums of the costs (:func:`run_cost`) of the runs that produced its
    stages (its ``stage_run.<stage>`` tags, reused stages included; a run that cannot be read counts
    nothing), and the tag ``cost.energy_source``; returns them, None (nothing logged) when no stage
    run has a cost."""
    costs = []
    parent_tags = client.get_run(parent_id).data.tags
    for _, run_id in sorted((k, v) for k, v in parent_tags.items() if k.startswith(STAGE_RUN_TAG)):
        try:
            found = run_cost(client, run_id)
        except Exception:  # noqa: BLE001 - a deleted run only leaves out its cost
            continue
        if found is not None:
            costs.append(found)
    if not costs:
        return None
    total = sum(costs[1:], costs[0])
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in total.metrics(PIPELINE_COST_PREFIX).items()]
    tags = [RunTag(SOURCE_TAG, total.energy_source or "estimate")]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    return total


def set_table_view(client: MlflowClient, experiment_id: str, wanted: Mapping[str, list[str]]) -> None:
    """Save the runs table's view with a Dataset column, one column per headline metric and the
    pipeline's cost, as an MLflow shared view (an experiment tag the UI reads for
    ``?viewStateShareKey=`` :data:`VIEW_KEY`)."""
    columns = [
        "attributes.`Dataset`",
        *(f"metrics.`{stage}.{key}`" for stage, keys in wanted.items() for key in keys),
        *(f"metrics.`{PIPELINE_COST_PREFIX}{key}`" for key in COST_KEYS),
    ]
    client.set_experiment_tag(
        experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps({"selectedColumns": columns})
    )


def table_url(base: str, experiment_id: str) -> str:
    """The training-runs table with the headline columns (:func:`set_table_view`)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def _paths(entries: Any) -> list[str]:
    return [os.path.normpath(next(iter(e)) if isinstance(e, dict) else str(e)) for e in entries or []]


def stage_graph(dvc_yaml: Mapping[str, Any]) -> tuple[list[str], set[tuple[str, str]]]:
    """(stages in dvc.yaml order, edges (producer, consumer)) as ``dvc dag`` draws them."""
    stages = dict((dvc_yaml or {}).get("stages") or {})
    outs = {
        name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
        for name, s in stages.items()
    }

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    edges = {
        (producer, consumer)
        for consumer, spec in stages.items()
        for dep in _paths(spec.get("deps"))
        for producer, produced in outs.items()
        if producer != consumer and any(overlaps(dep, out) for out in produced)
    }
    return list(stages), edges


def ancestors(stage: str, edges: set[tuple[str, str]]) -> set[str]:
    found, todo = set(), [stage]
    while todo:
        node = todo.pop()
        for producer, consumer in edges:
            if consumer == node and producer not in found:
                found.add(producer)
                todo.append(producer)
    return found


def current_datasets(
    stage: str, dvc_yaml: Mapping[str, Any], lock: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """The :data:`DATASETS` produced by ancestors of ``stage``, with their dvc.lock md5 (the
    ``input`` records StageRun.log_input sends); none before their producer has completed."""
    _, edges = stage_graph(dvc_yaml)
    upstream = ancestors(stage, edges)
    records = []
    for producer, entry in ((lock or {}).get("stages") or {}).items():
        for out in entry.get("outs") or [] if producer in upstream else []:
            path = os.path.normpath(str(out.get("path", "")))
            if path in DATASETS and out.get("md5"):
                name, context = DATASETS[path]
                records.append({"name": name, "source": path, "digest": str(out["md5"]), "context": context})
    return records


def marks(
    stages: list[str], parent_tags: Mapping[str, str], pipeline_id: str, current: tuple[str, str]
) -> dict[str, str]:
    """Each stage's mark: ran / reused from the parent's ``stage_from.<stage>`` tags; the stage
    ending now (``current``: stage, status) failed / killed when it did not finish."""
    result = {}
    for stage in stages:
        source = parent_tags.get(STAGE_FROM_TAG + stage)
        result[stage] = "not run" if source is None else "ran" if source == pipeline_id else "reused"
    stage, status = current
    if stage in result and status in ("FAILED", "KILLED"):
        result[stage] = status.lower()
    return result


def mermaid(stages: list[str], edges: set[tuple[str, str]], stage_marks: Mapping[str, str]) -> str:
    lines = ["flowchart TD"]
    for s in stages:
        mark = stage_marks.get(s, "not run")
        lines.append(f'    {s}["{s} ({mark})"]:::{mark.replace(" ", "_")}')
    lines += [f"    {a} --> {b}" for a, b in sorted(edges)]
    lines += [f"    classDef {mark.replace(' ', '_')} fill:{colour}" for mark, colour in _COLOURS.items()]
    return "\n".join(lines) + "\n"


def render_png(
    stages: list[str], edges: set[tuple[str, str]], stage_marks: Mapping[str, str], path: Path
) -> None:
    """The DAG as a PNG: stages in layers by their longest path from a source, top to bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depth: dict[str, int] = {}

    def layer(stage: str) -> int:
        if stage not in depth:
            depth[stage] = 0  # a cycle (DVC refuses them) cannot recurse forever
            depth[stage] = max((layer(a) + 1 for a, b in edges if b == stage), default=0)
        return depth[stage]

    rows: dict[int, list[str]] = {}
    for stage in stages:
        rows.setdefault(layer(stage), []).append(stage)
    width = max(len(r) for r in rows.values())
    xy = {s: ((i + 1) / (len(r) + 1) * width, -d) for d, r in rows.items() for i, s in enumerate(r)}
    figure = Figure(figsize=(2.2 * width + 3, 1.1 * len(rows) + 0.6))
    axes = figure.add_subplot()
    axes.set_axis_off()
    for index, (a, b) in enumerate(sorted(edges)):
        skip = depth[b] - depth[a] - 1  # an edge past other layers bends, alternately left and right
        bend = 0.0 if skip <= 0 else (0.25 + 0.1 * skip) * (1 if index % 2 else -1)
        arrow = {"arrowstyle": "->", "color": "#555", "shrinkA": 14, "shrinkB": 14}
        axes.annotate("", xy=xy[b], xytext=xy[a], arrowprops={**arrow, "connectionstyle": f"arc3,rad={bend}"})
    for stage, (x, y) in xy.items():
        mark = stage_marks.get(stage, "not run")
        box = {"boxstyle": "round", "facecolor": _COLOURS.get(mark, "#fff"), "edgecolor": "#333"}
        axes.text(x, y, f"{stage}\n({mark})", ha="center", va="center", fontsize=9, bbox=box)
    axes.set_xlim(-0.7, width + 0.7)  # room for the bent edges
    axes.set_ylim(-len(rows) + 0.5, 0.5)
    FigureCanvasAgg(figure).print_png(str(path))


def log_dag(
    transport: Any,
    *,
    parent_id: str,
    dvc_yaml: Mapping[str, Any],
    pipeline_id: str,
    current: tuple[str, str],
) -> None:
    """Write ``pipeline/dag.mmd`` and ``pipeline/dag.png`` onto the parent (``transport``: a LogSender)."""
    stages, edges = stage_graph(dvc_yaml)
    if not stages:
        return
    stage_marks = marks(stages, transport.client.get_run(parent_id).data.tags, pipeline_id, current)
    with tempfile.TemporaryDirectory(prefix="bigmodel_ops-dag-") as tmp:
        (Path(tmp) / "dag.mmd").write_text(mermaid(stages, edges, stage_marks), encoding="utf-8")
        render_png(stages, edges, stage_marks, Path(tmp) / "dag.png")
        for name in ("dag.mmd", "dag.png"):
            transport.log_artifact(parent_id, Path(tmp) / name, DAG_DIR)
