"""The compress stage: int8 (torch) and ONNX (onnxruntime) variants of a tiny untrained classifier
(tests/helpers_evaluate.py), checked against it, measured, logged and tagged on its registered version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from bigmodel_ops import cli, compression, onnx_export
from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.inputs import read_labeled_split
from bigmodel_ops.cli import main as cli_main
from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.pipeline.compress import run as run_compress
from tests.helpers_evaluate import EXPERIMENT, MODEL_NAME, make_evaluate_project
from tests.helpers_finetune import tiny_params

FAST = {"latency_repeats": 3, "latency_warmup": 1}
REQUIRED_KEYS = (
    "int8_speedup",
    "int8_acc_drop_points",
    "int8_size_ratio",
    "int8_agreement",
    "onnx_speedup",
    "onnx_acc_drop_points",
    "onnx_int8_speedup",
    "onnx_int8_acc_drop_points",
    "fp32_size_mb",
    "int8_size_mb",
    "onnx_size_mb",
    "onnx_int8_size_mb",
)


def _project(root: Path, **compress):
    """A project after evaluate: classifier, test split, version 1 registered from the finetune run,
    outputs/metrics/evaluate.json naming it; params with ``compress`` overrides."""
    _, paths, _, run_id = make_evaluate_project(root)
    client = MlflowClient()
    client.create_registered_model(MODEL_NAME)
    client.create_model_version(MODEL_NAME, source=f"runs:/{run_id}/classifier", run_id=run_id)
    paths.evaluate_report.parent.mkdir(parents=True, exist_ok=True)
    paths.evaluate_report.write_text(json.dumps({"test_acc": 0.5, "model_version": 1}))
    raw = tiny_params()
    raw["evaluate"].pop("min_accuracy", None)
    raw["compress"] = {**FAST, **compress}
    return parse_params(raw), paths, client


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "outputs").rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_stage_writes_checked_variants_logs_them_and_tags_the_version(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, paths, client = _project(tmp_path)
    report = run_compress(params, paths=paths, quiet=True)

    out = paths.compress_dir
    for name in ("model.int8.safetensors", "config.json", "tokenizer.json", "model.onnx", "model.int8.onnx"):
        assert (out / name).is_file(), name
    metrics = json.loads(paths.compress_report.read_text())
    assert metrics == pytest.approx(report)
    for key in REQUIRED_KEYS:
        assert np.isfinite(metrics[key]), key
    assert metrics["model_version"] == 1
    assert metrics["onnx_check_max_abs_diff"] <= params.compress.tolerance
    assert metrics["onnx_acc_drop_points"] == 0.0 and metrics["onnx_agreement"] == 100.0
    assert metrics["int8_agreement"] >= 75.0  # int8 noise flips only near-ties of an untrained head
    assert metrics["int8_size_ratio"] < 1.0 and metrics["onnx_int8_size_ratio"] < metrics["onnx_size_ratio"]
    detail = json.loads((out / "report.json").read_text())
    assert detail["metrics"] == pytest.approx({k: v for k, v in report.items() if k != "model_version"})
    assert detail["settings"]["exporter"] == "dynamo"

    # the published ONNX model computes torch's logits; the int8 file holds int8 weights, not pickle
    classifier = load_classifier(paths.classifier)
    texts, _ = read_labeled_split(paths.prepared / "test.parquet", classifier.labels)
    idx, lengths = compression.make_batch(compression.encode(classifier, texts))
    want = compression.torch_runner(classifier.model)(idx, lengths)
    got = onnx_export.onnx_runner(out / "model.onnx")(idx, lengths)
    assert np.abs(got - want).max() < 1e-4
    with safe_open(str(out / "model.int8.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys() if k.endswith(".weight_int8")}
    assert dtypes == {torch.int8}
    int8 = compression.load_int8(out)
    agree = (compression.torch_runner(int8.model)(idx, lengths).argmax(1) == want.argmax(1)).mean()
    assert agree * 100 == pytest.approx(metrics["int8_agreement"])

    # MLflow: the compress run and the tags on the registered version
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'compress'")
    assert run.data.metrics["int8_speedup"] == pytest.approx(metrics["int8_speedup"])
    assert run.data.tags["model_version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "compress")}
    assert {"compress/model.onnx", "compress/model.int8.onnx", "compress/report.json"} <= artifacts
    assert "metrics/compress.json" in {a.path for a in client.list_artifacts(run.info.run_id, "metrics")}
    tags = client.get_model_version(MODEL_NAME, "1").tags
    assert tags["compress_run_id"] == run.info.run_id
    assert float(tags["compress.int8_acc_drop_points"]) == pytest.approx(
        metrics["int8_acc_drop_points"], abs=1e-4
    )
    assert float(tags["compress.onnx_speedup"]) == pytest.approx(metrics["onnx_speedup"], rel=1e-4)
    assert _leftovers(tmp_path) == []


def test_onnx_disagreement_is_a_clear_error_and_publishes_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, paths, client = _project(tmp_path, exporter="torchscript")
    export = onnx_export.export_onnx

    def export_a_different_model(model, path, **kwargs):
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias += 0.01  # an exporter bug that shifts every logit
        return export(other, path, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export_a_different_model)
    with pytest.raises(CheckpointError, match=r"model\.onnx: the ONNX export disagrees .* tolerance 0.001"):
        run_compress(params, paths=paths, quiet=True)
    assert not paths.compress_dir.exists() and not paths.compress_report.exists()
    assert _leftovers(tmp_path) == []
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'compress'") == []
    assert "compress_run_id" not in client.get_model_version(MODEL_NAME, "1").tags


def test_cli_exit_2_on_a_stale_evaluate_report(tmp_path: Path, monkeypatch, capsys):
    """The version named by evaluate.json must come from the classifier compressed here."""
    monkeypatch.chdir(tmp_path)
    params, paths, client = _project(tmp_path, exporter="torchscript", onnx_int8=False)
    client.create_model_version(MODEL_NAME, source=str(paths.classifier))
    paths.evaluate_report.write_text(json.dumps({"model_version": 2}))
    raw = params.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
    assert cli_main(["compress", "--quiet", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "version 2 comes from run None" in capsys.readouterr().err
    assert not paths.compress_dir.exists() and not paths.compress_report.exists()
    assert "compress" in cli._stages()


def test_int8_round_trip_is_exact_and_budget_flags(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, paths, _, _ = make_evaluate_project(tmp_path)
    config = json.loads((paths.classifier / "config.json").read_text())
    config.update(max_length=6, truncation="tail")  # the int8 variant cuts long texts as its source does
    (paths.classifier / "config.json").write_text(json.dumps(config))
    classifier = load_classifier(paths.classifier)
    quantized = compression.quantize_int8(classifier.model)
    out = tmp_path / "int8"
    out.mkdir()
    compression.save_int8(quantized, out, classifier_dir=paths.classifier)
    loaded = compression.load_int8(out)
    texts = ["a wonderful film", "boring and dull", ""]
    idx, lengths = compression.make_batch(compression.encode(classifier, texts))
    want = compression.torch_runner(quantized)(idx, lengths)
    assert np.array_equal(compression.torch_runner(loaded.model)(idx, lengths), want)
    assert loaded.labels == classifier.labels
    long = "boring boring dull plot and a wonderful film"
    assert loaded.truncation == classifier.truncation and loaded.truncation.keep == "tail"
    assert compression.encode(loaded, [long]) == compression.encode(classifier, [long])
    assert (
        compression.encode(loaded, [long])[0][-3:]
        == compression.encode(classifier, ["wonderful film"])[0][-3:]
    )
    assert loaded.logits(texts).numpy() == pytest.approx(want, abs=1e-6)  # the TextClassifier path
    names = set(compression.quantizable_linears(classifier.model))
    assert "backbone.lm_head" not in names and "head" in names
    # a corrupted int8 file is a CheckpointError naming it
    (out / "model.int8.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.int8.safetensors"):
        compression.load_int8(out)


def test_disabled_stage_writes_a_marker_only(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_params()
    raw["evaluate"].pop("min_accuracy", None)
    raw["compress"] = {"enabled": False}
    from bigmodel_ops.paths import ProjectPaths

    paths = ProjectPaths(root=tmp_path)
    assert run_compress(parse_params(raw), paths=paths, quiet=True) == {"enabled": 0}
    assert json.loads((paths.compress_dir / "report.json").read_text()) == {"enabled": False}
    assert json.loads(paths.compress_report.read_text()) == {"enabled": 0}


def test_params_refuse_an_old_opset_with_dynamo():
    raw = tiny_params()
    raw["evaluate"].pop("min_accuracy", None)
    raw["compress"] = {"exporter": "dynamo", "onnx_opset": 17}
    from bigmodel_ops.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="onnx_opset must be >= 18"):
        parse_params(raw)
    raw["compress"] = {"exporter": "torchscript", "onnx_opset": 17}
    assert parse_params(raw).compress.onnx_opset == 17


def test_huggingface_flag_exports_the_classifier_beside_the_variants(tmp_path: Path, monkeypatch):
    """compress.huggingface: the pipeline's switch for `bigmodel-ops export-hf`: the classifier in
    outputs/compress/hf loads with transformers and gives our logits; logged with the stage's files."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    params, paths, client = _project(tmp_path, exporter="torchscript", onnx_int8=False, huggingface=True)
    run_compress(params, paths=paths, quiet=True)

    folder = paths.compress_dir / "hf" / "classifier"
    exported = json.loads((paths.compress_dir / "hf" / "export.json").read_text())
    assert exported["classifier"]["folder"].endswith("classifier")
    assert ("backbone" in exported) == paths.pretrained_model.is_dir()
    ours = load_classifier(paths.classifier)
    texts = ["a wonderful film", "boring and dull, a tedious story"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=True
    ).eval()
    with torch.no_grad():
        theirs = hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert theirs.numpy() == pytest.approx(ours.logits(texts).numpy(), abs=1e-4)
    run = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.mlflow.runName = 'compress'"
    )[0]
    assert "compress/hf" in {a.path for a in client.list_artifacts(run.info.run_id, "compress")}
    assert _leftovers(tmp_path) == []


