"""Peak memory of the prepare data path for a small and a 10x larger CSV.

    python benchmarks/prepare_memory.py [--quick] [--keep]

Generates a CSV of unique synthetic reviews (200 MB; --quick: 20 MB) plus one
tenth of it in a temp dir, then runs `build_prepared` (read, normalise, dedup,
split, write Parquet: everything `prepare` does except MLflow logging) on each
in its own subprocess and reports each child's peak RSS (ru_maxrss).

If memory is flat in the corpus size, the large/small ratio of peak RSS stays
near 1. What may grow is the dedup index (16-byte digests of every unique text,
about 100 bytes per row in a Python dict), so the figures include the growth
per 1,000 extra rows for comparison with that estimate. The small run is the
baseline, run side by side with the large one on the same machine.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigmodel_ops.data.sample import ReviewWriter

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from bigmodel_ops.config import parse_params
from bigmodel_ops.data.prepare import build_prepared
from bigmodel_ops.data.sources import plan_sources

raw = json.loads(sys.argv[1])
params = parse_params(raw)
out = Path(sys.argv[2])
out.mkdir()
start = time.perf_counter()
report = build_prepared(plan_sources(params.prepare), params.prepare, seed=params.project.seed, out_dir=out)
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "rows": report["input"]["rows"],
    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""


def write_csv(path: Path, *, target_bytes: int, seed: int) -> int:
    """Unique labeled reviews until the file reaches target_bytes; return the row count."""
    rng = random.Random(seed)
    writer = ReviewWriter(rng)
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(["text", "label"])
        while handle.tell() < target_bytes:
            positive = rng.random() < 0.5
            # The row number makes every text unique, so the dedup index grows with the file.
            out.writerow([f"{writer.review(positive)} (#{rows})", "positive" if positive else "negative"])
            rows += 1
    return rows


def run_child(csv_path: Path, out: Path, *, chunk_rows: int) -> dict[str, float]:
    raw = {
        "project": {"name": "bench", "seed": 1337},
        "prepare": {
            "source": {"kind": "csv", "path": str(csv_path)},
            "labels": ["negative", "positive"],
            "min_chars": 10,
            "chunk_rows": chunk_rows,
        },
        "profiles": {"cpu": {"model_preset": "tiny"}},
    }
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(raw), str(out)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MB instead of 200 MB")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--chunk-rows", type=int, default=5000)
    args = parser.parse_args(argv)
    large_bytes = (20 if args.quick else 200) * 1024 * 1024
    small_bytes = large_bytes // 10

    work = Path(tempfile.mkdtemp(prefix="prepare-memory-"))
    try:
        t0 = time.perf_counter()
        small_rows = write_csv(work / "small.csv", target_bytes=small_bytes, seed=1)
        large_rows = write_csv(work / "large.csv", target_bytes=large_bytes, seed=2)
        print(
            f"generated {small_rows} + {large_rows} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr
        )
        small = run_child(work / "small.csv", work / "out-small", chunk_rows=args.chunk_rows)
        large = run_child(work / "large.csv", work / "out-large", chunk_rows=args.chunk_rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    growth_kb = large["peak_rss_kb"] - small["peak_rss_kb"]
    figures = {
        "benchmark": "prepare_memory",
        "quick": args.quick,
        "chunk_rows": args.chunk_rows,
        "small_mb": round(small_bytes / 2**20, 1),
        "large_mb": round(large_bytes / 2**20, 1),
        "small_rows": small["rows"],
        "large_rows": large["rows"],
        "small_peak_rss_mb": round(small["peak_rss_kb"] / 1024, 1),
        "large_peak_rss_mb": round(large["peak_rss_kb"] / 1024, 1),
        "peak_rss_ratio_large_over_small": round(large["peak_rss_kb"] / small["peak_rss_kb"], 3),
        "input_size_ratio": round(large_bytes / small_bytes, 1),
        "rss_growth_bytes_per_extra_row": round(growth_kb * 1024 / max(1, large["rows"] - small["rows"]), 1),
        "small_rows_per_s": round(small["rows"] / small["seconds"]),
        "large_rows_per_s": round(large["rows"] / large["seconds"]),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
