"""benchmarks/hpo_replay.py: replaying an unpruned search gives what the pruned search really did.

The searches here are real Optuna studies in sqlite storages, with a deterministic objective
whose learning curves cross (no training: the replay only reads reports, steps and values). On
the examples axis (tune.report_every_n_examples) the real search reports as the tune stage's
callback does: at the steps of examples_report_steps, keyed by examples seen.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from bigmodel_ops.config import parse_params
from bigmodel_ops.tuning.pruning import examples_report_steps
from bigmodel_ops.tuning.study import make_pruner
from tests.helpers_benchmarks import json_summary, run_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "hpo_replay.py"
STUDY = "replay-demo"
SETTINGS = (
    "pruner=successive_halving,min_resource=20,reduction_factor=3",
    "pruner=hyperband,min_resource=20,reduction_factor=3",
    "pruner=median,pruner_startup_trials=2,pruner_warmup_steps=40",
)
# The examples axis: 640 examples are 40 steps of batch 16 and 20 of batch 32, all recorded by the
# unpruned search (every 20 steps); the batch-16 trials' reports at steps 20, 60, ... are not fed.
EXAMPLES = 640
EXAMPLE_SETTINGS = (
    f"report_every_n_examples={EXAMPLES},pruner=successive_halving,min_resource=640,reduction_factor=3",
    f"report_every_n_examples={EXAMPLES},pruner=hyperband,min_resource=640,reduction_factor=3",
    f"report_every_n_examples={EXAMPLES},pruner=median,pruner_startup_trials=2,pruner_warmup_steps=1280",
)


def _objective(trial: optuna.Trial, *, every_n_examples: int | None = None) -> float:
    """Reports every 20 optimizer steps, or, with ``every_n_examples``, as the tune stage's
    callback: at each step whose examples (step x batch) reach the next multiple, keyed by
    those examples (and user attribute report_axis = examples). The value at a step is the same
    on both axes, as a seeded training's is."""
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    batch = trial.suggest_categorical("batch_size", [16, 32])
    budget = 200 if batch == 16 else 100  # 3,200 examples either way
    quality = 0.5 + 0.4 * math.exp(-((math.log10(lr) + 2.5) ** 2))
    speed = 30.0 if lr > 1e-3 else 90.0  # fast starters are not always the best at the end
    if every_n_examples is None:
        steps, per_step = list(range(20, budget + 1, 20)), 1
    else:
        trial.set_user_attr("report_axis", "examples")
        steps = examples_report_steps(
            every_n_examples=every_n_examples, examples_per_step=batch, last_step=budget
        )
        per_step = batch
    value = 0.5
    for step in steps:
        value = 0.5 + (quality - 0.5) * (1 - math.exp(-step / speed)) + 0.02 * math.sin(step * lr * 300)
        trial.report(value, step * per_step)
        if trial.should_prune():
            trial.set_user_attr("optimizer_steps", step)
            raise optuna.TrialPruned()
    trial.set_user_attr("optimizer_steps", budget)
    return value


def _search(
    storage: str,
    pruner: optuna.pruners.BasePruner,
    *,
    n_trials: int = 14,
    every_n_examples: int | None = None,
    name: str = STUDY,
) -> optuna.Study:
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=11),
        pruner=pruner,
    )
    study.optimize(lambda trial: _objective(trial, every_n_examples=every_n_examples), n_trials=n_trials)
    return study


def _tune(setting: str):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in setting.split(","):
        key, _, value = item.partition("=")
        raw["tune"][key] = yaml.safe_load(value)
    return parse_params(raw).tune


def _replay(*args: str) -> subprocess.CompletedProcess:
    return run_benchmark(SCRIPT, *args, cwd=REPO, timeout=120)


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _assert_replay_equals(replayed: dict, real: optuna.Study, *, setting: str, unpruned: optuna.Study) -> int:
    """The replayed figures of ``setting`` are the real pruned search's; returns its pruned count."""
    total = sum(t.user_attrs["optimizer_steps"] for t in unpruned.trials)
    steps = sum(t.user_attrs["optimizer_steps"] for t in real.trials)
    n_pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in real.trials)
    assert replayed["setting"] == setting
    assert replayed["steps"] == steps, setting
    assert replayed["steps_fraction"] == pytest.approx(steps / total, abs=1e-4)
    assert replayed["n_pruned"] == n_pruned, setting
    assert replayed["best_value"] == pytest.approx(real.best_value), setting
    gap = 100 * (unpruned.best_value - real.best_value)
    assert replayed["best_gap_points"] == pytest.approx(gap, abs=0.01)
    return n_pruned


def test_replay_equals_the_real_pruned_search(tmp_path: Path) -> None:
    unpruned = _search(f"sqlite:///{tmp_path / 'unpruned.db'}", optuna.pruners.NopPruner())
    total = sum(t.user_attrs["optimizer_steps"] for t in unpruned.trials)
    result = _replay("--study", f"sqlite:///{tmp_path / 'unpruned.db'}", *[f"--try={s}" for s in SETTINGS])
    summary, _ = json_summary(result)
    assert summary["unpruned_steps"] == total
    assert summary["unpruned_best"] == pytest.approx(unpruned.best_value)

    pruned_something = False
    for index, (setting, replayed) in enumerate(zip(SETTINGS, summary["settings"], strict=True)):
        real = _search(f"sqlite:///{tmp_path / f'pruned-{index}.db'}", make_pruner(_tune(setting)))
        pruned_something |= _assert_replay_equals(replayed, real, setting=setting, unpruned=unpruned) > 0
    assert pruned_something, "no setting pruned: the comparison would prove nothing"


