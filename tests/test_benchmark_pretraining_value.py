"""Smoke test of benchmarks/pretraining_value.py: ``--quick`` on a tiny CSV written here."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

from bigmodel_ops.errors import ConfigError
from bigmodel_ops.paths import ProjectPaths
from tests.helpers_benchmarks import json_summary, run_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretraining_value.py"

KEYS = {
    "acc_pretrained",
    "acc_scratch",
    "acc_tfidf",
    "acc_lora",
    "pretrain_val_loss",
    "unigram_entropy",
    "gap_to_unigram",
    "seconds",
    "seconds_pretrain",
    "seconds_finetune_pretrained",
    "seconds_finetune_scratch",
    "seconds_finetune_lora",
    "seconds_tfidf",
    "acc_probe_pretrained",
    "acc_probe_random",
    "seconds_probe",
    "objective",
    "corpus",
    "n_train",
    "n_test",
    "test_se_points",
    "tokenizer_sha256",
    "backbone_sha256",
}

_GOOD = ["wonderful", "moving", "brilliant", "a joy to watch", "beautifully acted", "great fun"]
_BAD = ["boring", "dull", "a waste of time", "badly acted", "painful", "a mess"]
_THINGS = ["the plot", "the cast", "the ending", "the music", "the dialogue", "the camera work"]
_FILLER = [
    "I saw it with my brother last week.",
    "It runs for almost two hours.",
    "The director made three films before this one.",
    "Some scenes were shot in an old harbour town.",
    "My local cinema showed it twice.",
]


def _review(rng: random.Random, positive: bool) -> str:
    words = _GOOD if positive else _BAD
    sentences = [f"{rng.choice(_THINGS).capitalize()} is {rng.choice(words)}."]
    sentences += rng.sample(_FILLER, 3)
    sentences.append(f"Overall {rng.choice(_THINGS)} was {rng.choice(words)} and {rng.choice(words)}.")
    return " ".join(sentences[:2]) + "<br /><br />" + " ".join(sentences[2:])


def write_tiny_csv(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(n):
            positive = i % 2 == 0
            writer.writerow([_review(rng, positive), "positive" if positive else "negative"])
    return path


def _load_script():
    spec = importlib.util.spec_from_file_location("pretraining_value", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_sentence_strips_markup_and_keeps_one_sentence(tmp_path: Path) -> None:
    bench = _load_script()
    assert bench.first_sentence("A fine film.<br /><br />The cast is good. Really!") == "A fine film."
    assert bench.first_sentence("Is it good? Yes.") == "Is it good?"
    assert bench.first_sentence("No end mark <br />here") == "No end mark here"
    source = write_tiny_csv(tmp_path / "tiny.csv", n=4)
    rows = bench.write_short_csv(source, tmp_path / "short.csv", text_column="review")
    assert rows == 4
    with (tmp_path / "short.csv").open(newline="", encoding="utf-8") as f:
        short = list(csv.DictReader(f))
    assert len(short) == 4 and all(r["review"].count(".") == 1 and "<" not in r["review"] for r in short)
    assert [r["sentiment"] for r in short] == ["positive", "negative", "positive", "negative"]


def _params_args(data: Path) -> dict:
    """build_params' arguments for the tiny CSV, without overrides or unlabeled text."""
    return dict(
        data=data,
        text_column="review",
        label_column="sentiment",
        objective="masked",
        seed=None,
        tracking_uri="sqlite:///unused.db",
        quick=False,
    )


def test_set_overrides_a_setting_of_every_variant_and_refuses_a_bad_key(tmp_path: Path) -> None:
    bench = _load_script()
    common = _params_args(write_tiny_csv(tmp_path / "tiny.csv", n=4))
    params = bench.build_params(**common, overrides=["profiles.max_steps=2000", "finetune.lr=0.001"])
    assert params.sizing.max_steps == 2000 and params.finetune.lr == 0.001
    with pytest.raises(SystemExit, match=r"--set lr=0.001: expected SECTION.KEY=VALUE"):
        bench.build_params(**common, overrides=["lr=0.001"])
    with pytest.raises(ConfigError, match=r"finetune.lrr = 0.001: unknown key"):
        bench.build_params(**common, overrides=["finetune.lrr=0.001"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("maxpool", "expected NAME:KEY=VALUE"),
        ("maxpool:", "expected NAME:KEY=VALUE"),
        ("Max-Pool:pooling=mean_max", "name 'Max-Pool' must be lower-case"),
        (
            "scratch:pooling=mean_max",
            "name 'scratch' must be lower-case letters, digits and _, and not one of",
        ),
        ("maxpool:pooling", "'pooling' is not KEY=VALUE"),
        ("maxpool:finetune.pooling=mean_max", "'finetune.pooling=mean_max' is not KEY=VALUE"),
    ],
)
def test_a_malformed_variant_is_refused_by_name(text: str, message: str) -> None:
    bench = _load_script()
    with pytest.raises(SystemExit, match=re.escape(f"--variant {text}: {message}")):
        bench.parse_variant(text)


