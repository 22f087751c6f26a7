"""Throughput and memory of the tokenize stage's encode-to-shards path.

    python benchmarks/tokenize_throughput.py --csv /path/to/imdb_reviews_2500.csv [--quick]
        [--column review] [--corpus-mb 16] [--generated-mb 200] [--repeats 3]

1. Speed. The CSV's texts are replicated to --corpus-mb MB and written to a Parquet file (column
   `text`); a WordPiece tokenizer (vocab 8000) is trained once on the original texts. Then, in the
   same process and interleaved repeat by repeat, we time:
     ours        bigmodel_ops.tokenizer plan_split + pack_shards: Parquet on disk -> shards on disk
                 (word cache for safe documents, Rust for the rest, on two threads; the stage's
                 defaults)
     ours_one_thread  the same with pipelined=False: everything on the reading thread
     ours_exact  the same without the fast path (fast_path=False): every document through the
                 full tokenizer with encode_batch_fast, as before the fast path existed
     encode_batch       a plain loop of Tokenizer.encode_batch over the texts already in memory,
                        keeping the ids in memory (the usual baseline)
     encode_batch_fast  the same loop with encode_batch_fast (no offsets)
     ours_cold / encode_batch_fast_cold  ours and encode_batch_fast on the original texts once
                 (no replication): every word is new to the word cache, its worst case
   and report medians as MB/s of raw UTF-8 text and as ratios ours / baseline. Replication
   flatters the word cache (after the first copy every word is known); the cold pair shows the
   other end, and a real corpus lies in between (new words get rarer as a corpus grows). Before
   timing, the shards of `ours` are checked to hold exactly the encode_batch ids of every
   document (+ sep), in order, split by the plan: the speed-up must not change a single id.
2. Memory. A subprocess runs plan_split + pack_shards on a generated corpus of --generated-mb MB
   (sentences sampled from the CSV, written to Parquet in row groups) and on one a quarter that
   size, and reports its peak RSS: it should not grow with the corpus.

Without --csv, synthetic word salad is used (for a smoke run; the figures are then not
representative). The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from bigmodel_ops.config import TokenizerParams
from bigmodel_ops.tokenizer import TextPool, pack_shards, plan_split, train_tokenizer

SEED = 1337
ROW_GROUP_DOCS = 5000


def read_texts(csv: Path | None, column: str) -> list[str]:
    if csv is None:
        rng = random.Random(SEED)
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
        return [" ".join(rng.choices(words, k=rng.randint(50, 400))) + "." for _ in range(2500)]
    table = pcsv.read_csv(csv)
    if column not in table.column_names:
        raise SystemExit(f"{csv}: no column {column!r} (columns: {table.column_names})")
    return [t for t in table.column(column).to_pylist() if t]


def nbytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def write_parquet(path: Path, chunks) -> int:
    """Write an iterator of text lists as row groups; returns the raw bytes written."""
    total = 0
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in chunks:
            total += nbytes(chunk)
            writer.write_table(pa.table({"text": chunk}, schema=schema))
    return total


def replicated(texts: list[str], target_bytes: int):
    per_copy = nbytes(texts)
    copies = max(1, round(target_bytes / per_copy))
    for _ in range(copies):
        for i in range(0, len(texts), ROW_GROUP_DOCS):
            yield texts[i : i + ROW_GROUP_DOCS]


def generated(texts: list[str], target_bytes: int, seed: int):
    """Documents of 3-30 sentences sampled from the corpus, until target_bytes are written."""
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if s]
    rng = random.Random(seed)
    written = 0
    while written < target_bytes:
        chunk = [" ".join(rng.choices(sentences, k=rng.randint(3, 30))) for _ in range(1000)]
        written += nbytes(chunk)
        yield chunk


def encode_to_shards(
    tokenizer,
    parquet: Path,
    out_dir: Path,
    *,
    batch_rows: int,
    pipelined: bool = True,
    fast_path: bool = True,
):
    pool = TextPool.open(parquet)
    plan = plan_split(pool, seed=SEED, val_fraction=0.05)
    return pack_shards(
        tokenizer,
        pool=pool,
        out_dir=out_dir,
        plan=plan,
        batch_rows=batch_rows,
        shard_tokens=50_000_000,
        pipelined=pipelined,
        fast_path=fast_path,
    )


def check_identical(tokenizer, parquet: Path, out_dir: Path, texts: list[str], *, batch_rows: int) -> dict:
    """Pack once and compare the shards with plain encode_batch ids; SystemExit on any difference."""
    index, stats = encode_to_shards(tokenizer, parquet, out_dir, batch_rows=batch_rows)
    pool = TextPool.open(parquet)
    plan = plan_split(pool, seed=SEED, val_fraction=0.05)
    is_val = plan.is_val(np.arange(len(texts)))
    sep = index.special_ids["sep"]
    expected = {"train": [], "val": []}
    for i in range(0, len(texts), batch_rows):
        for row, encoding in enumerate(
            tokenizer.encode_batch(texts[i : i + batch_rows], add_special_tokens=False), i
        ):
            expected["val" if is_val[row] else "train"].extend([*encoding.ids, sep])
    for name, want in expected.items():
        got = np.concatenate(index.open_split(name))
        if not np.array_equal(got, np.asarray(want, dtype=got.dtype)):
            raise SystemExit(f"shards of split {name!r} differ from plain encode_batch ids")
    return {"light_documents": stats.light_documents, "full_documents": stats.full_documents}


def child_main(args: argparse.Namespace) -> None:
    """Subprocess body of the memory check: encode one Parquet file, print peak RSS (MB)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(args.child_tokenizer)
    began = time.perf_counter()
    _, stats = encode_to_shards(
        tokenizer, Path(args.child_parquet), Path(args.child_out), batch_rows=args.batch_rows
    )
    seconds = time.perf_counter() - began
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "mb": stats.raw_bytes / 1e6, "seconds": seconds}))