def test_replay_on_the_examples_axis_equals_the_real_search_that_reported_examples(tmp_path: Path) -> None:
    unpruned_storage = f"sqlite:///{tmp_path / 'unpruned.db'}"
    unpruned = _search(unpruned_storage, optuna.pruners.NopPruner())
    batches = {t.params["batch_size"] for t in unpruned.trials}
    assert batches == {16, 32}, "both batch sizes are needed for the examples axis to matter"
    # The tune stage names an examples-axis study apart from the steps one; Hyperband hashes it.
    examples_name = f"{STUDY}-examples"
    tries = [f"--try={s}" for s in EXAMPLE_SETTINGS]
    unnamed = _replay("--study", unpruned_storage, *tries)
    assert unnamed.returncode == 2 and not unnamed.stdout
    assert f"--try {EXAMPLE_SETTINGS[1]}: Hyperband on the examples axis" in unnamed.stderr
    assert "--examples-study-name" in unnamed.stderr
    result = _replay("--study", unpruned_storage, *tries, "--examples-study-name", examples_name)
    summary, _ = json_summary(result)

    pruned_something = False
    for index, (setting, replayed) in enumerate(zip(EXAMPLE_SETTINGS, summary["settings"], strict=True)):
        real = _search(
            f"sqlite:///{tmp_path / f'examples-{index}.db'}",
            make_pruner(_tune(setting)),
            every_n_examples=EXAMPLES,
            name=examples_name,
        )
        finished = [t for t in real.trials if t.state == optuna.trial.TrialState.COMPLETE]
        # the real search reported on examples: the same keys whatever the batch size
        for trial in finished:
            assert sorted(trial.intermediate_values) == list(range(EXAMPLES, 3200 + 1, EXAMPLES))
        pruned_something |= _assert_replay_equals(replayed, real, setting=setting, unpruned=unpruned) > 0
    assert pruned_something, "no setting pruned: the comparison would prove nothing"


def test_an_examples_setting_the_recorded_reports_cannot_replay_exactly_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'unpruned.db'}"
    unpruned = _search(storage, optuna.pruners.NopPruner())
    # 320 examples: every 20 steps of batch 16 (recorded), every 10 steps of batch 32 (not recorded)
    setting = "report_every_n_examples=320,pruner=median"
    first_32 = next(t.number for t in unpruned.trials if t.params["batch_size"] == 32)

    refused = _replay("--study", storage, "--try", "pruner=hyperband", "--try", setting)

    assert refused.returncode == 2
    assert refused.stdout == ""  # refused before any setting was replayed
    assert f"--try {setting}: report_every_n_examples=320 cannot be replayed exactly" in refused.stderr
    assert f"trial {first_32} (batch 32 x accumulation 1 = 32 examples a step)" in refused.stderr
    assert "would report at optimizer step 10 (320 examples)" in refused.stderr
    assert "steps 20, 40, 60, 80, 100" in refused.stderr

    # the same recorded study replays 640 exactly: steps 40, 80, ... of batch 16, 20, 40, ... of batch 32
    fine = _replay("--study", storage, "--try", "report_every_n_examples=640,pruner=median")
    assert fine.returncode == 0, fine.stderr


def test_bad_settings_and_studies_are_refused_by_name(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'unpruned.db'}"
    _search(storage, optuna.pruners.NopPruner(), n_trials=3)

    unknown = _replay("--study", storage, "--try", "pruner=median,no_such_setting=3")
    assert unknown.returncode == 2
    assert "no_such_setting" in unknown.stderr and "tune" in unknown.stderr

    not_pair = _replay("--study", storage, "--try", "pruner")
    assert not_pair.returncode == 2
    assert "'pruner' is not KEY=VALUE" in not_pair.stderr

    wrong_name = _replay("--study", storage, "--study-name", "other", "--try", "pruner=median")
    assert wrong_name.returncode == 2
    assert "has no study 'other'" in wrong_name.stderr

    pruned_storage = f"sqlite:///{tmp_path / 'pruned.db'}"
    _search(pruned_storage, make_pruner(_tune(SETTINGS[0])))
    refused = _replay("--study", pruned_storage, "--try", "pruner=median")
    assert refused.returncode == 2
    assert "pruned some trials" in refused.stderr

    examples_storage = f"sqlite:///{tmp_path / 'examples.db'}"
    _search(examples_storage, optuna.pruners.NopPruner(), n_trials=3, every_n_examples=EXAMPLES)
    in_examples = _replay("--study", examples_storage, "--try", "pruner=median")
    assert in_examples.returncode == 2
    assert "trials [0, 1, 2] reported on training examples" in in_examples.stderr

    both = _replay("--study", storage, "--try", "report_every_n_steps=20,report_every_n_examples=640")
    assert both.returncode == 2
    assert "tune.report_every_n_steps (20) and tune.report_every_n_examples (640)" in both.stderr