def test_variants_are_checked_by_the_schema_before_any_work(tmp_path: Path, monkeypatch) -> None:
    bench = _load_script()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # run() sets it: restored after
    assert bench.parse_variant("maxpool:pooling=mean_max, lr=0.001") == (
        "maxpool",
        ["finetune.pooling=mean_max", "finetune.lr=0.001"],
    )
    data = write_tiny_csv(tmp_path / "tiny.csv", n=4)
    keep = tmp_path / "kept"
    for variant, error, message in (
        (["bad:pooling=max"], ConfigError, "finetune.pooling"),
        (["a:lr=0.001", "a:lr=0.002"], SystemExit, "--variant a:lr=0.002: the name 'a' is used twice"),
    ):
        argv = ["--data", str(data), "--keep", str(keep)] + [f"--variant={v}" for v in variant]
        with pytest.raises(error, match=re.escape(message)):
            bench.run(bench.build_parser().parse_args(argv), seed=None, keep=keep)
        assert not (keep / "outputs").exists() and not (keep / "mlflow.db").exists()


def test_unlabeled_text_feeds_the_pretraining_pool_and_a_missing_file_is_refused(tmp_path: Path) -> None:
    bench = _load_script()
    data = write_tiny_csv(tmp_path / "tiny.csv", n=4)
    pool = tmp_path / "pool.txt"
    pool.write_text("One more review.\n", encoding="utf-8")
    params = bench.build_params(**_params_args(data), unlabeled=pool)
    assert params.prepare.source.unlabeled_path == str(pool)
    missing = tmp_path / "missing.txt"
    with pytest.raises(SystemExit, match=rf"--unlabeled {missing}: not a file"):
        bench.run(
            bench.build_parser().parse_args(["--data", str(data), "--unlabeled", str(missing)]),
            seed=None,
            keep=None,
        )


@pytest.mark.slow
def test_quick_run_prints_the_json_summary_last(tmp_path: Path) -> None:
    data = write_tiny_csv(tmp_path / "tiny.csv")
    # Extra unlabeled text: three new documents, plus one review of the CSV that dedup must drop.
    with data.open(newline="", encoding="utf-8") as f:
        a_review = next(csv.DictReader(f))["review"]
    extra = [
        "An old print of a silent film.",
        "The sequel came out in spring.",
        "A long night at the cinema.",
    ]
    unlabeled = tmp_path / "pool.txt"
    unlabeled.write_text("\n".join([*extra, a_review]) + "\n", encoding="utf-8")
    args = ["--data", str(data), "--quick", "--objective", "masked", "--set", "profiles.max_steps=6"]
    args += ["--unlabeled", str(unlabeled)]
    # timeout: a loaded shared machine; about 40 s when idle
    result = run_benchmark(SCRIPT, *args, cwd=tmp_path, timeout=600)
    summary, lines = json_summary(result)
    assert KEYS <= set(summary), sorted(KEYS - set(summary))
    # A clean console: no dependency warns about its changing defaults (scikit-learn's probe did).
    assert "FutureWarning" not in result.stderr and "DeprecationWarning" not in result.stderr, result.stderr
    for key in (
        "acc_pretrained",
        "acc_scratch",
        "acc_tfidf",
        "acc_lora",
        "acc_probe_pretrained",
        "acc_probe_random",
    ):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["objective"] == "masked" and summary["corpus"] == "full" and summary["quick"] is True
    assert summary["unigram_entropy"] > 0 and summary["n_test"] > 0 and summary["test_se_points"] > 0
    assert summary["trainable_params_lora"] < summary["trainable_params_pretrained"]
    assert summary["pretrain_steps"] == 6 and summary["set"] == ["profiles.max_steps=6"]
    assert summary["unlabeled"] == "pool.txt"
    assert summary["n_pretrain_texts"] == summary["n_train"] + summary["n_val"] + len(extra)
    assert summary["seconds"] >= summary["seconds_pretrain"] > 0
    # The table is printed before the JSON; the project lived in a temporary folder, not here.
    assert any(line.startswith("(a) pretrained") for line in lines)
    assert not {"outputs", "mlflow.db", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}


