"""Train a WordPiece or byte-level BPE tokenizer on the pretraining pool and pack the pool into memory-mapped token shards.

Outputs, published together after MLflow logging succeeded: ``outputs/tokenizer/tokenizer.json``,
``outputs/shards/`` (shards + index.json) and the report ``outputs/metrics/tokenize.json``.
The algorithms are in :mod:`bigmodel_ops.tokenizer`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bigmodel_ops.config import Params, TokenizerParams
from bigmodel_ops.fsutil import publish
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run
from bigmodel_ops.shards import ShardIndex
from bigmodel_ops.tokenizer.pack import PackStats, pack_shards
from bigmodel_ops.tokenizer.pool import POOL_FILE, TextPool
from bigmodel_ops.tokenizer.split import SplitPlan, plan_split
from bigmodel_ops.tokenizer.train import check_vocab_size, tokenizer_sha256, train_tokenizer


def _report(
    params: TokenizerParams,
    *,
    vocab_size: int,
    plan: SplitPlan,
    stats: PackStats,
    train_seconds: float,
    sha: str,
    skipped: int,
) -> dict[str, Any]:
    splits = stats.splits
    documents = sum(s.documents for s in splits.values())
    tokens = sum(s.tokens for s in splits.values())
    content_tokens = tokens - documents  # without the sep after each document
    unk = sum(s.unk_tokens for s in splits.values())
    return {
        "kind": params.kind,
        "vocab_size": vocab_size,
        "vocab_size_requested": params.vocab_size,
        "dtype": stats.dtype,
        "tokenizer_sha256": sha,
        "documents": {name: s.documents for name, s in splits.items()},
        "tokens": {name: s.tokens for name, s in splits.items()},
        "raw_bytes": {name: s.raw_bytes for name, s in splits.items()},
        "shards": {name: s.shards for name, s in splits.items()},
        "skipped_blank_rows": skipped,
        "total_documents": documents,
        "total_tokens": tokens,
        "total_raw_bytes": stats.raw_bytes,
        # Share of [UNK] among content tokens (the sep after each document not counted).
        "unk_rate": unk / content_tokens if content_tokens else 0.0,
        "mean_tokens_per_doc": content_tokens / documents if documents else 0.0,
        "bytes_per_token": stats.raw_bytes / content_tokens if content_tokens else 0.0,
        "train_seconds": train_seconds,
        "encode_seconds": stats.seconds,
        "encode_mb_per_s": stats.mb_per_s,
        # Documents encoded with the cheaper equivalent normalizer (tokenizer.encode) vs the full one.
        "encode_light_documents": stats.light_documents,
        "encode_full_documents": stats.full_documents,
    }


def _numeric(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numeric(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def run(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Train a WordPiece or byte-level BPE tokenizer on the pretraining pool and pack the pool into memory-mapped token shards.

    Returns the report. Bad input raises DataError before any output exists: a missing pool ("run the prepare stage
    first"), no `text` column, no documents (or only one), a vocab too small for the alphabet.
    """
    tp = params.tokenizer
    check_vocab_size(tp)
    pool = TextPool.open(paths.prepared / POOL_FILE)
    plan = plan_split(pool, seed=params.project.seed, val_fraction=tp.val_fraction)

    outputs = (paths.tokenizer_dir, paths.shards, paths.tokenize_report)
    with stage_run(params, "tokenize") as run, publish(*outputs) as pub:
        began = time.perf_counter()
        tokenizer = train_tokenizer(tp, pool=pool, plan=plan, batch_rows=tp.encode_batch_size, quiet=quiet)
        train_seconds = time.perf_counter() - began
        tokenizer_dir = pub.staged(paths.tokenizer_dir)
        tokenizer_dir.mkdir()
        tokenizer_file = tokenizer_dir / paths.tokenizer_file.name
        tokenizer.save(str(tokenizer_file))
        sha = tokenizer_sha256(tokenizer_file)

        shards_dir = pub.staged(paths.shards)
        index, stats = pack_shards(
            tokenizer,
            pool=pool,
            out_dir=shards_dir,
            plan=plan,
            batch_rows=tp.encode_batch_size,
            shard_tokens=tp.shard_tokens,
            tokenizer_sha=sha,
            quiet=quiet,
        )
        ShardIndex.load(shards_dir)  # the consumer's own checks, before anything is published
        report = _report(
            tp,
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            plan=plan,
            stats=stats,
            train_seconds=train_seconds,
            sha=sha,
            skipped=plan.rows - plan.documents,
        )
        report_file = pub.staged(paths.tokenize_report)
        report_file.write_text(json.dumps(report, indent=2) + "\n")

        run.log_params({"tokenizer": tp.model_dump(mode="json")})
        run.log_params({"tokenize.vocab_size_actual": report["vocab_size"], "tokenize.dtype": stats.dtype})
        run.set_tags({"bigmodel_ops.tokenizer_sha256": sha})
        run.log_metrics(_numeric({k: v for k, v in report.items() if k != "vocab_size_requested"}), step=0)
        run.log_artifact(tokenizer_file, "tokenizer")
        run.log_artifact(index.directory / "index.json", "shards")
        run.log_dict(report, f"metrics/{paths.tokenize_report.name}")
        run.flush()
    return report
