"""Time and memory of `dvc repro` on a fresh clone, and of a no-op `dvc repro`.

    python benchmarks/pipeline.py [--quick] [--keep]

Clones the committed main of this repo into a temp dir (a fresh clone: no outputs,
no DVC cache, no MLflow store), runs `dvc repro` while sampling the summed RSS of
the whole process tree, then times no-op `dvc repro` runs against `dvc version`
(the floor of any DVC command: interpreter start and imports) run side by side.
--quick shrinks the params (tiny model, few steps) to check the harness itself.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_sampled(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """Run cmd; return (wall seconds, peak RSS of its process tree in bytes, combined output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    watched = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(watched))
            except psutil.Error:
                pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(output[-6000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return elapsed, peak, output


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def shrink(params_file: Path) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["profiles"]["cpu"].update(model_preset="tiny", max_steps=10)
    params["model"]["block_size"] = 64
    params["tune"].update(n_trials=2, max_epochs=1)
    params["finetune"].update(max_epochs=1, max_length=64)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny params: checks the harness, not the budget")
    parser.add_argument("--keep", action="store_true", help="keep the temp clone and print its path")
    parser.add_argument("--noop-repeats", type=int, default=5)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bigmodel-ops-pipeline-"))
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    if args.quick:
        shrink(clone / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(clone)

    repro_s, peak_rss, output = run_sampled(["dvc", "repro"], cwd=clone, env=env)
    stages_ran = output.count("Running stage '")

    noop, floor = [], []
    for _ in range(args.noop_repeats):  # interleaved so machine noise hits both alike
        noop.append(timed(["dvc", "repro"], cwd=clone, env=env))
        floor.append(timed(["dvc", "version"], cwd=clone, env=env))
    noop_s, floor_s = statistics.median(noop), statistics.median(floor)

    evaluate = json.loads((clone / "outputs/metrics/evaluate.json").read_text())
    result = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "cores": os.cpu_count(),
        "stages_ran": stages_ran,
        "fresh_repro_s": round(repro_s, 1),
        "fresh_repro_budget_s": 600,
        "peak_rss_gb": round(peak_rss / 1e9, 2),
        "peak_rss_budget_gb": 4.0,
        "noop_repro_s": round(noop_s, 3),
        "noop_repro_budget_s": 1.5,
        "dvc_version_floor_s": round(floor_s, 3),
        "noop_vs_floor_ratio": round(noop_s / floor_s, 2),
        "test_accuracy": evaluate.get("test_acc"),
    }
    if args.keep:
        print(f"clone kept at {clone}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
