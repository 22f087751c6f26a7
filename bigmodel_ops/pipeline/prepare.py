"""Read the raw source, normalise, deduplicate, split (seeded, stratified) and write Parquet splits plus the unlabeled pretraining pool and a data report.

Outputs: ``outputs/prepared/{train,val,test,pretrain}.parquet`` (:mod:`bigmodel_ops.data.prepare`
says what each holds) and the data report ``outputs/metrics/prepare.json``, published together
only after the last check passed. MLflow run ``prepare``: the prepare params, the report as
metrics and artifact, and each output file as a dataset input (metadata only).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bigmodel_ops.config import Params, flatten
from bigmodel_ops.data.prepare import OUTPUTS, build_prepared, report_metrics
from bigmodel_ops.data.sources import plan_sources
from bigmodel_ops.data.splitting import SPLITS
from bigmodel_ops.fsutil import publish
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run

log = logging.getLogger(__name__)

_CONTEXTS = {"train": "training", "val": "validation", "test": "testing", "pretrain": "pretraining"}
_TEXT = {"type": "string", "name": "text", "required": True}
_LABELS = [
    {"type": "string", "name": "label", "required": True},
    {"type": "integer", "name": "label_id", "required": True},
]


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Read the raw source, normalise, deduplicate, split (seeded, stratified) and write Parquet splits plus the unlabeled pretraining pool and a data report.

    Returns the data report. Raises DataError (nothing written) for a missing file or glob
    without matches, undecodable bytes, a missing column, an undeclared label value, and a split
    or pretraining pool that ends up empty.
    """
    prepare = params.prepare
    # Missing files fail here, before an MLflow run is opened for nothing.
    plan = plan_sources(prepare)
    with stage_run(params, "prepare") as run, publish(paths.prepared, paths.prepare_report) as pub:
        run.log_params({f"prepare.{key}": value for key, value in flatten(prepare).items()})
        out_dir = pub.staged(paths.prepared)
        out_dir.mkdir()
        report = build_prepared(plan, prepare, seed=params.project.seed, out_dir=out_dir, quiet=quiet)
        pub.staged(paths.prepare_report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        run.log_metrics(report_metrics(report), step=0)
        run.log_dict(report, "data/prepare.json")
        _log_datasets(run, report, paths=paths, project=params.project.name)
        run.set_tags({"bigmodel_ops.data_digest": report["digest"]})
    log.info(
        "prepare: %s train / %s val / %s test / %s pretrain rows, %s duplicates removed -> %s",
        *(report["rows"][name] for name in OUTPUTS),
        report["dropped"]["duplicates"],
        paths.prepared,
    )
    return report


def _log_datasets(run: Any, report: dict[str, Any], *, paths: ProjectPaths, project: str) -> None:
    """Log each output file as an MLflow dataset input: path, digest, schema and row/label counts."""
    for name in OUTPUTS:
        profile: dict[str, Any] = {"num_rows": report["rows"][name]}
        if name in report["labels"]:
            profile["label_counts"] = report["labels"][name]
        run.log_input(
            name=f"{project}-{name}",
            source=str(paths.prepared / f"{name}.parquet"),
            digest=report["digests"][name],
            context=_CONTEXTS[name],
            profile=profile,
            schema={"mlflow_colspec": [_TEXT, *(_LABELS if name in SPLITS else [])]},
        )
