"""The prepare library: raw source -> normalised, deduplicated, split Parquet files.

:func:`build_prepared` streams the source into the output folder it is given; the stage glue
(:mod:`bigmodel_ops.pipeline.prepare`) publishes that folder and logs it. Outputs:

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

DataError is raised as soon as a bad row is met; the caller discards the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bigmodel_ops.config import PrepareParams, flatten, metric_key
from bigmodel_ops.data.labels import UNLABELED, LabelError, LabelMapper
from bigmodel_ops.data.normalize import normalize_text
from bigmodel_ops.data.readers import RawBatch
from bigmodel_ops.data.sources import SourcePlan, iter_source
from bigmodel_ops.data.splitting import SPLITS, Deduper, SplitAssigner, TextHasher
from bigmodel_ops.data.stats import LengthStats
from bigmodel_ops.data.writer import SplitWriter
from bigmodel_ops.errors import DataError
from bigmodel_ops.fsutil import short_hash
from bigmodel_ops.progress import progress_bar

log = logging.getLogger(__name__)

OUTPUTS = (*SPLITS, "pretrain")


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
            if len(text) > prepare.max_chars:
                raise DataError(
                    f"{batch.where(index)}: text of {len(text):,} characters is longer than "
                    f"prepare.max_chars ({prepare.max_chars:,}); a single text this long is almost always a "
                    "broken file (a lost newline or quote): fix the file, or raise prepare.max_chars"
                )
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
    return short_hash(digests, length=16)


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of the report as `data.<dotted.key>` metrics."""
    picked = {key: report[key] for key in ("rows", "length_chars", "input", "dropped")}
    metrics = {
        f"data.{key}": float(value)
        for key, value in flatten(picked).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    # Labels come from the data: in a metric name each is neutralised (metric_key: no '/', so no
    # '../' or absolute path can reach MLflow's path-like names).
    for split, counts in report["labels"].items():
        for label, count in counts.items():
            metrics[f"data.labels.{split}.{metric_key(str(label))}"] = float(count)
    return metrics
