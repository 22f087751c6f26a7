"""Round-trip latency of the served classifier: ``mlflow models serve`` on 127.0.0.1, timed over HTTP.

Starts ``mlflow models serve -m URI --env-manager local`` (one worker) on a free port, sends
``/invocations`` requests of 1 and of 32 texts (JSON ``dataframe_split``), and prints one JSON line:
``serve_b1_median_ms``, ``serve_b1_p95_ms``, ``serve_b32_median_ms``, ``serve_b32_p95_ms``, with
the model URI, the repeats and the startup time. Round trip = client encode + HTTP + schema
enforcement + tokenisation + forward + JSON answer, on the same machine.

    python benchmarks/serve_latency.py [--model URI] [--params params.yaml] [--repeats 50]

The model defaults to ``models:/<evaluate.registered_model>@<evaluate.promote_alias>`` in the
project's tracking store (what ``bigmodel-ops predict`` uses); texts are the test split's when
``outputs/prepared/test.parquet`` exists, else a few fixed reviews.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bigmodel_ops.config import load_params
from bigmodel_ops.predict import default_model_uri
from bigmodel_ops.serve_client import round_trip_latency, scoring_server
from bigmodel_ops.tracking.runs import tracking_uri

FALLBACK_TEXTS = [
    "A wonderful film: moving, funny and beautifully acted.",
    "Two hours I will never get back. The plot makes no sense and the acting is wooden.",
    "Not bad, not great; the second half drags but the ending works.",
]


def _texts(path: Path, limit: int = 256) -> list[str]:
    if not path.is_file():
        return FALLBACK_TEXTS
    import pyarrow.parquet as pq

    return [t for t in pq.read_table(path, columns=["text"])["text"].to_pylist()[:limit] if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    params = load_params(args.params)
    uri = args.model or default_model_uri(params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(params.tracking)}
    texts = _texts(Path("outputs/prepared/test.parquet"))
    started = time.perf_counter()
    with scoring_server(uri, env=env) as url:
        startup_s = time.perf_counter() - started
        result = {"model": uri, "repeats": args.repeats, "startup_s": round(startup_s, 2)}
        for batch in (1, 32):
            timings = round_trip_latency(
                url, texts, batch_size=batch, repeats=args.repeats, warmup=args.warmup
            )
            result.update({k: round(v, 2) for k, v in timings.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
