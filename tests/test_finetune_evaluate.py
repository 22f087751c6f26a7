"""finetune + evaluate end to end on fabricated inputs: export, servable pyfunc, registry gate, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.cli import main
from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.pipeline.evaluate import run as run_evaluate
from bigmodel_ops.pipeline.finetune import run as run_finetune
from bigmodel_ops.tracking.registry import Gate, apply_gate, register_run_model
from tests.helpers_finetune import LABELS, make_project, make_texts, tiny_params, write_split


def _run(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("ft-test")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) >= 1, name
    return runs[0]  # newest first


def _gate(client: MlflowClient, *, version: int, value: float) -> tuple[bool, str]:
    gate = Gate(metric="acc", min=0.5)
    return apply_gate(client, name="g", version=version, gate=gate, metrics={"acc": value})


def test_finetune_evaluate_register_and_gate(tmp_path: Path, monkeypatch, mlflow_store: str):
    import mlflow

    monkeypatch.chdir(tmp_path)
    fast_evaluate = {"gate": {"max": {}}, "latency_repeats": 2, "latency_warmup": 0}
    params, paths, _ = make_project(
        tmp_path, n_train=48, n_eval=16, finetune={"use_tuned": True}, evaluate=fast_evaluate
    )
    # the tune stage's output, fabricated: finetune must take these values over params.finetune
    paths.tune_dir.mkdir(parents=True)
    tuned = {"lr": 0.004, "dropout": 0.05, "weight_decay": 0.02, "batch_size": 8, "value": 0.9, "trial": 3}
    paths.best_params.write_text(yaml.safe_dump(tuned))

    report = run_finetune(params, paths=paths, quiet=True)

    assert sorted(p.name for p in paths.classifier.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    config = json.loads((paths.classifier / "config.json").read_text())
    assert config["labels"] == LABELS and config["num_labels"] == 2 and config["pooling"] == "cls"
    assert config["max_length"] == 24  # min(finetune.max_length, block_size 32)
    assert not [p for p in paths.classifier.parent.iterdir() if p.name.startswith(".")]  # no staging left
    client = MlflowClient(mlflow_store)
    ft_run = _run(client, "finetune")
    assert config["mlflow_run_id"] == ft_run.info.run_id
    assert ft_run.data.params["hparams.lr"] == "0.004" and ft_run.data.params["hparams.batch_size"] == "8"
    assert ft_run.data.params["hparams_source"] == "tuned"
    # report == what MLflow holds; val metrics per epoch at the global step, with an epoch metric
    assert json.loads(paths.finetune_report.read_text()) == report
    val_acc = client.get_metric_history(ft_run.info.run_id, "val_acc")
    epochs = client.get_metric_history(ft_run.info.run_id, "epoch")
    assert len(val_acc) == 2 and [m.value for m in epochs][-2:] == [0.0, 1.0]
    assert val_acc[-1].step == report["global_step"] == 2 * 6  # 48 texts / batch 8, 2 epochs
    # the report (and the export) is the best epoch's, by val_acc (the first of equals)
    best = max(range(len(val_acc)), key=lambda i: (val_acc[i].value, -i))
    assert report["best_epoch"] == best and val_acc[best].value == report["val_acc"]
    assert ft_run.data.metrics["best_val_loss"] == report["val_loss"]
    assert ft_run.data.metrics["best_val_acc"] == report["val_acc"]
    assert client.get_metric_history(ft_run.info.run_id, "train_loss")

    # the servable model: loads through MLflow (models from code + safetensors) and predicts
    # (empty texts are refused by the served model: tests/test_serving.py)
    texts = [t for t, _ in make_texts(5, seed=9)] + ["x " * 500]
    served = mlflow.pyfunc.load_model(f"runs:/{ft_run.info.run_id}/classifier")
    out = served.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["label", "score", *(f"prob_{label}" for label in LABELS)]
    assert len(out) == len(texts)
    # what the exported weights give, computed here without MLflow: top label and its probability
    probs = torch.softmax(load_classifier(paths.classifier).logits(texts), dim=-1)
    assert out["label"].tolist() == [LABELS[i] for i in probs.argmax(dim=-1).tolist()]
    assert out["score"].tolist() == pytest.approx(probs.max(dim=-1).values.tolist(), abs=1e-5)
    assert served.metadata.get_input_schema().input_names() == ["text"]

    # evaluate, gate passes (min_accuracy 0, the old name of gate.min): version 1 becomes champion
    report1 = run_evaluate(params, paths=paths, quiet=True)
    name = "ft-test-classifier"
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1" and report1["promoted"] == 1 and report1["model_version"] == 1
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"  # every new version
    assert champion.run_id == ft_run.info.run_id
    assert float(champion.tags["test_acc"]) == report1["test_acc"]
    ev_run = _run(client, "evaluate")
    for key in (
        "test_acc",
        "test_f1",
        "test_log_loss",
        "test_ece",
        "test_precision_positive",
        "test_recall_negative",
        "baseline_test_acc",
        "test_acc_minus_baseline",
        "latency_b1_median_ms",
        "model_size_mb",
        "promoted",
    ):
        assert ev_run.data.metrics[key] == pytest.approx(report1[key]), key
    assert report1["test_acc_minus_baseline"] == pytest.approx(
        report1["test_acc"] - report1["baseline_test_acc"]
    )
    assert champion.tags["finetune_run_id"] == ft_run.info.run_id
    assert json.loads(paths.evaluate_report.read_text()) == report1
    predictions = pq.read_table(paths.evaluate_dir / "predictions.parquet").to_pandas()
    assert list(predictions.columns) == ["text", "label", "pred", "score", "prob_negative", "prob_positive"]
    assert len(predictions) == 16
    assert (predictions["label"] == predictions["pred"]).mean() == pytest.approx(report1["test_acc"])
    matrix = json.loads((paths.evaluate_dir / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 16
    assert (paths.evaluate_dir / "confusion_matrix.png").stat().st_size > 1000
    artifacts = {a.path for a in client.list_artifacts(ev_run.info.run_id, "evaluate")}
    assert "evaluate/confusion_matrix.png" in artifacts

    # gate fails (min_accuracy 1.0 cannot be reached unless perfect): version 2 is challenger
    strict = parse_params(
        {**tiny_params(evaluate={**fast_evaluate, "min_accuracy": 1.0}), "model": {"objective": "masked"}}
    )
    report2 = run_evaluate(strict, paths=paths, quiet=True)
    assert report1["test_acc"] < 1.0, "the fixture assumes an imperfect tiny model"
    assert report2["promoted"] == 0 and report2["model_version"] == 2
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    version2 = client.get_model_version(name, "2")
    assert version2.tags["promoted"] == "false" and "< min 1" in version2.tags["promotion_reason"]
    assert json.loads((paths.evaluate_dir / "promotion.json").read_text())["alias"] == "challenger"


def test_promotion_gate_compares_with_the_current_champion(tmp_path: Path, mlflow_store: str):
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("gate", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(tmp_path / "m"), "model")  # a plain folder, no pyfunc
    client.set_terminated(run.info.run_id)
    versions = [
        register_run_model(client, run_id=run.info.run_id, artifact_path="model", name="g", tags={"acc": acc})
        for acc in (0.8, 0.7, 0.9, 0.9)
    ]
    assert [str(v.version) for v in versions] == ["1", "2", "3", "4"]
    assert versions[0].source.endswith("/model")
    assert _gate(client, version=1, value=0.8)[0]
    promoted, reason = _gate(client, version=2, value=0.7)
    assert not promoted and reason.startswith("failed: acc 0.7000 < champion v1 0.8000")
    assert str(client.get_model_version_by_alias("g", "challenger").version) == "2"
    assert _gate(client, version=3, value=0.9)[0]
    assert _gate(client, version=4, value=0.9)[0]  # a tie promotes
    assert str(client.get_model_version_by_alias("g", "champion").version) == "4"
    with pytest.raises(CheckpointError, match="run 0123abc not found in the tracking store"):
        register_run_model(client, run_id="0123abc", artifact_path="model", name="g")
    with pytest.raises(CheckpointError, match="no model or artifacts at 'nothing'"):
        register_run_model(client, run_id=run.info.run_id, artifact_path="nothing", name="g")


def _no_outputs(paths) -> None:
    assert not paths.classifier.exists()
    assert not paths.finetune_report.exists()
    finetune_dir = paths.classifier.parent
    assert not finetune_dir.exists() or not any(finetune_dir.iterdir())


@pytest.mark.parametrize("case", ["missing_model", "label_mismatch", "tuned_missing"])
def test_finetune_bad_inputs(tmp_path: Path, monkeypatch, capsys, case: str):
    monkeypatch.chdir(tmp_path)
    use_tuned = case == "tuned_missing"
    _, paths, params_file = make_project(tmp_path, n_train=8, n_eval=4, finetune={"use_tuned": use_tuned})
    if case == "missing_model":
        shutil.rmtree(paths.pretrained_model)
        expected = "outputs/pretrain/model: pretrained model not found"
    elif case == "label_mismatch":
        write_split(
            paths.prepared / "val.parquet",
            [("meh", "neutral"), ("good", "positive")],
            labels=LABELS + ["neutral"],
        )
        expected = "outputs/prepared/val.parquet: row 0: label 'neutral' is not in prepare.labels"
    else:
        expected = "outputs/tune/best_params.yaml: not found, but finetune.use_tuned is true"
    assert main(["finetune", "--params", str(params_file), "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    _no_outputs(paths)


def test_evaluate_without_classifier(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, paths, params_file = make_project(tmp_path, n_train=8, n_eval=4)
    assert main(["evaluate", "--params", str(params_file), "--quiet"]) == 2
    assert "outputs/finetune/model: classifier not found" in capsys.readouterr().err
    assert not paths.evaluate_dir.exists() and not paths.evaluate_report.exists()
