"""The front page of two real pipelines (`dvc repro` twice on the tiny config, a real sqlite store).

The second pipeline differs in one param (``evaluate.gate.min``): DVC re-runs evaluate and
compress only. ``tracking.uri`` holds a planted database password all along (MLFLOW_TRACKING_URI
points at the real store), which must not reach the store.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking import frontpage
from tests.dvc_project import STAGES, Project
from tests.helpers_tracking import free_port, start_server, stop_server
from tests.test_secrets import store_hits
from tests.test_ui import CHROMIUM, _chromium, _visible_text

pytestmark = pytest.mark.slow

PASSWORD = "Pl4nted-pipeline-Passw0rd"
EXPERIMENT = "bigmodel-ops-demo"
LOGGED = [stage for stage in STAGES if stage != "compress"]  # compress is disabled: no MLflow run


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict:
    def edit(params: dict) -> None:
        params["compress"]["enabled"] = False
        params["evaluate"].pop("min_accuracy")  # the old name would override gate.min, the param we change
        params["evaluate"]["gate"]["min"] = 0.0
        params["tracking"]["uri"] = f"postgresql://alice:{PASSWORD}@db.invalid:5432/mlflow"

    project = Project.create(tmp_path_factory.mktemp("frontpage"), edit=edit)
    root, env = project.root, project.env
    assert project.repro() == set(STAGES)
    first_lock = yaml.safe_load((root / "dvc.lock").read_text())
    project.commit("first pipeline")
    project.set_param("evaluate.gate.min", 0.05)
    assert project.repro() == {"evaluate", "compress"}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`bigmodel_ops.role` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )
    assert len(parents) == 2, [p.info.run_name for p in parents]
    return {
        "project": project,
        "client": client,
        "experiment": experiment,
        "parents": parents,
        "lock": first_lock,
    }


def _md5(lock: dict, stage: str, path: str) -> str:
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def test_skipped_stages_contribute_the_headline_metrics_of_the_pipeline_that_ran_them(
    pipelines: dict,
) -> None:
    first, second = pipelines["parents"]
    ran_first = {k: v for k, v in first.data.metrics.items() if not k.startswith(("evaluate.", "compress."))}
    assert {
        "prepare.data.rows.train",
        "pretrain.val/loss",
        "tune.best_value",
        "finetune.best_val_acc",
    } <= set(ran_first)
    assert {k: v for k, v in second.data.metrics.items() if k in ran_first} == ran_first
    assert "evaluate.test_acc" in first.data.metrics and "evaluate.test_acc" in second.data.metrics
    client = pipelines["client"]
    evaluate = client.get_run(second.data.tags["bigmodel_ops.stage_run.evaluate"])
    assert second.data.metrics["evaluate.test_acc"] == evaluate.data.metrics["test_acc"]
    assert second.data.tags["bigmodel_ops.stage_from.pretrain"] == first.data.tags["bigmodel_ops.pipeline_id"]


def test_parents_record_the_datasets_with_their_dvc_lock_md5(pipelines: dict) -> None:
    lock = pipelines["lock"]
    expected = {
        ("prepared", _md5(lock, "prepare", "outputs/prepared")),
        ("shards", _md5(lock, "tokenize", "outputs/shards")),
    }
    for parent in pipelines["parents"]:
        inputs = pipelines["client"].get_run(parent.info.run_id).inputs.dataset_inputs
        assert {(i.dataset.name, i.dataset.digest) for i in inputs} == expected


def test_the_dag_marks_the_reused_stages(pipelines: dict, tmp_path: Path) -> None:
    first, second = pipelines["parents"]
    client = pipelines["client"]
    text = Path(client.download_artifacts(second.info.run_id, "pipeline/dag.mmd", str(tmp_path))).read_text()
    for stage in LOGGED:
        mark = "ran" if stage == "evaluate" else "reused"
        assert f'{stage}["{stage} ({mark})"]' in text, text
    assert 'compress["compress (not run)"]' in text  # disabled: it logs no run
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    text = Path(client.download_artifacts(first.info.run_id, "pipeline/dag.mmd", str(first_dir))).read_text()
    assert all(f'{stage}["{stage} (ran)"]' in text for stage in LOGGED), text
    assert "pretrain --> tune" in text
    names = {f.path for f in client.list_artifacts(second.info.run_id, "pipeline")}
    assert names == {"pipeline/dag.mmd", "pipeline/dag.png"}


def test_compare_names_the_changed_param_and_both_metrics(pipelines: dict) -> None:
    out = pipelines["project"].run(sys.executable, "-m", "bigmodel_ops.cli", "compare").stdout
    (pipelines["project"].root / "compare.txt").write_text(out)
    first, second = pipelines["parents"]
    differ = out.split("params that differ (1):")[1].split("headline metrics")[0]
    before = re.escape(first.data.params["evaluate.gate.min"])
    assert re.search(rf"evaluate\.gate\.min\s+{before}\s+0\.05", differ), out
    acc = re.search(r"evaluate\.test_acc\s+(\S+)\s+(\S+)", out)
    assert acc is not None, out
    assert float(acc[1]) == pytest.approx(first.data.metrics["evaluate.test_acc"], rel=1e-5)
    assert float(acc[2]) == pytest.approx(second.data.metrics["evaluate.test_acc"], rel=1e-5)
    assert f"compare-runs?runs=%5B%22{first.info.run_id}%22%2C%20%22{second.info.run_id}%22%5D" in out


def test_no_planted_secret_reaches_the_store(pipelines: dict) -> None:
    root = pipelines["project"].root
    first, _ = pipelines["parents"]
    assert first.data.params["tracking.uri"] == "postgresql://alice:***@db.invalid:5432/mlflow"
    files = sorted(p for p in [*root.glob("mlflow.db*"), *(root / "mlartifacts").rglob("*")] if p.is_file())
    assert len(files) > 50  # the store really holds the pipeline's artifacts
    assert store_hits(files, [PASSWORD]) == {}
    assert PASSWORD in (root / "params.yaml").read_text()  # it was there to leak


def test_no_stage_run_is_left_running(pipelines: dict) -> None:
    client = pipelines["client"]
    runs = client.search_runs([pipelines["experiment"].experiment_id], max_results=500)
    assert runs and all(run.info.status == "FINISHED" for run in runs)
    stage_runs = [r for r in runs if "bigmodel_ops.pid" in r.data.tags]
    assert {r.info.run_name for r in stage_runs} == set(LOGGED)
    assert all(
        "bigmodel_ops.heartbeat" in r.data.tags and "bigmodel_ops.host" in r.data.tags for r in stage_runs
    )


@pytest.fixture(scope="module")
def server(pipelines: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = pipelines["project"].root
    port = free_port()
    process = start_server(
        port, root / "mlflow.db", root / "mlartifacts", tmp_path_factory.mktemp("srv") / "log"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_runs_page_shows_the_pipeline_outcome_and_its_datasets(
    pipelines: dict, server: str, tmp_path: Path
) -> None:
    experiment_id = pipelines["experiment"].experiment_id
    shot = tmp_path / "runs.png"
    url = frontpage.table_url(server, experiment_id)  # the URL `bigmodel-ops compare` prints
    page = _chromium(
        [f"--screenshot={shot}", "--window-size=1800,1000", "--dump-dom", url], tmp_path / "profile"
    )
    assert page.returncode == 0, page.stderr[-2000:]
    text = _visible_text(page.stdout)
    (pipelines["project"].root / "runs-page.txt").write_text(text)
    if keep := os.environ.get("BIGMODEL_OPS_FRONTPAGE_SCREENSHOT"):
        shutil.copy(shot, keep)
    second = pipelines["client"].get_run(pipelines["parents"][1].info.run_id)
    assert "Training runs" in text and second.info.run_name in text
    header = text.split(second.info.run_name)[0]  # the column headers come before the rows
    assert "evaluate.test_acc" in header and "Dataset" in header, header[-800:]
    assert str(second.data.metrics["evaluate.test_acc"]) in text, text[:3000]
    for dataset in second.inputs.dataset_inputs:
        assert f"{dataset.dataset.name} ({dataset.dataset.digest})" in text, text[:3000]
