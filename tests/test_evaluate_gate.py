"""Registry and promotion of the evaluate stage: the declared gate, version lineage, bad inputs.

The classifier is untrained (tests/helpers_evaluate.py), so every run scores the same: the gate's
outcome depends only on the gate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.classification.export import load_classifier, save_classifier
from bigmodel_ops.classification.inputs import read_labeled_split
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.cli import main
from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.model import TransformerLM, read_exported_config
from bigmodel_ops.pipeline.evaluate import _check_gate_metrics
from bigmodel_ops.pipeline.evaluate import run as run_evaluate
from tests.conftest import REPO_ROOT
from tests.helpers_evaluate import MODEL_NAME, evaluate_params, make_evaluate_project, write_pretrain_report
from tests.helpers_finetune import LABELS, tiny_params, write_split


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _fake_dvc_lock(root: Path) -> dict[str, str]:
    """dvc.yaml (the repo's) and a dvc.lock in which prepare and finetune completed."""
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    md5 = {"outputs/prepared": "a" * 32 + ".dir", "outputs/finetune/model": "b" * 32 + ".dir"}
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {"cmd": "x", "outs": [{"path": "outputs/prepared", "md5": md5["outputs/prepared"]}]},
            "finetune": {
                "cmd": "x",
                "outs": [{"path": "outputs/finetune/model", "md5": md5["outputs/finetune/model"]}],
            },
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return md5


def test_gate_pass_then_fail_with_reasons_and_lineage(tmp_path: Path, monkeypatch, mlflow_store: str):
    monkeypatch.chdir(tmp_path)
    params, paths, _, finetune_run = make_evaluate_project(tmp_path, gate={"min": 0.0, "max": {}})
    write_pretrain_report(paths, "pretrain-run-0001")
    md5 = _fake_dvc_lock(tmp_path)
    client = MlflowClient(mlflow_store)

    # 1. passes: challenger and champion, the reason on the version
    report = run_evaluate(params, paths=paths, quiet=True)
    assert report["promoted"] == 1 and report["model_version"] == 1
    assert _aliases(client, MODEL_NAME) == {"champion": "1", "challenger": "1"}
    v1 = client.get_model_version(MODEL_NAME, "1")
    assert v1.tags["promoted"] == "true"
    assert (
        v1.tags["promotion_reason"].startswith("passed: test_acc")
        and "no current champion" in v1.tags["promotion_reason"]
    )
    assert "**Promoted to champion.** passed:" in v1.description  # the model card holds the decision
    assert json.loads(v1.tags["gate"])["metric"] == "test_acc"
    # lineage: the runs, the data version, labels, code version, metrics
    assert json.loads(v1.tags["labels"]) == LABELS
    assert v1.tags["finetune_run_id"] == finetune_run == v1.run_id
    assert v1.tags["pretrain_run_id"] == "pretrain-run-0001"
    assert v1.tags["tune_run_id"] == "unknown"  # no tune run anywhere in this store
    evaluate_run = client.get_run(v1.tags["evaluate_run_id"])
    assert evaluate_run.info.run_name == "evaluate"
    assert v1.tags["pipeline_id"] == evaluate_run.data.tags["bigmodel_ops.pipeline_id"] != "unknown"
    assert v1.tags["git_commit"] == evaluate_run.data.tags["bigmodel_ops.git_commit"]  # "none": no git here
    assert {k: v for k, v in v1.tags.items() if k.startswith("data.")} == {
        f"data.{p}": h for p, h in md5.items()
    }
    assert len(v1.tags["data_version"]) == 12
    assert float(v1.tags["test_acc"]) == report["test_acc"]
    assert float(v1.tags["baseline_test_acc"]) == report["baseline_test_acc"]
    # the MLflow run holds the same files the stage wrote
    artifacts = {
        a.path
        for folder in ("plots", "evaluate", "metrics")
        for a in client.list_artifacts(evaluate_run.info.run_id, folder)
    }
    for name in (
        "plots/roc.json",
        "plots/confusion.json",
        "evaluate/roc.png",
        "evaluate/reliability.png",
        "evaluate/worst_errors.csv",
        "evaluate/promotion.json",
        "metrics/evaluate.json",
    ):
        assert name in artifacts, name
    assert evaluate_run.data.metrics["test_acc_minus_baseline"] == pytest.approx(
        report["test_acc_minus_baseline"]
    )

    # 2. the same scores with a margin over the champion fail: challenger only
    margin, _ = evaluate_params(tmp_path, gate={"min": 0.0, "min_margin_over_champion": 0.05, "max": {}})
    report = run_evaluate(margin, paths=paths, quiet=True)
    assert report["promoted"] == 0 and report["model_version"] == 2
    assert _aliases(client, MODEL_NAME) == {"champion": "1", "challenger": "2"}
    v2 = client.get_model_version(MODEL_NAME, "2")
    assert v2.tags["promoted"] == "false"
    assert "< champion v1" in v2.tags["promotion_reason"] and "+ margin 0.05" in v2.tags["promotion_reason"]
    assert "**Kept as challenger.** failed:" in v2.description
    promotion = json.loads((paths.evaluate_dir / "promotion.json").read_text())
    assert promotion["alias"] == "challenger" and promotion["reason"] == v2.tags["promotion_reason"]

    # 3. a ceiling fails even above the floor; every failed check is named
    ceiling, _ = evaluate_params(tmp_path, gate={"min": 1.0, "max": {"test_ece": 0.0}})
    run_evaluate(ceiling, paths=paths, quiet=True)
    reason = client.get_model_version(MODEL_NAME, "3").tags["promotion_reason"]
    assert (
        reason.startswith("failed: test_acc")
        and "< min 1" in reason
        and "test_ece" in reason
        and "> max 0" in reason
    )
    assert _aliases(client, MODEL_NAME) == {"champion": "1", "challenger": "3"}


def _nothing_registered(client: MlflowClient, paths) -> None:
    assert client.search_registered_models() == []
    assert not paths.evaluate_dir.exists() and not paths.evaluate_report.exists()
    assert not paths.roc_curve.exists()


@pytest.mark.parametrize(
    ("gate", "expected"),
    [
        ({"metric": "test_accuracy"}, "evaluate.gate.metric 'test_accuracy' is not a computed metric"),
        (
            {"metric": "test_log_loss"},
            "evaluate.gate.metric 'test_log_loss' is not a computed metric where higher",
        ),
        (
            {"max": {"calibration": 0.1}},
            "evaluate.gate.max names 'calibration', which the evaluate stage does not compute",
        ),
        (
            {"metric": "test_recall_neutral"},
            "evaluate.gate.metric 'test_recall_neutral' is not a computed metric",
        ),
    ],
)
def test_gate_on_a_metric_not_computed_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch, capsys, mlflow_store: str, gate: dict, expected: str
):
    monkeypatch.chdir(tmp_path)
    _, paths, _, _ = make_evaluate_project(tmp_path)
    raw = tiny_params()
    raw["evaluate"].pop("min_accuracy")
    raw["evaluate"]["gate"] = gate
    with pytest.raises(ConfigError, match=expected):
        parse_params(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--params", "params.yaml", "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    _nothing_registered(MlflowClient(mlflow_store), paths)


def test_the_stage_checks_gate_names_against_what_it_computed():
    params = parse_params(tiny_params())
    with pytest.raises(
        ConfigError,
        match=r"evaluate.gate names metric\(s\) \['test_acc'\] that the evaluate stage does not compute",
    ):
        _check_gate_metrics(params, {"test_f1": 0.5, "test_ece": 0.1})


def test_old_min_accuracy_is_gate_min():
    raw = tiny_params()
    raw["evaluate"]["min_accuracy"] = 0.42
    assert parse_params(raw).evaluate.gate.min == 0.42
    raw["evaluate"]["gate"] = {"metric": "test_f1"}
    with pytest.raises(ConfigError, match="min_accuracy is the old name of gate.min"):
        parse_params(raw)


def test_unseen_label_in_the_test_split(tmp_path: Path, monkeypatch, capsys, mlflow_store: str):
    monkeypatch.chdir(tmp_path)
    _, paths, _, _ = make_evaluate_project(tmp_path)
    write_split(
        paths.prepared / "test.parquet",
        [("fine film", "positive"), ("meh", "neutral")],
        labels=LABELS + ["neutral"],
    )
    assert main(["evaluate", "--params", "params.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "outputs/prepared/test.parquet: row 1: label 'neutral' is not in prepare.labels ['negative', 'positive']"
        in err
    )
    _nothing_registered(MlflowClient(mlflow_store), paths)


def test_registry_name_taken_by_a_model_of_other_labels(
    tmp_path: Path, monkeypatch, capsys, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    _, paths, _, finetune_run = make_evaluate_project(tmp_path)
    client = MlflowClient(mlflow_store)
    client.create_registered_model(MODEL_NAME)
    client.create_model_version(
        MODEL_NAME,
        source=f"runs:/{finetune_run}/classifier",
        run_id=finetune_run,
        tags={"labels": '["bad", "good", "neutral"]'},
    )
    assert main(["evaluate", "--params", "params.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        f"registered model '{MODEL_NAME}' already holds a classifier of other labels (version 1: "
        "['bad', 'good', 'neutral']; this one: ['negative', 'positive']); set evaluate.registered_model"
        in err
    )
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")] == ["1"]
    assert client.get_registered_model(MODEL_NAME).aliases == {}
    assert not paths.evaluate_dir.exists() and not paths.evaluate_report.exists()

    # another name from params works, and is tagged with its labels
    params, _ = evaluate_params(tmp_path, registered_model="reviews-sentiment", gate={"min": 0.0, "max": {}})
    report = run_evaluate(params, paths=paths, quiet=True)
    version = client.get_model_version("reviews-sentiment", str(report["model_version"]))
    assert json.loads(version.tags["labels"]) == LABELS
    assert _aliases(client, "reviews-sentiment") == {"champion": "1", "challenger": "1"}


def test_the_from_scratch_control_is_scored_beside_the_model(tmp_path: Path, monkeypatch, mlflow_store: str):
    """finetune.control: scratch leaves a control classifier; evaluate reports its test accuracy
    and ours minus it. Here the control is a differently seeded untrained model."""
    monkeypatch.chdir(tmp_path)
    params, paths, _, _ = make_evaluate_project(tmp_path, gate={"min": 0.0, "max": {}})
    write_pretrain_report(paths, "pretrain-run-0001")
    config, _ = read_exported_config(paths.pretrained_model)
    torch.manual_seed(7)
    control = SequenceClassifier(TransformerLM(config), num_labels=len(params.prepare.labels))
    save_classifier(
        control,
        paths.control_classifier,
        labels=params.prepare.labels,
        max_length=24,
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
    )
    (paths.control_classifier / "control.json").write_text('{"trained": true}')
    report = run_evaluate(params, paths=paths, quiet=True)
    texts, ids = read_labeled_split(paths.prepared / "test.parquet", params.prepare.labels)
    predicted = load_classifier(paths.control_classifier).logits(texts).argmax(-1).numpy()
    assert report["control_test_acc"] == pytest.approx(float((predicted == ids).mean()))
    assert report["test_acc_minus_control"] == pytest.approx(report["test_acc"] - report["control_test_acc"])


def test_no_control_no_control_metrics(tmp_path: Path, monkeypatch, mlflow_store: str):
    monkeypatch.chdir(tmp_path)
    params, paths, _, _ = make_evaluate_project(tmp_path, gate={"min": 0.0, "max": {}})
    write_pretrain_report(paths, "pretrain-run-0001")
    paths.control_classifier.mkdir(parents=True)
    (paths.control_classifier / "control.json").write_text('{"trained": false}')
    report = run_evaluate(params, paths=paths, quiet=True)
    assert "control_test_acc" not in report and "test_acc_minus_control" not in report
