"""The pipeline run as the front page: headline metrics, the DAG artifact, `bigmodel-ops compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops import cli
from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.tracking import frontpage
from tests.helpers_tracking import REPO, clear_run_env, make_project, raw_params, tracked_run

HEADLINE = {"prepare": ["rows"], "evaluate": ["test_acc", "missing_metric"]}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    clear_run_env(monkeypatch)
    root = make_project(tmp_path / "repo", raw_params(tmp_path, headline_metrics=HEADLINE))
    monkeypatch.chdir(root)
    return root


def _pipeline(tmp_path: Path, root: Path, *, lr: float, acc: float, prepare: bool = True) -> str:
    """One pipeline version (finetune.lr = ``lr``): its stage runs as DVC would run them; returns
    the parent run id."""
    raw = raw_params(tmp_path, headline_metrics=HEADLINE)
    raw["finetune"]["lr"] = lr
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    if prepare:
        with tracked_run(params, stage="prepare") as run:
            run.log_metrics({"rows": 100.0, "other": 1.0}, step=0)
    with tracked_run(params, stage="evaluate") as run:
        run.log_metrics({"test_acc": acc, "test_f1": 0.1}, step=0)
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run.run_id).data.tags["mlflow.parentRunId"]


def test_headline_metrics_reach_the_parent_and_skipped_stages_contribute_theirs(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    first = _pipeline(tmp_path, project, lr=0.001, acc=0.7)
    assert client.get_run(first).data.metrics == {"prepare.rows": 100.0, "evaluate.test_acc": 0.7}
    # DVC skips prepare in the second version: its parent gets the metrics of the run that did it.
    second = _pipeline(tmp_path, project, lr=0.002, acc=0.8, prepare=False)
    assert second != first
    assert client.get_run(second).data.metrics == {"prepare.rows": 100.0, "evaluate.test_acc": 0.8}


def test_dag_artifact_marks_ran_and_reused_stages(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    client = MlflowClient(mlflow_store)
    _pipeline(tmp_path, project, lr=0.001, acc=0.7)
    second = _pipeline(tmp_path, project, lr=0.002, acc=0.8, prepare=False)
    text = Path(client.download_artifacts(second, "pipeline/dag.mmd", str(tmp_path))).read_text()
    assert 'evaluate["evaluate (ran)"]' in text and 'prepare["prepare (reused)"]' in text
    assert 'tune["tune (not run)"]' in text and "prepare --> tokenize" in text
    png = Path(client.download_artifacts(second, "pipeline/dag.png", str(tmp_path))).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_failed_stage_is_marked_on_the_dag(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    params = parse_params(raw_params(tmp_path, headline_metrics=HEADLINE))
    with pytest.raises(RuntimeError), tracked_run(params, stage="tokenize") as run:
        raise RuntimeError("boom")
    client = MlflowClient(mlflow_store)
    parent = client.get_run(run.run_id).data.tags["mlflow.parentRunId"]
    text = Path(client.download_artifacts(parent, "pipeline/dag.mmd", str(tmp_path))).read_text()
    assert 'tokenize["tokenize (failed)"]:::failed' in text


def test_stage_graph_has_the_edges_of_dvc_dag(tmp_path: Path) -> None:
    root = make_project(tmp_path / "dvcrepo", dvc=True)
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--mermaid"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = dict(line.strip().split('["') for line in shown.splitlines() if '["' in line)
    names = {node: label.rstrip('"]') for node, label in names.items()}
    theirs = {
        (names[a], names[b])
        for a, b in (line.strip().split("-->") for line in shown.splitlines() if "-->" in line)
    }
    stages, ours = frontpage.stage_graph(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert ours == theirs and len(ours) > 5
    assert set(stages) == set(names.values())


def test_compare_names_the_differing_param_and_both_metrics(
    tmp_path: Path, project: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _pipeline(tmp_path, project, lr=0.001, acc=0.7)
    second = _pipeline(tmp_path, project, lr=0.002, acc=0.8, prepare=False)
    assert cli.main(["compare"]) == 0  # --last 2
    out = capsys.readouterr().out
    assert "A: pipeline-" in out and first in out and second in out
    differ = out.split("params that differ (1):")[1].split("headline metrics")[0]
    assert "finetune.lr" in differ and "0.001" in differ and "0.002" in differ
    assert "evaluate.test_acc  0.7  0.8  +0.1" in out
    assert "prepare.rows       100  100  +0" in out
    runs = json.dumps([first, second])
    assert f"http://127.0.0.1:5000/#/compare-runs?runs={urllib.parse.quote(runs)}" in out
    pipeline_id = MlflowClient(mlflow_store).get_run(first).data.tags["bigmodel_ops.pipeline_id"]
    assert cli.main(["compare", pipeline_id, second]) == 0
    assert "params that differ (1)" in capsys.readouterr().out


def test_compare_refuses_unknown_runs_and_missing_pipelines(
    tmp_path: Path, project: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _pipeline(tmp_path, project, lr=0.001, acc=0.7)
    assert cli.main(["compare"]) == 2
    assert "compare needs two pipeline runs; the experiment has 1" in capsys.readouterr().err
    assert cli.main(["compare", "nope", "nada"]) == 2
    assert "no pipeline or run 'nope'" in capsys.readouterr().err
    assert cli.main(["compare", "--last", "1"]) == 2
    assert "compare --last must be at least 2, got 1" in capsys.readouterr().err


def test_headline_metrics_name_known_stages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tracking.headline_metrics: unknown stage\(s\) \['evaluation'\]"):
        parse_params(raw_params(tmp_path, headline_metrics={"evaluation": ["test_acc"]}))
