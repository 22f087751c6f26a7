"""tune.search_space (any fine-tuning setting, typed distributions), samplers and pruners.

Pure Optuna and schema checks: no training here (the stage's tests are tests/test_tune.py and
tests/test_tune_pruning.py).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import optuna
import pytest

from bigmodel_ops.classification.inputs import TokenizedSplit
from bigmodel_ops.classification.training import HyperParams
from bigmodel_ops.config import NOT_SEARCHABLE, SEARCHABLE, SearchSpace, parse_params, setting_name
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.tuning.pruning import val_subset
from bigmodel_ops.tuning.study import make_pruner, make_sampler, suggest
from tests.tiny import tiny_params

MIXED = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "freeze_layers": {"type": "int", "low": 0, "high": 2},
    "lora.rank": {"type": "int", "low": 2, "high": 16, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32]},
    "pooling": {"type": "categorical", "choices": ["mean", "cls"]},
}


def _params(space=None, **tune):
    raw = tiny_params(model={"objective": "masked"})
    raw["tune"].update(tune)
    if space is not None:
        raw["tune"]["search_space"] = space
    return parse_params(raw, source="params.yaml")


def test_every_hyperparameter_is_searchable_or_refused_with_a_reason():
    names = {setting_name(f.name) for f in dataclasses.fields(HyperParams)}
    tokenisation = {"max_length", "truncation", "head_tokens"}  # finetune settings, not hyperparameters
    assert names == set(SEARCHABLE) | (set(NOT_SEARCHABLE) - tokenisation)


def test_default_space_and_a_mixed_space():
    default = _params().tune.search_space
    assert default.names() == ["lr", "dropout", "weight_decay", "batch_size"]
    space = _params(MIXED).tune.search_space
    assert space.names() == ["lr", "dropout", "freeze_layers", "lora.rank", "batch_size", "pooling"]


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({}, "tune.search_space is empty"),
        (
            {"learning_rate": {"type": "float", "low": 0.1, "high": 0.2}},
            "tune.search_space.learning_rate: unknown",
        ),
        ({"lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "tune.search_space.lr = "),
        ({"lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "low (0.01) is above high (0.001)"),
        (
            {"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}},
            "a log-scaled range needs low > 0",
        ),
        (
            {"weight_decay": {"type": "float", "low": -0.1, "high": 0.1, "log": True}},
            "tune.search_space.weight_decay",
        ),
        ({"pooling": {"type": "categorical", "choices": []}}, "tune.search_space.pooling = "),
        ({"pooling": {"type": "categorical", "choices": []}}, "needs at least one value in choices"),
        (
            {"pooling": {"type": "categorical", "choices": ["mean", "max"]}},
            'tune.search_space.pooling: "max"',
        ),
        ({"batch_size": {"type": "float", "low": 8, "high": 32}}, "tune.search_space.batch_size: type float"),
        (
            {"batch_size": {"type": "categorical", "choices": [16, "32"]}},
            'tune.search_space.batch_size: "32"',
        ),
        ({"lr": {"type": "int", "low": 1, "high": 2}}, "tune.search_space.lr: type int does not fit lr"),
        (
            {"dropout": {"type": "float", "low": 0.1, "high": 1.5}},
            "tune.search_space.dropout: 1.5 is not a valid",
        ),
        (
            {"freeze_backbone": {"type": "categorical", "choices": [True, "yes"]}},
            "tune.search_space.freeze_backbone",
        ),
        ({"batch_size": {"type": "int", "low": 8.5, "high": 32}}, "must be an integer"),
        (
            {"max_epochs": {"type": "int", "low": 1, "high": 3}},
            "tune.search_space.max_epochs: not searchable",
        ),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "colour": 1}}, "tune.search_space.lr.colour"),
        (
            {"truncation": {"type": "categorical", "choices": ["head", "tail"]}},
            "tune.search_space.truncation: not searchable: texts are tokenised once for all trials",
        ),
    ],
)
def test_bad_search_space_is_refused_naming_the_setting(space, expected):
    with pytest.raises(ConfigError) as info:
        _params(space)
    assert expected in str(info.value)


def test_suggest_overrides_the_base_hyperparameters():
    space = _params(MIXED).tune.search_space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    base = HyperParams(weight_decay=0.05, method="lora")
    hp = suggest(trial, space, base)
    assert hp.lr == trial.params["lr"] and hp.lora_rank == trial.params["lora.rank"]
    assert hp.pooling in ("mean", "cls") and hp.batch_size in (16, 32) and 0 <= hp.freeze_layers <= 2
    assert hp.weight_decay == 0.05 and hp.method == "lora"  # not searched: the base's


def _fake_objective(trial: optuna.Trial) -> float:
    hp = suggest(trial, SearchSpace.model_validate(MIXED))
    return -((np.log10(hp.lr) + 3) ** 2) - hp.dropout + 0.01 * hp.lora_rank + (hp.pooling == "mean")


@pytest.mark.parametrize("kind", ["tpe", "random", "cmaes", "gp"])
def test_samplers_run_and_are_reproducible_with_the_seed(kind):
    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(
            direction="maximize", sampler=make_sampler(kind, seed=seed, n_existing=0, startup_trials=1)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.optimize(_fake_objective, n_trials=3)  # the third is model-based (after 1 random)
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        return [t.params for t in study.trials]

    first = draws(5)
    assert draws(5) == first
    assert draws(6) != first


def test_tpe_is_multivariate_with_a_constant_liar():
    sampler = make_sampler("tpe", seed=0)
    assert sampler._multivariate is True and sampler._constant_liar is True


@pytest.mark.parametrize(
    ("tune", "kind"),
    [
        ({"pruner": "median", "pruner_warmup_steps": 20}, optuna.pruners.MedianPruner),
        ({"pruner": "hyperband", "max_resource": 100}, optuna.pruners.HyperbandPruner),
        ({"pruner": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"pruner": "threshold", "prune_threshold": 0.55}, optuna.pruners.ThresholdPruner),
        ({"pruner": "none"}, optuna.pruners.NopPruner),
    ],
)
def test_pruners(tune, kind):
    params = _params(**tune)
    assert isinstance(make_pruner(params.tune), kind)


def test_pruner_settings_are_checked():
    with pytest.raises(ConfigError, match="pruner 'threshold' needs prune_threshold"):
        _params(pruner="threshold")
    with pytest.raises(ConfigError, match="max_resource"):
        _params(pruner="hyperband", min_resource=50, max_resource=10)
    with pytest.raises(ConfigError, match="tune.sampler"):
        _params(sampler="grid")


def test_val_subset_is_fixed_and_seeded():
    split = TokenizedSplit(ids=[[2, i] for i in range(100)], labels=np.arange(100) % 2)
    a = val_subset(split, fraction=0.25, seed=3)
    assert len(a) == 25 and a.ids == val_subset(split, fraction=0.25, seed=3).ids
    assert a.ids != val_subset(split, fraction=0.25, seed=4).ids
    assert a.ids == sorted(a.ids)  # rows keep their order
    assert val_subset(split, fraction=1.0, seed=3) is split
