"""The `prepare` stage: raw source -> normalised, deduplicated, split Parquet files.

Outputs (under `paths.prepared`):

* ``train.parquet``, ``val.parquet``, ``test.parquet``: columns ``text`` (string),
  ``label`` (string) and ``label_id`` (int32, the index in ``prepare.labels``);
* ``pretrain.parquet``: column ``text``, the pretraining pool. With
  ``pretrain_pool: all`` it holds the train and val labeled texts plus every
  unlabeled text; test texts are never in it, so pretraining cannot see the
  texts the classifier is evaluated on. With ``pretrain_pool: unlabeled`` it
  holds only the unlabeled texts;

and the data report `paths.prepare_report` (a DVC metrics file).

The whole stage streams: sources are read in chunks of ``chunk_rows`` and rows
are written as they come, so memory does not depend on the corpus size, except
for the dedup index (about 100 bytes per unique text).

Failure leaves nothing behind: everything is written into a temporary folder
beside ``paths.prepared`` and moved into place only after the last check passed;
a previous good output stays until then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bigmodel_ops.config import Params, PrepareParams, flatten
from bigmodel_ops.data.labels import UNLABELED, LabelError, LabelMapper
from bigmodel_ops.data.normalize import normalize_text
from bigmodel_ops.data.sources import RawBatch, SourcePlan, iter_source, plan_sources
from bigmodel_ops.data.splitting import SPLITS, Deduper, SplitAssigner, TextHasher
from bigmodel_ops.data.stats import LengthStats
from bigmodel_ops.data.writer import SplitWriter
from bigmodel_ops.errors import DataError
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.progress import progress_bar

log = logging.getLogger(__name__)

OUTPUTS = (*SPLITS, "pretrain")
_CONTEXTS = {"train": "training", "val": "validation", "test": "testing", "pretrain": "pretraining"}


def run_prepare(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Run the stage and return the data report (also written to `paths.prepare_report`).

    Raises DataError (nothing written) for a missing file or glob without
    matches, undecodable bytes, a missing column, an undeclared label value, and
    a split or pretraining pool that ends up empty.
    """
    from bigmodel_ops.tracking.runs import stage_run

    prepare = params.prepare
    # Missing files fail here, before an MLflow run is opened for nothing.
    plan = plan_sources(prepare)
    with stage_run(params, stage="prepare") as run:
        run.log_params({f"prepare.{key}": value for key, value in flatten(prepare).items()})
        with _Staging(paths.prepared, paths.prepare_report) as staging:
            report = build_prepared(plan, prepare, seed=params.project.seed, out_dir=staging.dir, quiet=quiet)
            staging.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            run.log_metrics(report_metrics(report), step=0)
            run.log_dict(report, "data/prepare.json")
            _log_datasets(run, report, paths=paths, project=params.project.name)
            run.set_tags({"bigmodel_ops.data_digest": report["digest"]})
            staging.commit()
    log.info(
        "prepare: %s train / %s val / %s test / %s pretrain rows, %s duplicates removed -> %s",
        *(report["rows"][name] for name in OUTPUTS),
        report["dropped"]["duplicates"],
        paths.prepared,
    )
    return report


def build_prepared(
    plan: SourcePlan, prepare: PrepareParams, *, seed: int, out_dir: Path, quiet: bool = True
) -> dict[str, Any]:
    """Stream the source into the four Parquet files in `out_dir`; return the report.

    Raises DataError as soon as a bad row is met; the caller removes `out_dir`.
    """
    state = _PreparePass(prepare, seed=seed, out_dir=out_dir)
    try:
        with progress_bar(desc="prepare", unit="rows", quiet=quiet) as bar:
            for batch in iter_source(plan, prepare):
                state.add_batch(batch)
                bar.update(len(batch))
        digests = state.close()
    except BaseException:
        state.abort()
        raise
    _check_not_empty(state.label_counts, state.labels, pool_rows=state.pool.rows, prepare=prepare)
    return state.report(plan, digests)