def test_mean_hidden_states_leave_padding_out() -> None:
    """A text's probe features do not depend on the texts batched with it: padding is hidden from
    attention and left out of the mean (with padding in the mean, the short row would change)."""
    import torch

    from bigmodel_ops.model import TransformerLM
    from tests.tiny import tiny_model_config

    bench = _load_script()
    torch.manual_seed(0)
    model = TransformerLM(tiny_model_config(vocab_size=50, objective="masked"))
    short, long = [2, 11, 12, 13, 3], [2, *range(14, 40), 3]
    alone = bench.mean_hidden_states(model, [short])
    batched = bench.mean_hidden_states(model, [short, long])
    assert alone.shape == (1, model.config.n_embd) and batched.shape == (2, model.config.n_embd)
    assert np.allclose(alone[0], batched[0], atol=1e-5)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)
    # In batches of one, every row is its own batch: the same features again.
    assert np.allclose(bench.mean_hidden_states(model, [short, long], batch_size=1), batched, atol=1e-5)


def _seed_run(seed: int, acc_pretrained: float, acc_scratch: float, seconds: float) -> dict:
    return {
        "acc_pretrained": acc_pretrained,
        "acc_scratch": acc_scratch,
        "val_acc_pretrained": 0.80,
        "val_acc_scratch": 0.78,
        "acc_tfidf": 0.87,
        "gap_to_unigram": 1.2,
        "seconds": seconds,
        "seed": seed,
        "tokenizer_sha256": f"{seed:016x}",
        "objective": "masked",
        "quick": False,
    }


def test_several_seeds_average_each_figure_and_give_the_spread_of_the_paired_difference() -> None:
    bench = _load_script()
    runs = [_seed_run(1, 0.80, 0.78, 100.0), _seed_run(2, 0.84, 0.78, 120.0), _seed_run(3, 0.79, 0.80, 90.0)]
    summary = bench.aggregate(runs)
    assert summary["acc_pretrained"] == pytest.approx(0.81) and summary["acc_scratch"] == pytest.approx(
        0.7867
    )
    assert summary["seconds"] == 310.0  # the total wall time, not a mean
    assert summary["seeds"] == [1, 2, 3] and "seed" not in summary and summary["n_seeds"] == 3
    assert "tokenizer_sha256" not in summary  # one seed's fingerprint is not the mean's: per_seed has it
    assert summary["per_seed"] == runs and summary["objective"] == "masked" and summary["quick"] is False
    # Paired differences +2, +6, -1 points: mean 2.33, sample sd 3.51, standard error 3.51 / sqrt(3).
    assert summary["pretrained_minus_scratch_points"] == pytest.approx(2.33)
    assert summary["pretrained_minus_scratch_se"] == pytest.approx(2.03)
    assert summary["val_pretrained_minus_scratch_points"] == pytest.approx(2.0)
    assert summary["val_pretrained_minus_scratch_se"] == 0.0  # the same val difference on every seed
    assert bench.aggregate(runs[:1])["pretrained_minus_scratch_se"] == 0.0
    # A --variant: its paired difference from (a), on test and on val, the same way.
    for run, acc, val in zip(runs, (0.82, 0.83, 0.82), (0.81, 0.80, 0.79), strict=True):
        run.update(acc_maxpool=acc, val_acc_maxpool=val, variants={"maxpool": ["finetune.pooling=mean_max"]})
    summary = bench.aggregate(runs)
    assert summary["acc_maxpool"] == pytest.approx(0.8233) and summary["variants"] == runs[0]["variants"]
    # +2, -1, +3 points on test: mean 1.33, sd 2.08, se 1.20; val +1, 0, -1: mean 0, se 0.58
    assert summary["maxpool_minus_pretrained_points"] == pytest.approx(1.33)
    assert summary["maxpool_minus_pretrained_se"] == pytest.approx(1.2)
    assert summary["val_maxpool_minus_pretrained_points"] == pytest.approx(0.0)
    assert summary["val_maxpool_minus_pretrained_se"] == pytest.approx(0.58)


def test_a_seed_named_twice_is_refused(tmp_path: Path) -> None:
    bench = _load_script()
    data = write_tiny_csv(tmp_path / "tiny.csv", n=4)
    levels = {name: logging.getLogger(name).level for name in ("", "lightning.pytorch", "lightning.fabric")}
    with pytest.raises(SystemExit, match=r"--seed: \[1, 2, 1\] names a seed twice"):
        bench.main(["--data", str(data), "--seed", "1", "--seed", "2", "--seed", "1"])
    # Refused before main() quiets Lightning: nothing about this process's logging changed.
    assert {name: logging.getLogger(name).level for name in levels} == levels


