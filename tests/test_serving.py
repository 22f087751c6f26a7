"""Serving a registered classifier: the pyfunc's output (label, score, prob_<label>), refused
inputs, `bigmodel-ops predict`, a real `mlflow models serve`, the served model's imports, and the
version's model card. One registered model (tests/helpers_serving.py) serves the whole module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bigmodel_ops.cli import main
from bigmodel_ops.serve_client import invoke, round_trip_latency, scoring_server
from tests.helpers_evaluate import MODEL_NAME
from tests.helpers_finetune import LABELS, make_texts
from tests.helpers_serving import CHAMPION_URI, Registered, make_registered_model

PROBS = [f"prob_{label}" for label in LABELS]
TEXTS = [t for t, _ in make_texts(6, seed=9)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Registered:
    return make_registered_model(tmp_path_factory.mktemp("served"), _migrated_store)


@pytest.fixture
def store(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> Registered:
    """This test uses the module's store and project (not its own empty store)."""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.chdir(registered.root)
    from bigmodel_ops.serving import fluent_tracking_uri

    with fluent_tracking_uri(registered.uri):  # put back exactly as it was afterwards
        yield registered


def _check_rows(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == ["label", "score", *PROBS]
    total = frame[PROBS].sum(axis=1)
    assert total.tolist() == pytest.approx([1.0] * len(frame), abs=1e-6)
    argmax = frame[PROBS].to_numpy().argmax(axis=1)
    assert frame["label"].tolist() == [LABELS[i] for i in argmax]
    assert frame["score"].tolist() == pytest.approx(frame[PROBS].max(axis=1).tolist())


def test_pyfunc_gives_every_probability_and_refuses_empty_text(store: Registered):
    import mlflow

    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    out = model.predict(pd.DataFrame({"text": TEXTS + ["x " * 500]}))
    _check_rows(out)
    assert len(out) == len(TEXTS) + 1
    # the signature and the input example say so
    assert model.metadata.get_input_schema().input_names() == ["text"]
    outputs = model.metadata.get_output_schema()
    assert outputs.input_names() == ["label", "score", *PROBS]
    assert [str(t) for t in outputs.input_types()] == ["DataType.string"] + ["DataType.double"] * 3
    from mlflow.artifacts import download_artifacts

    example = model.metadata.load_input_example(download_artifacts(CHAMPION_URI))
    assert list(example.columns) == ["text"] and all(t.strip() for t in example["text"])
    for bad, message in [
        ("", "row 1: 'text' is empty or whitespace only"),
        ("  \t\n", "row 1: 'text' is empty or whitespace only"),
        (None, "row 1: 'text' is missing"),
    ]:
        with pytest.raises(MlflowException, match=message) as raised:
            model.predict(pd.DataFrame({"text": ["fine text", bad]}))
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    empty = model.predict(pd.DataFrame({"text": pd.Series([], dtype=object)}))
    assert list(empty.columns) == ["label", "score", *PROBS] and len(empty) == 0


def test_predict_cli(store: Registered, tmp_path: Path, capsys):
    params = ["--params", str(store.params_file), "--quiet"]
    assert main(["predict", *params, TEXTS[0], TEXTS[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] in LABELS and f"| {TEXTS[0]}" in lines[0]
    assert all(f"{label}=" in lines[0] for label in LABELS)

    file = tmp_path / "reviews.txt"
    file.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", *params, "--file", str(file), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in records] == TEXTS
    for r in records:
        assert sorted(r["probabilities"]) == sorted(LABELS)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["score"] == pytest.approx(max(r["probabilities"].values()))


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "bigmodel-ops predict: error: text argument 1 is empty or whitespace only"),
        (["ok", ""], "bigmodel-ops predict: error: text argument 2 is empty or whitespace only"),
        (["--file", "{file}"], "reviews.txt: line 2 is empty or whitespace only"),
        ([], "no text to classify"),
        (
            ["--model", "models:/no-such-model@champion", "fine"],
            "cannot load model 'models:/no-such-model@champion'",
        ),
        (
            ["--model", "runs:/0123456789abcdef/classifier", "fine"],
            "cannot load model 'runs:/0123456789abcdef",
        ),
    ],
)
def test_predict_cli_bad_input(store: Registered, tmp_path: Path, capsys, args, message):
    file = tmp_path / "reviews.txt"
    file.write_text("good film\n \nbad film\n")
    args = [a.replace("{file}", str(file)) for a in args]
    assert main(["predict", "--params", str(store.params_file), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_served_model_imports_no_training_libraries(store: Registered):
    """A fresh process loads the registered model and predicts without importing lightning, peft
    or optuna. pydantic is not asserted: MLflow itself imports it (checked here too)."""
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({CHAMPION_URI!r})\n"
        "m.predict(pd.DataFrame({'text': ['a great film']}))\n"
        "names = ['lightning', 'pytorch_lightning', 'peft', 'optuna', 'pydantic', 'sklearn']\n"
        "print(json.dumps({n: n in sys.modules for n in names}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    print("modules imported by the served model:", imported)
    assert not imported["lightning"] and not imported["pytorch_lightning"]
    assert not imported["peft"] and not imported["optuna"]
    assert not imported["sklearn"]


def test_model_card_is_the_version_description_and_an_artifact(store: Registered):
    client = MlflowClient(store.uri)
    version = client.get_model_version(MODEL_NAME, str(store.report["model_version"]))
    card = (store.paths.evaluate_dir / "model_card.md").read_text()
    assert version.description == card
    evaluate_run = version.tags["evaluate_run_id"]
    artifacts = {a.path for a in client.list_artifacts(evaluate_run, "evaluate")}
    assert "evaluate/model_card.md" in artifacts
    for needle in (
        f"# Model card: {MODEL_NAME} v{version.version}",
        "## Gate decision",
        "**Promoted to champion.** passed:",
        "`test_acc`",
        "baseline (TF-IDF + logistic regression)",
        "`test_f1`",
        "## Data",
        f"Data version: `{version.tags['data_version']}`",
        "## Training recipe",
        "Best tuned params (trial 1, val 0.7500): `lr`=0.003, `batch_size`=16",
        "run `pretrain-run-0`",
        "## Intended use and limits",
        "tokens (head kept)",
        "tokens are truncated: only their beginning is read.",
        f"finetune `{store.finetune_run_id}`",
        f"evaluate `{evaluate_run}`",
    ):
        assert needle in card, needle
    row = next(line for line in card.splitlines() if "(`test_acc`)" in line)
    report = store.report
    assert f"{report['test_acc']:.4f}" in row and f"{report['baseline_test_acc']:.4f}" in row
    assert f"{report['test_acc_minus_baseline']:.4f}" in row
    # no store location, artifact location or other tracking setting
    assert store.uri not in card and "sqlite" not in card and "mlartifacts" not in card


@pytest.mark.slow
def test_mlflow_models_serve(store: Registered):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    good = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
    with scoring_server(CHAMPION_URI, env=env) as url:
        status, body = invoke(url, good)
        assert status == 200, body
        frame = pd.DataFrame(body["predictions"])
        _check_rows(frame[["label", "score", *PROBS]])
        assert len(frame) == len(TEXTS)
        status, body = invoke(url, {"dataframe_records": [{"text": "a great film"}]})
        assert status == 200 and body["predictions"][0]["label"] in LABELS

        malformed = {
            "no text column": ({"dataframe_split": {"columns": ["review"], "data": [["good"]]}}, "text"),
            "wrong type": ({"dataframe_split": {"columns": ["text"], "data": [[3]]}}, "text"),
            "empty text": (
                {"dataframe_split": {"columns": ["text"], "data": [["good"], [""]]}},
                "row 1: 'text' is empty or whitespace only",
            ),
            "whitespace text": (
                {"dataframe_records": [{"text": "   "}]},
                "row 0: 'text' is empty or whitespace only",
            ),
            "not json": ("{not json", "Invalid input"),
        }
        for case, (payload, message) in malformed.items():
            status, body = invoke(url, payload)
            text = json.dumps(body) if not isinstance(body, str) else body
            print(f"{case}: {status} {text[:300]}")
            assert 400 <= status < 500, (case, status, body)
            assert message in text, (case, body)
        # the server is still up and still right
        status, body = invoke(url, good)
        assert status == 200 and len(body["predictions"]) == len(TEXTS)
        latency = {
            **round_trip_latency(url, TEXTS, batch_size=1, repeats=10),
            **round_trip_latency(url, TEXTS, batch_size=32, repeats=10),
        }
        print("serve round-trip latency (ms):", json.dumps({k: round(v, 2) for k, v in latency.items()}))


def test_predict_from_an_exported_classifier_folder_needs_no_tracking_store(
    store: Registered, tmp_path: Path, capsys
):
    """`--model outputs/finetune/model`: the folder `dvc pull` brings, read without MLflow's store,
    answers as the registered champion does; a folder with bad weights is refused naming the file."""
    champion = main(["predict", "--params", str(store.params_file), "--json", *TEXTS])
    assert champion == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    folder = str(store.paths.classifier)
    assert main(["predict", "--params", str(store.params_file), "--json", "--model", folder, *TEXTS]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    broken = tmp_path / "broken"
    shutil.copytree(store.paths.classifier, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert main(["predict", "--params", str(store.params_file), "--model", str(broken), "x"]) != 0
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config,words",
    [
        ({"max_length": 256}, "only their beginning is read"),
        ({"max_length": 256, "truncation": "tail"}, "only their end is read"),
        (
            {"max_length": 256, "truncation": "head_tail", "head_tokens": 64},
            "their first 64 and last 192 tokens are read, the middle is not",
        ),
    ],
)
def test_model_card_says_which_part_of_a_long_text_is_read(config: dict, words: str):
    from bigmodel_ops.evaluation.card import _read_part

    assert _read_part(config) == words
