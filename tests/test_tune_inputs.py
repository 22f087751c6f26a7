"""Bad input to `bigmodel-ops tune`: one error naming the setting, before any trial runs.

Each case runs the real command on a real tiny project and then checks that no trial exists (so
none can be left RUNNING). The search-space checks of the schema are in tests/test_tune_space.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from bigmodel_ops.cli import main
from bigmodel_ops.config import parse_params
from bigmodel_ops.pipeline._tuning import storage_for
from bigmodel_ops.pipeline.tune import direction_of, name_of_study
from tests.helpers_finetune import make_project, make_texts, write_split


def _no_trials(paths) -> None:
    journal = paths.tune_journal
    if journal.exists():
        for summary in optuna.get_all_study_summaries(
            optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        ):
            assert summary.n_trials == 0
    assert not paths.best_params.exists() and not paths.tune_report.exists()


def _tune(params_file: Path, capsys, *extra: str) -> str:
    assert main(["tune", "--params", str(params_file), "--quiet", *extra]) == 2
    return capsys.readouterr().err


def test_study_that_exists_with_another_direction(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8)
    assert direction_of(params) == "maximize"
    optuna.create_study(
        storage=storage_for(params, paths), study_name=name_of_study(params, paths), direction="minimize"
    )
    err = _tune(params_file, capsys)
    assert "tune.metric = 'val_acc'" in err and "already exists" in err and "is minimized" in err
    _no_trials(paths)


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("sqlite:////nonexistent-dir/sub/study.db", "OperationalError"),
        ("not a url", "ArgumentError"),
        ("postgresql://127.0.0.1:1/optuna", "Error"),  # a password in it is masked: test_tune_postgres.py
    ],
)
def test_unreachable_storage_names_the_setting(tmp_path: Path, monkeypatch, capsys, url: str, detail: str):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8, tune={"storage": url})
    err = _tune(params_file, capsys)
    assert f"tune.storage = {url!r}: cannot open the Optuna storage" in err and detail in err
    # the same through --storage, which names the option instead
    raw = yaml.safe_load(params_file.read_text())
    raw["tune"]["storage"] = None
    params_file.write_text(yaml.safe_dump(raw))
    err = _tune(params_file, capsys, "--storage", url)
    assert f"--storage = {url!r}: cannot open the Optuna storage" in err
    _no_trials(paths)


def test_backbone_vocabulary_that_differs_from_the_tokenizer(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8)
    config_file = paths.pretrained_model / "config.json"
    payload = json.loads(config_file.read_text())
    tokens = payload["config"]["vocab_size"]
    payload["config"]["vocab_size"] = tokens + 64
    config_file.write_text(json.dumps(payload))
    err = _tune(params_file, capsys)
    assert f"tokenizer.json: vocabulary of {tokens} tokens" in err
    assert f"config.json has vocab_size {tokens + 64}" in err
    _no_trials(paths)


def test_class_missing_from_the_training_split(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8)
    negatives = [row for row in make_texts(16, seed=1) if row[1] == "negative"]
    write_split(paths.prepared / "train.parquet", negatives)
    err = _tune(params_file, capsys)
    assert "train.parquet: no training row has label 'positive' of prepare.labels" in err
    _no_trials(paths)


@pytest.mark.parametrize(
    "overrides",
    [
        {"finetune": {"method": "lora", "lora": {"target_modules": ["attn.nothing"]}}},
        {
            "finetune": {"method": "full", "lora": {"target_modules": ["attn.nothing"]}},
            "tune": {"search_space": {"method": {"type": "categorical", "choices": ["full", "lora"]}}},
        },
    ],
    ids=["base-lora", "lora-in-space"],
)
def test_lora_targets_that_match_nothing(tmp_path: Path, monkeypatch, capsys, overrides: dict):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8, **overrides)
    err = _tune(params_file, capsys)
    assert "finetune.lora.target_modules" in err and "'attn.nothing' matches no Linear layer" in err
    _no_trials(paths)


def test_empty_search_space_is_refused_before_any_work(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=16, n_eval=8)
    raw = yaml.safe_load(params_file.read_text())
    raw["tune"]["search_space"] = {}
    params_file.write_text(yaml.safe_dump(raw))
    err = _tune(params_file, capsys)
    assert "tune.search_space is empty" in err
    assert not paths.tune_dir.exists()


def test_grace_period_must_exceed_the_heartbeat_interval():
    from bigmodel_ops.errors import ConfigError
    from tests.tiny import tiny_params

    with pytest.raises(ConfigError, match=r"grace_period_s \(5\) must be above heartbeat_interval_s \(5\)"):
        parse_params(tiny_params(tune={"heartbeat_interval_s": 5, "grace_period_s": 5}))
