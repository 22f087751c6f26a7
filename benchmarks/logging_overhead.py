"""Cost of logging every optimizer step through StageRun, against not logging at all.

A tiny CPU transformer trains in one process; blocks of steps with and without logging are
interleaved (ABBA order) so that machine load hits both alike. Each logged step sends 4 metrics
through ``StageRun.log_metrics`` to a real sqlite MLflow store in a temp folder (batched by the
background sender, which works while training runs).

Overhead = mean step time with logging / mean without - 1. A logged block ends with an untimed
``flush()`` so that no sending spills into the next (unlogged) block; the time those flushes
waited is reported too, and ``overhead_pct_with_flushes`` charges it to the logged blocks (an
upper bound: a real stage flushes once, at its end, not every few seconds).

This VM's speed drifts by several percent over seconds, so the headline is paired: each round's
logged block against its adjacent unlogged one, ``overhead_pct_paired`` = the geometric mean of
the per-round ratios - 1, with a seeded bootstrap 95% interval. ``--control`` runs the same
schedule with nothing logged (A/A): its interval is the noise floor the A/B figure is read against.

    python benchmarks/logging_overhead.py [--quick]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def build_model(vocab: int = 512, d: int = 64, layers: int = 2, seq: int = 32) -> tuple[torch.nn.Module, int]:
    layer = torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, d), torch.nn.TransformerEncoder(layer, layers), torch.nn.Linear(d, vocab)
    )
    return model, seq


def bootstrap_mean_ci(values: list[float], *, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` (seeded, so reruns agree)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps-per-block", type=int, default=100)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's choice")
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A run: the 'logged' blocks log nothing, so the result is this machine's noise floor",
    )
    parser.add_argument(
        "--sender",
        choices=("process", "thread"),
        default="process",
        help="where the sender runs (params default)",
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rounds = args.rounds or (4 if args.quick else 40)

    from bigmodel_ops.config import parse_params
    from bigmodel_ops.tracking import stage_run

    torch.manual_seed(0)
    model, seq = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 512, (8, seq))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch)
        loss = loss_fn(logits.view(-1, logits.size(-1)), batch.view(-1))
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(10):  # warm-up: allocator, kernels
        step()

    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["tracking"] = {
            "uri": f"sqlite:///{tmp}/mlflow.db",
            "artifact_location": f"{tmp}/art",
            "spool_dir": f"{tmp}/spool",
            "system_metrics": False,
            "sender": args.sender,
        }
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        params = parse_params(raw)
        os.chdir(tmp)  # not inside a project: no pipeline parent, lineage adds nothing
        times: dict[str, list[float]] = {"base": [], "logged": []}
        block_means: dict[str, list[float]] = {"base": [], "logged": []}
        # CPU of this process (all its threads; not a sender process) per mode: what logging
        # costs the training process itself, much less sensitive to other load than wall time.
        cpu: dict[str, float] = {"base": 0.0, "logged": 0.0}
        global_step = 0
        block_flushes_s = 0.0
        start = time.perf_counter()
        with stage_run(
            params.tracking,
            experiment=params.experiment_name,
            stage="bench",
            params=params.model_dump(mode="json"),
            log_stage_params=False,
        ) as run:
            setup_s = time.perf_counter() - start
            # The sender opens its store connection in the background; let it finish before the
            # timed rounds, or its start-up lands in the first (unlogged) block and biases it.
            run.flush()
            for r in range(rounds):
                order = ("base", "logged") if r % 2 == 0 else ("logged", "base")
                for mode in order:
                    cpu_start = time.process_time()
                    for _ in range(args.steps_per_block):
                        t0 = time.perf_counter()
                        loss = step()
                        if mode == "logged" and not args.control:
                            run.log_metrics(
                                {
                                    "train/loss": loss,
                                    "train/lr": 1e-3,
                                    "train/grad_norm": 1.0,
                                    "train/tokens_per_s": 1.0,
                                },
                                step=global_step,
                            )
                        times[mode].append(time.perf_counter() - t0)
                        global_step += 1
                    cpu[mode] += time.process_time() - cpu_start
                    block_means[mode].append(statistics.fmean(times[mode][-args.steps_per_block :]))
                    if mode == "logged":
                        t_flush = time.perf_counter()
                        run.flush()
                        block_flushes_s += time.perf_counter() - t_flush
            t_flush = time.perf_counter()
            run.flush()
            flush_s = time.perf_counter() - t_flush
            sender_cpu_s = run.sender_stats().send_cpu_s  # as of that flush
            # The caller's own share, without training around it: CPU of this process (all its
            # threads) per log_metrics call, the same 4 metrics, under a separate metric name.
            calls = 0 if args.control else 20_000
            cpu_start = time.process_time()
            for i in range(calls):
                run.log_metrics({"caller/a": 1.0, "caller/b": 1.0, "caller/c": 1.0, "caller/d": 1.0}, step=i)
            caller_cpu_s = time.process_time() - cpu_start
            run.flush()
            run_id = run.run_id
            sender_mode = run.sender_stats().mode
        from mlflow.tracking import MlflowClient

        logged_points = len(MlflowClient(params.tracking.uri).get_metric_history(run_id, "train/loss"))

    ratios = [math.log(a / b) for a, b in zip(block_means["logged"], block_means["base"], strict=True)]
    low, high = bootstrap_mean_ci(ratios)
    base = statistics.median(times["base"])
    logged = statistics.median(times["logged"])
    result = {
        "benchmark": "logging_overhead",
        "quick": args.quick,
        "control_run": args.control,
        "steps_per_mode": len(times["base"]),
        "median_step_ms_no_logging": round(base * 1e3, 4),
        "median_step_ms_logging": round(logged * 1e3, 4),
        "mean_step_ms_no_logging": round(statistics.fmean(times["base"]) * 1e3, 4),
        "mean_step_ms_logging": round(statistics.fmean(times["logged"]) * 1e3, 4),
        "rounds": rounds,
        "steps_per_block": args.steps_per_block,
        "overhead_pct_paired": round((math.exp(statistics.fmean(ratios)) - 1) * 100, 3),
        "overhead_pct_paired_ci95": [
            round((math.exp(low) - 1) * 100, 3),
            round((math.exp(high) - 1) * 100, 3),
        ],
        "overhead_pct_median": round((logged / base - 1) * 100, 3),
        "overhead_pct_mean": round(
            (statistics.fmean(times["logged"]) / statistics.fmean(times["base"]) - 1) * 100, 3
        ),
        "process_cpu_overhead_pct": round((cpu["logged"] / cpu["base"] - 1) * 100, 3),
        "caller_cpu_us_per_log_call": round(caller_cpu_s / calls * 1e6, 2) if calls else None,
        "caller_cpu_pct_of_step": round(caller_cpu_s / calls / base * 100, 4) if calls else None,
        "metrics_per_step": 4,
        "points_found_in_store": logged_points,
        "stage_run_setup_s": round(setup_s, 3),
        "final_flush_s": round(flush_s, 3),
        "block_flushes_s": round(block_flushes_s, 3),
        "overhead_pct_with_flushes": round(
            ((sum(times["logged"]) + block_flushes_s) / sum(times["base"]) - 1) * 100, 3
        ),
        # CPU the background sender used per logged step, relative to a step: the share of
        # a core it can take from training (robust to machine noise, unlike wall-clock medians).
        "sender_cpu_ms_per_logged_step": round(sender_cpu_s / len(times["logged"]) * 1e3, 4),
        "sender_cpu_pct_of_step": round(sender_cpu_s / len(times["logged"]) / base * 100, 3),
        "sender": sender_mode,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"no logging: {result['mean_step_ms_no_logging']} ms/step, "
        f"logging every step: {result['mean_step_ms_logging']} ms/step "
        f"({result['overhead_pct_paired']:+.2f}% paired, 95% CI {result['overhead_pct_paired_ci95']}; "
        f"{result['overhead_pct_mean']:+.2f}% mean, {result['overhead_pct_median']:+.2f}% median, "
        f"{result['overhead_pct_with_flushes']:+.2f}% charging the block flushes; sender: {sender_mode})"
    )
    print(json.dumps(result))
    expected_points = 0 if args.control else len(times["logged"])
    return 0 if logged_points == expected_points else 1


if __name__ == "__main__":
    sys.exit(main())
