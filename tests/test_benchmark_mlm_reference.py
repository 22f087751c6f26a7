"""Smoke test of benchmarks/mlm_reference.py: ``--quick`` on a tiny CSV written here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from tests.helpers_benchmarks import json_summary, run_benchmark
from tests.test_benchmark_pretraining_value import write_tiny_csv

pytest.importorskip(
    "transformers", reason="transformers (the dev extras) is the benchmark's reference model: not installed"
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "mlm_reference.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("mlm_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_bert_reads_the_same_targets_at_the_same_positions() -> None:
    import torch

    bench = _load_script()
    batch = {
        "input_ids": torch.tensor([[5, 4, 7, 4, 9], [4, 6, 3, 8, 4]]),
        "positions": torch.tensor([[1, 3], [0, 4]]),
        "labels": torch.tensor([[11, 12], [13, -100]]),  # a slot the row could not fill: ignored
    }
    labels = bench.hf_labels(batch)
    assert labels.tolist() == [[-100, 11, -100, 12, -100], [13, -100, -100, -100, -100]]
    assert bench.eval_steps(steps=6, every=3) == [0, 3, 6]
    assert bench.eval_steps(steps=7, every=3) == [0, 3, 6, 7]


def test_quick_run_trains_both_models_on_the_same_budget(tmp_path: Path) -> None:
    data = write_tiny_csv(tmp_path / "tiny.csv")
    # timeout: a loaded shared machine; about 20 s when idle
    result = run_benchmark(SCRIPT, "--data", str(data), "--quick", cwd=tmp_path, timeout=600)
    s, lines = json_summary(result)
    assert s["steps"] == 6 and s["eval_steps"] == [0, 3, 6] and s["quick"] is True
    assert s["tokens"] == 6 * s["tokens_per_step"] == 6 * s["batch_size"] * s["block_size"]
    for name in ("ours", "hf"):
        losses, seconds = s[f"{name}_val_loss"], s[f"{name}_seconds"]
        assert len(losses) == len(seconds) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
        # Untrained, both predict about uniformly over the vocabulary; six steps then lower the loss.
        assert abs(losses[0] - math.log(s["vocab_size"])) < 0.5, losses
        assert losses[-1] < losses[0], losses
        assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] > 0
        assert s[f"{name}_final_gap"] == pytest.approx(s["unigram_entropy"] - losses[-1], abs=1e-3)
    # Same size within a few percent. BERT has more: biases, an embedding LayerNorm, a token type
    # row, the transform layer (C x C + LayerNorm) before its tied decoder and the decoder's bias;
    # ours pads its vocabulary to a multiple of 64 (its extra rows count too).
    assert 1.0 < s["hf_params"] / s["ours_params"] < 1.05, (s["ours_params"], s["hf_params"])
    assert s["alibi"] is True and s["unigram_entropy"] > 0 and s["mlp_width"] == 4 * s["n_embd"]
    assert any(line.lstrip().startswith("step") and "hf val" in line for line in lines)
    # The project lived in a temporary folder, not here.
    assert not {"outputs", "mlflow.db", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}


def test_a_missing_data_file_is_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.csv"
    result = run_benchmark(SCRIPT, "--data", str(missing), "--quick", cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and str(missing) in result.stderr, result.stderr
    assert not result.stdout.strip()