def shard_tokens(directory: Path) -> int:
    index = json.loads((directory / "index.json").read_text())
    return sum(index["total_tokens"].values())


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", type=Path, default=None, help="input CSV (e.g. imdb_reviews_2500.csv)")
    parser.add_argument("--column", default="review", help="text column of the CSV (default: review)")
    parser.add_argument("--quick", action="store_true", help="smaller corpora, fewer repeats")
    parser.add_argument(
        "--corpus-mb", type=float, default=None, help="speed corpus size (default 16, quick 6)"
    )
    parser.add_argument(
        "--generated-mb", type=float, default=None, help="memory corpus size (default 200, quick 20)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    parser.add_argument("--batch-rows", type=int, default=1000, help="documents per encode batch")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--child-parquet", help=argparse.SUPPRESS)
    parser.add_argument("--child-tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_parquet:
        child_main(args)
        return
    corpus_mb = args.corpus_mb or (6 if args.quick else 16)
    generated_mb = args.generated_mb or (20 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)

    texts = read_texts(args.csv, args.column)
    with tempfile.TemporaryDirectory(prefix="tokbench-") as tmp_name:
        tmp = Path(tmp_name)
        # Train once, on the original texts (through the stage's own training path).
        source = tmp / "source.parquet"
        write_parquet(source, [texts])
        pool = TextPool.open(source)
        params = TokenizerParams(kind="wordpiece", vocab_size=args.vocab_size)
        plan = plan_split(pool, seed=SEED, val_fraction=params.val_fraction)
        began = time.perf_counter()
        tokenizer = train_tokenizer(params, pool=pool, plan=plan, batch_rows=args.batch_rows, quiet=True)
        train_s = time.perf_counter() - began
        tokenizer_file = tmp / "tokenizer.json"
        tokenizer.save(str(tokenizer_file))

        corpus = tmp / "corpus.parquet"
        corpus_bytes = write_parquet(corpus, replicated(texts, int(corpus_mb * 1e6)))
        in_memory = pq.read_table(corpus).column("text").to_pylist()  # for the baselines only
        assert nbytes(in_memory) == corpus_bytes
        batches = [in_memory[i : i + args.batch_rows] for i in range(0, len(in_memory), args.batch_rows)]

        def plain() -> None:
            kept = [[e.ids for e in tokenizer.encode_batch(b, add_special_tokens=False)] for b in batches]
            assert kept

        def fast() -> None:
            kept = [
                [e.ids for e in tokenizer.encode_batch_fast(b, add_special_tokens=False)] for b in batches
            ]
            assert kept

        # The speed-up must not change a single id (checked on the whole speed corpus, untimed).
        identical = check_identical(
            tokenizer, corpus, tmp / "shards-check", in_memory, batch_rows=args.batch_rows
        )
        for shard in (tmp / "shards-check").glob("*"):
            shard.unlink()
        print(f"identical ids: yes {identical}", file=sys.stderr)

        # Cold: the original texts once (no replication), so every word is new to the word cache.
        source_bytes = nbytes(texts)
        source_batches = [texts[i : i + args.batch_rows] for i in range(0, len(texts), args.batch_rows)]

        def fast_cold() -> None:
            kept = [
                [e.ids for e in tokenizer.encode_batch_fast(b, add_special_tokens=False)]
                for b in source_batches
            ]
            assert kept

        names = [
            "ours",
            "encode_batch",
            "ours_exact",
            "encode_batch_fast",
            "ours_one_thread",
            "ours_cold",
            "encode_batch_fast_cold",
        ]
        sizes = {name: source_bytes if name.endswith("_cold") else corpus_bytes for name in names}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        tokens = 0
        for r in range(repeats):
            order = list(names)
            if r % 2:
                order.reverse()  # no variant always runs right after another one
            for name in order:
                out = tmp / f"shards-{name}-{r}"
                if name == "ours":
                    runs[name].append(
                        timed(
                            lambda out=out: encode_to_shards(
                                tokenizer, corpus, out, batch_rows=args.batch_rows
                            )
                        )
                    )
                    tokens = shard_tokens(out)
                elif name == "ours_exact":
                    runs[name].append(
                        timed(
                            lambda out=out: encode_to_shards(
                                tokenizer, corpus, out, batch_rows=args.batch_rows, fast_path=False
                            )
                        )
                    )
                elif name == "ours_one_thread":
                    runs[name].append(
                        timed(
                            lambda out=out: encode_to_shards(
                                tokenizer, corpus, out, batch_rows=args.batch_rows, pipelined=False
                            )
                        )
                    )
                elif name == "ours_cold":
                    runs[name].append(
                        timed(
                            lambda out=out: encode_to_shards(
                                tokenizer, source, out, batch_rows=args.batch_rows
                            )
                        )
                    )
                elif name == "encode_batch":
                    runs[name].append(timed(plain))
                elif name == "encode_batch_fast_cold":
                    runs[name].append(timed(fast_cold))
                else:
                    runs[name].append(timed(fast))
                for shard in out.glob("*") if out.exists() else []:
                    shard.unlink()
                if out.exists():
                    out.rmdir()
                wall, cpu = runs[name][-1]
                print(
                    f"repeat {r} {name:22s} {sizes[name] / 1e6 / wall:7.2f} MB/s wall"
                    f" {sizes[name] / 1e6 / cpu:7.2f} MB/cpu-s",
                    file=sys.stderr,
                )
        median = {name: statistics.median(w for w, _ in values) for name, values in runs.items()}
        mbps = {name: sizes[name] / 1e6 / seconds for name, seconds in median.items()}
        # MB per CPU-second: less sensitive than wall time to other processes sharing the cores.
        cpu_median = {name: statistics.median(c for _, c in values) for name, values in runs.items()}
        mb_cpu = {name: sizes[name] / 1e6 / seconds for name, seconds in cpu_median.items()}

        # Memory: peak RSS of a fresh process encoding a small and a 4x larger generated corpus.
        rss = {}
        for label, size_mb in (("small", generated_mb / 4), ("large", generated_mb)):
            parquet = tmp / f"generated-{label}.parquet"
            write_parquet(parquet, generated(texts, int(size_mb * 1e6), seed=SEED))
            out = tmp / f"gen-shards-{label}"
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-parquet",
                    str(parquet),
                    "--child-tokenizer",
                    str(tokenizer_file),
                    "--child-out",
                    str(out),
                    "--batch-rows",
                    str(args.batch_rows),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            rss[label] = json.loads(result.stdout.strip().splitlines()[-1])
            parquet.unlink()
            for shard in out.glob("*"):
                shard.unlink()
            print(f"memory {label}: {rss[label]}", file=sys.stderr)

    figures = {
        "benchmark": "tokenize_throughput",
        "quick": args.quick,
        "input": str(args.csv) if args.csv else "synthetic",
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "vocab_size": tokenizer.get_vocab_size(),
        "train_seconds": round(train_s, 2),
        "corpus_mb": round(corpus_bytes / 1e6, 2),
        "corpus_tokens": tokens,
        "repeats": repeats,
        "batch_rows": args.batch_rows,
        "mb_per_s": round(mbps["ours"], 3),
        "mb_per_s_exact_normalizer": round(mbps["ours_exact"], 3),
        "mb_per_s_one_thread": round(mbps["ours_one_thread"], 3),
        "mb_per_s_encode_batch": round(mbps["encode_batch"], 3),
        "mb_per_s_encode_batch_fast": round(mbps["encode_batch_fast"], 3),
        "ratio_vs_encode_batch": round(mbps["ours"] / mbps["encode_batch"], 3),
        "ratio_vs_encode_batch_fast": round(mbps["ours"] / mbps["encode_batch_fast"], 3),
        "ratio_default_vs_one_thread": round(mbps["ours"] / mbps["ours_one_thread"], 3),
        "ratio_fast_path_vs_exact_normalizer": round(mbps["ours"] / mbps["ours_exact"], 3),
        "ratio_exact_normalizer_vs_encode_batch_fast": round(
            mbps["ours_exact"] / mbps["encode_batch_fast"], 3
        ),
        "cold_mb": round(source_bytes / 1e6, 2),
        "mb_per_s_cold": round(mbps["ours_cold"], 3),
        "mb_per_s_encode_batch_fast_cold": round(mbps["encode_batch_fast_cold"], 3),
        "ratio_cold_vs_encode_batch_fast": round(mbps["ours_cold"] / mbps["encode_batch_fast_cold"], 3),
        "identical_ids": True,
        "light_documents": identical["light_documents"],
        "full_documents": identical["full_documents"],
        "mb_per_cpu_s": round(mb_cpu["ours"], 3),
        "mb_per_cpu_s_exact_normalizer": round(mb_cpu["ours_exact"], 3),
        "mb_per_cpu_s_encode_batch": round(mb_cpu["encode_batch"], 3),
        "mb_per_cpu_s_encode_batch_fast": round(mb_cpu["encode_batch_fast"], 3),
        "cpu_ratio_vs_encode_batch_fast": round(mb_cpu["ours"] / mb_cpu["encode_batch_fast"], 3),
        "mb_per_cpu_s_one_thread": round(mb_cpu["ours_one_thread"], 3),
        "budget_mb_per_s": 8.0,
        "meets_budget": mbps["ours"] >= 8.0,
        "generated_mb_small": round(rss["small"]["mb"], 1),
        "generated_mb_large": round(rss["large"]["mb"], 1),
        "peak_rss_mb_small": round(rss["small"]["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(rss["large"]["peak_rss_mb"], 1),
        "rss_growth_large_vs_small": round(rss["large"]["peak_rss_mb"] / rss["small"]["peak_rss_mb"], 3),
        "mb_per_s_generated_large": round(rss["large"]["mb"] / rss["large"]["seconds"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
