"""The secrets scrubber: credentials never reach the tracking store (database or artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.tracking.scrub import MASK, Scrubber, is_secret_key, mask_uris
from tests.helpers_tracking import clear_run_env, make_project, raw_params, tracked_run

PASSWORD = "Pl4nted-db-Passw0rd"
TOKEN = "ghp_Pl4ntedT0kenValue"
ENV_SECRET = "Pl4nted-env-Secret"


def store_hits(store_files: list[Path], secrets: list[str]) -> dict[str, list[str]]:
    """{secret: [files holding it]} over every file given (database bytes and artifact files)."""
    hits: dict[str, list[str]] = {}
    for path in store_files:
        data = path.read_bytes()
        for secret in secrets:
            if secret.encode() in data:
                hits.setdefault(secret, []).append(str(path))
    return hits


def test_uri_credentials_and_secret_keys_are_masked() -> None:
    assert mask_uris("postgresql://user:pass@host:5432/db") == f"postgresql://user:{MASK}@host:5432/db"
    assert mask_uris("https://token@host/x") == f"https://{MASK}@host/x"
    assert mask_uris("http://127.0.0.1:5000/#/x") == "http://127.0.0.1:5000/#/x"  # nothing to mask
    assert mask_uris("s3://b/k?X-Amz-Security-Token=abc&x=1") == f"s3://b/k?X-Amz-Security-Token={MASK}&x=1"
    secret = ["db_password", "a.b.hf_token", "client_secret", "aws_access_key", "x.API_KEY", "apikey"]
    plain = ["special_tokens", "max_tokens", "tokenizer.vocab_size", "key", "sort_keys", "monkey"]
    plain += ["resolved.flops_per_token"]  # a unit, logged as a number (it was masked)
    assert all(is_secret_key(k) for k in secret) and not any(is_secret_key(k) for k in plain)


def test_known_secret_values_are_masked_anywhere_in_text() -> None:
    scrubber = Scrubber(
        {
            "tracking": {"uri": f"postgresql://alice:{PASSWORD}@db/x"},
            "hub": {"hf_token": TOKEN},
            "flag": "true",
        },
        environ={"MY_SECRET": ENV_SECRET, "HOME": "/root"},
    )
    text = scrubber.text(f"copied {PASSWORD} and {TOKEN} and {ENV_SECRET}; true stays")
    assert text == f"copied {MASK} and {MASK} and {MASK}; true stays"
    assert scrubber.value("hub.hf_token", TOKEN) == MASK and scrubber.value("n", 3) == 3


def test_nothing_secret_reaches_the_store(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_run_env(monkeypatch)
    monkeypatch.setenv("BIGMODEL_OPS_TEST_SECRET", ENV_SECRET)
    raw = raw_params(tmp_path, uri=f"postgresql://alice:{PASSWORD}@db.invalid:5432/mlflow")
    root = make_project(tmp_path / "repo", raw)
    monkeypatch.chdir(root)
    params = parse_params(raw)
    report = tmp_path / "report"
    report.mkdir()
    (report / "conf.json").write_text(
        json.dumps({"storage": f"https://{TOKEN}@hub.invalid/x", "env": ENV_SECRET})
    )
    (report / "weights.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ConnectionError), tracked_run(params, stage="tune") as run:
        run.log_params({"extra": {"db_password": PASSWORD, "hub_token": TOKEN, "lr": 0.1}})
        run.set_tags({"source": f"https://{TOKEN}@hub.invalid/x", "note": f"env {ENV_SECRET}"})
        run.log_dict({"uri": params.tracking.uri}, "report/params.json")
        run.log_text(f"card: {TOKEN}", "card/model_card.md")
        run.log_artifact(report / "conf.json", "files")
        run.log_artifacts(report, "folder")
        run.log_input(name="data", source=f"https://{TOKEN}@hub.invalid/data", digest="0" * 32)
        with run.child_run("trial-0", tags={"api_key": TOKEN}) as child:
            child.log_params({"storage": f"postgresql://alice:{PASSWORD}@db.invalid/optuna"})
        assert TOKEN not in run.scrub(f"model card naming {TOKEN}")
        raise ConnectionError(f"could not reach postgresql://alice:{PASSWORD}@db.invalid:5432/mlflow")

    client = MlflowClient(mlflow_store)
    parent = client.get_run(client.get_run(run.run_id).data.tags["mlflow.parentRunId"])
    # What was logged is there, masked: the test looks where the secrets would be.
    assert parent.data.params["tracking.uri"] == f"postgresql://alice:{MASK}@db.invalid:5432/mlflow"
    data = client.get_run(run.run_id).data
    assert data.params["extra.db_password"] == MASK and data.params["extra.lr"] == "0.1"
    assert data.tags["source"] == f"https://{MASK}@hub.invalid/x" and data.tags["note"] == f"env {MASK}"
    assert (
        PASSWORD not in data.tags["bigmodel_ops.error"]
        and "could not reach" in data.tags["bigmodel_ops.error"]
    )
    artifacts = sorted(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
    names = {p.name for p in artifacts}
    assert {"params.json", "model_card.md", "conf.json", "weights.bin", "traceback.txt"} <= names
    store = sorted(Path(mlflow_store.removeprefix("sqlite:///")).parent.glob("mlflow.db*"))
    assert store_hits(store + artifacts, [PASSWORD, TOKEN, ENV_SECRET]) == {}
    assert PASSWORD in (report / "conf.json").read_text() or TOKEN in (report / "conf.json").read_text()