class _PreparePass:
    """One streaming pass: normalise, filter, dedup, assign a split, write, count."""

    def __init__(self, prepare: PrepareParams, *, seed: int, out_dir: Path) -> None:
        self.prepare = prepare
        self.labels = list(prepare.labels)
        self.mapper = LabelMapper(self.labels)
        self.hasher = TextHasher(seed)
        self.assigner = SplitAssigner(prepare.split)
        self.dedup = Deduper()
        self.writers = {
            name: SplitWriter(out_dir / f"{name}.parquet", labels=self.labels, chunk_rows=prepare.chunk_rows)
            for name in SPLITS
        }
        self.pool = SplitWriter(out_dir / "pretrain.parquet", labels=None, chunk_rows=prepare.chunk_rows)
        self.lengths = {name: LengthStats() for name in OUTPUTS}
        self.label_counts = {name: [0] * len(self.labels) for name in SPLITS}
        self.input = {"rows": 0, "labeled_rows": 0, "unlabeled_rows": 0}
        self.dropped = {"empty": 0, "short": 0}
        self.pool_takes_labeled = prepare.pretrain_pool == "all"

    def _label_id(self, batch: RawBatch, index: int) -> int:
        if batch.label_ids is not None:
            return batch.label_ids[index]
        if batch.labels is None:
            return UNLABELED
        try:
            return self.mapper.resolve(batch.labels[index])
        except LabelError as error:
            raise DataError(f"{batch.where(index)}: {error}") from None

    def add_batch(self, batch: RawBatch) -> None:
        prepare = self.prepare
        for index, raw in enumerate(batch.texts):
            label_id = self._label_id(batch, index)
            self.input["labeled_rows" if label_id != UNLABELED else "unlabeled_rows"] += 1
            if raw is None:
                self.dropped["empty"] += 1
                continue
            if not isinstance(raw, str):
                raise DataError(
                    f"{batch.where(index)}: text value {raw!r} is a {type(raw).__name__}, expected a string"
                )
            text = normalize_text(raw, strip_markup=prepare.strip_markup, lowercase=prepare.lowercase)
            if not text:
                self.dropped["empty"] += 1
                continue
            if len(text) < prepare.min_chars:
                self.dropped["short"] += 1
                continue
            digest = self.hasher.digest(text)
            if not self.dedup.add(digest, label_id):
                continue
            if label_id == UNLABELED:
                self._to_pool(text)
                continue
            split = self.assigner.assign(digest)
            self.writers[split].add(text, label_id)
            self.lengths[split].add(len(text))
            self.label_counts[split][label_id] += 1
            # Test texts stay out of pretraining, so the LM never sees what the classifier is scored on.
            if self.pool_takes_labeled and split != "test":
                self._to_pool(text)
        self.input["rows"] += len(batch)

    def _to_pool(self, text: str) -> None:
        self.pool.add(text)
        self.lengths["pretrain"].add(len(text))

    def close(self) -> dict[str, str]:
        digests = {name: writer.close() for name, writer in self.writers.items()}
        digests["pretrain"] = self.pool.close()
        return digests

    def abort(self) -> None:
        for writer in (*self.writers.values(), self.pool):
            writer.abort()

    def report(self, plan: SourcePlan, digests: dict[str, str]) -> dict[str, Any]:
        rows = {name: self.writers[name].rows for name in SPLITS}
        rows["pretrain"] = self.pool.rows
        return {
            "rows": rows,
            "labels": {name: dict(zip(self.labels, self.label_counts[name], strict=True)) for name in SPLITS},
            "length_chars": {name: self.lengths[name].as_dict() for name in OUTPUTS},
            "input": dict(self.input),
            "dropped": {
                **self.dropped,
                "duplicates": self.dedup.duplicates,
                "conflicting_label_duplicates": self.dedup.conflicting,
            },
            "source": plan.describe(),
            "pretrain_pool": self.prepare.pretrain_pool,
            "digests": digests,
            "digest": _combined_digest(digests),
        }