@pytest.mark.slow
def test_quick_run_over_two_seeds_without_lora_reports_each_seed_and_the_means(tmp_path: Path) -> None:
    data = write_tiny_csv(tmp_path / "tiny.csv")
    args = ["--data", str(data), "--quick", "--skip-lora", "--seed", "5", "--seed", "6"]
    args += ["--set", "finetune.restarts=2", "--variant", "maxpool:pooling=mean_max,restarts=1"]
    args += ["--variant", "soup:combine_restarts=soup"]
    args += ["--keep", str(tmp_path / "kept")]
    summary, lines = json_summary(run_benchmark(SCRIPT, *args, cwd=tmp_path, timeout=900))
    assert summary["seeds"] == [5, 6] and [run["seed"] for run in summary["per_seed"]] == [5, 6]
    assert not any("lora" in key for key in summary) and not any(
        "lora" in key for key in summary["per_seed"][0]
    )
    # Two seeds are two splits of the same CSV, so two pretraining val shards.
    assert summary["per_seed"][0]["unigram_entropy"] != summary["per_seed"][1]["unigram_entropy"]
    mean = sum(run["acc_pretrained"] for run in summary["per_seed"]) / 2
    assert summary["acc_pretrained"] == pytest.approx(mean, abs=1e-4)
    assert summary["seconds"] == pytest.approx(sum(run["seconds"] for run in summary["per_seed"]), abs=0.2)
    assert any(line.startswith("pretraining value over 2 seeds") for line in lines)
    # Each seed's fingerprints are those of the files its run kept, and differ between the seeds.
    for run in summary["per_seed"]:
        kept = ProjectPaths(tmp_path / "kept" / f"seed-{run['seed']}")
        assert run["tokenizer_sha256"] == hashlib.sha256(kept.tokenizer_file.read_bytes()).hexdigest()[:16]
        weights = (kept.pretrained_model / "model.safetensors").read_bytes()
        assert run["backbone_sha256"] == hashlib.sha256(weights).hexdigest()[:16]
    assert summary["per_seed"][0]["backbone_sha256"] != summary["per_seed"][1]["backbone_sha256"]
    assert "backbone_sha256" not in summary and "tokenizer_sha256" not in summary
    assert not any(line.startswith("(d)") for line in lines)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["seed-5", "seed-6"]
    # finetune.restarts: each variant fine-tuned twice per seed, the run with the best val kept
    assert summary["restarts"] == 2
    # --variant: one more fine-tuning of (a) per seed, from the same backbone, with its own settings
    assert summary["variants"] == {
        "maxpool": ["finetune.pooling=mean_max", "finetune.restarts=1"],
        "soup": ["finetune.combine_restarts=soup"],
    }
    for run in summary["per_seed"]:
        assert "restart_acc_maxpool" not in run and 0.0 <= run["acc_maxpool"] <= 1.0
        diff = 100 * (run["acc_maxpool"] - run["acc_pretrained"])
        assert run["maxpool_minus_pretrained_points"] == pytest.approx(diff, abs=0.01)
    assert any(line.startswith("variant maxpool:") for line in lines)
    assert not [key for key in summary if key.startswith(("restart_", "kept_restart"))]
    for run in summary["per_seed"]:
        for variant in ("pretrained", "scratch"):
            val, test = run[f"restart_val_acc_{variant}"], run[f"restart_acc_{variant}"]
            kept = run[f"kept_restart_{variant}"]
            assert len(val) == len(test) == 2 and kept == (1 if val[1] > val[0] else 0)
            assert run[f"acc_{variant}"] == test[kept] and run[f"val_acc_{variant}"] == val[kept]
        # the soup variant: (a)'s two runs again (the same seeds), their mean scored beside the best
        assert run["restart_acc_soup"] == run["restart_acc_pretrained"] and run["soup_members_soup"] == [0, 1]
        assert run["acc_best_restart_soup"] == run["acc_pretrained"]
        assert run["val_acc_best_restart_soup"] == run["val_acc_pretrained"]
        assert 0.0 <= run["acc_soup"] <= 1.0
    means = [
        sum(run[f"{key}_soup"] for run in summary["per_seed"]) / 2 for key in ("acc", "acc_best_restart")
    ]
    assert [summary["acc_soup"], summary["acc_best_restart_soup"]] == pytest.approx(means, abs=1e-4)
    assert any(line.split()[:5] == ["soup", "soup", "of", "restarts", "[0,"] for line in lines)