def test_huggingface_flag_without_transformers_fails_before_any_compute(tmp_path: Path, monkeypatch):
    import sys

    monkeypatch.chdir(tmp_path)
    params, paths, _ = _project(tmp_path, huggingface=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    from bigmodel_ops.errors import BigModelOpsError

    with pytest.raises(
        BigModelOpsError, match=r"compress.huggingface: true needs .* pip install transformers"
    ):
        run_compress(params, paths=paths, quiet=True)
    assert not paths.compress_dir.exists() and not paths.compress_report.exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_of_mean_max_pooling_matches_torch(tmp_path: Path, exporter: str):
    """The max over real tokens exports (padding masked out, dynamic batch and length)."""
    from bigmodel_ops.classification.model import SequenceClassifier
    from bigmodel_ops.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, objective="masked")
    model = SequenceClassifier(TransformerLM(config), num_labels=2, dropout=0.0, pooling="mean_max").eval()
    idx = torch.randint(5, 64, (3, 12))
    lengths = torch.tensor([12, 7, 3])
    path = onnx_export.export_onnx(
        model, tmp_path / "model.onnx", example=(idx, lengths), opset=18, exporter=exporter
    )
    run = onnx_export.onnx_runner(path)
    longer, more = torch.randint(5, 64, (5, 16)), torch.tensor([16, 9, 4, 1, 13])  # other shapes
    for batch in ((idx, lengths), (longer, more)):
        with torch.no_grad():
            want = model(*batch).numpy()
        np.testing.assert_allclose(run(*batch), want, atol=1e-4)