def _check_not_empty(
    label_counts: dict[str, list[int]], labels: list[str], *, pool_rows: int, prepare: PrepareParams
) -> None:
    totals = [sum(label_counts[name][i] for name in SPLITS) for i in range(len(labels))]
    if not any(totals) and not is_labeled_source(prepare):
        # A declared-unlabeled source (kind text, label_column null) only feeds pretraining.
        log.warning("prepare: the source is unlabeled: train/val/test are empty, only pretrain has rows")
    elif not any(totals):
        raise DataError(
            f"prepare: no labeled rows left after filtering (source {prepare.source.path!r}, "
            f"label_column {prepare.source.label_column!r}, min_chars {prepare.min_chars}); "
            "the classifier splits would be empty"
        )
    else:
        for name in SPLITS:
            for label_id, label in enumerate(labels):
                if label_counts[name][label_id] == 0:
                    raise DataError(
                        f"prepare: split {name!r} has no rows with label {label!r} after filtering "
                        f"({totals[label_id]} rows carry that label in all, split fractions "
                        f"{prepare.split.model_dump()}); add data or change prepare.split"
                    )
    if pool_rows == 0:
        raise DataError(
            f"prepare: the pretraining pool is empty (pretrain_pool: {prepare.pretrain_pool!r}, "
            f"unlabeled_path: {prepare.source.unlabeled_path!r}); add unlabeled text or use "
            "pretrain_pool: all"
        )


def is_labeled_source(prepare: PrepareParams) -> bool:
    """Whether the source declares labels (aclImdb folders always do)."""
    return prepare.source.kind == "aclimdb" or prepare.source.label_column is not None


def _combined_digest(digests: dict[str, str]) -> str:
    blob = json.dumps(digests, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of the report as `data.<dotted.key>` metrics."""
    picked = {key: report[key] for key in ("rows", "labels", "length_chars", "input", "dropped")}
    return {
        f"data.{key}": float(value)
        for key, value in flatten(picked).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _log_datasets(run: Any, report: dict[str, Any], *, paths: ProjectPaths, project: str) -> None:
    """Log each output file as an MLflow dataset input: metadata only, nothing is loaded.

    Uses `StageRun.log_input` (queued, spooled while the server is down) where the
    tracking layer offers it, else the client's `log_inputs` directly.
    """
    from bigmodel_ops.data import mlflow_dataset

    for name in OUTPUTS:
        profile: dict[str, Any] = {"num_rows": report["rows"][name]}
        if name in report["labels"]:
            profile["label_counts"] = report["labels"][name]
        entry = {
            "name": f"{project}-{name}",
            "source": str(paths.prepared / f"{name}.parquet"),
            "digest": report["digests"][name],
            "context": _CONTEXTS[name],
            "profile": profile,
            "schema": mlflow_dataset.schema_dict(labeled=name in SPLITS),
        }
        if hasattr(run, "log_input"):
            run.log_input(**entry)
        else:
            run.client.log_inputs(run.run_id, datasets=[mlflow_dataset.dataset_input(**entry)])


class _Staging:
    """A temp folder and report file beside the targets, moved into place by `commit`.

    On an exception the temp files are removed, and so are the parent folders
    this object created, so a failed run leaves the tree as it found it.
    """

    def __init__(self, target_dir: Path, report: Path) -> None:
        self.target_dir = target_dir
        self.target_report = report
        self._created: list[Path] = []
        self._committed = False

    def __enter__(self) -> _Staging:
        for folder in (self.target_dir.parent, self.target_report.parent):
            self._make_dirs(folder)
        # mkdir, not mkdtemp: the output folder should get the usual (umask) permissions, not 0700.
        suffix = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir = self.target_dir.parent / f".{self.target_dir.name}.{suffix}"
        self.dir.mkdir()
        self.report = self.target_report.parent / f".{self.target_report.name}.{suffix}"
        return self

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def commit(self) -> None:
        """Swap the new output in; the previous one is deleted only once the swap succeeded."""
        old = None
        if self.target_dir.exists() or self.target_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target_dir.name}.old-", dir=self.target_dir.parent))
            os.replace(self.target_dir, old / "previous")
        try:
            os.replace(self.dir, self.target_dir)
        except OSError:
            if old is not None:  # put the previous output back
                os.replace(old / "previous", self.target_dir)
                old.rmdir()
            raise
        os.replace(self.report, self.target_report)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._committed:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        self.report.unlink(missing_ok=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else lives there now
