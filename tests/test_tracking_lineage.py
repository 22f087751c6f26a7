"""Lineage tags: the run context provider plugin, in real git + DVC repositories."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops import __version__
from bigmodel_ops.config import parse_params
from bigmodel_ops.tracking import lineage
from tests.helpers_tracking import GIT, clear_run_env, make_params, make_project, raw_params, tracked_run


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_run_env(monkeypatch)


MINI_DVC = {
    "stages": {
        "make": {
            "cmd": "python make.py",
            "deps": ["make.py"],
            "params": ["project"],
            "outs": ["out/data.txt"],
        },
        "use": {
            "cmd": "python use.py",
            "deps": ["use.py", "out/data.txt"],
            "params": ["tracking", "prepare.split"],
            "outs": ["out/run_id.txt"],
        },
    }
}


def _mini_repo(root: Path, store_uri: str) -> Path:
    make_project(root, dvc=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(MINI_DVC))
    (root / "make.py").write_text(
        "import os\nos.makedirs('out', exist_ok=True)\nopen('out/data.txt', 'w').write('v1')\n"
    )
    # A user's own script: plain mlflow.start_run(), no bigmodel_ops import.
    (root / "use.py").write_text(
        textwrap.dedent(
            """
            import mlflow
            with mlflow.start_run() as run:
                mlflow.log_metric("x", 1.0)
            open("out/run_id.txt", "w").write(run.info.run_id)
            """
        )
    )
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "stages"], cwd=root, check=True)
    return root


@pytest.mark.slow
def test_user_script_under_dvc_repro_gets_lineage_tags(tmp_path: Path, mlflow_store: str) -> None:
    root = _mini_repo(tmp_path / "repo", mlflow_store)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    run_id = (root / "out" / "run_id.txt").read_text()
    tags = MlflowClient(mlflow_store).get_run(run_id).data.tags
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    data_md5 = lock["stages"]["make"]["outs"][0]["md5"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    params = yaml.safe_load((root / "params.yaml").read_text())

    assert tags["bigmodel_ops.stage"] == "use"  # from DVC_STAGE
    assert tags["bigmodel_ops.dep.out/data.txt"] == data_md5  # the producing stage's output md5
    assert tags["bigmodel_ops.git_commit"] == head
    assert tags["bigmodel_ops.git_dirty"] == "false"
    assert tags["bigmodel_ops.params_hash"] == lineage.params_hash(params, ["tracking", "prepare.split"])
    assert tags["bigmodel_ops.params_hash_all"] == lineage.params_hash(params, None)
    assert tags["bigmodel_ops.version"] == __version__
    assert tags["bigmodel_ops.host"]
    assert len(tags["bigmodel_ops.pipeline_id"]) == 12


def test_stage_params_hash_tracks_only_the_stage_sections(tmp_path: Path) -> None:
    params = {
        "project": {"name": "a"},
        "tracking": {"uri": "x"},
        "prepare": {"split": {"train": 0.8}, "x": 1},
    }
    keys = lineage.stage_param_keys(MINI_DVC, "use")
    before = lineage.params_hash(params, keys)
    params["project"]["name"] = "b"  # not a param of 'use'
    params["prepare"]["x"] = 2  # prepare.x is not listed either, only prepare.split
    assert lineage.params_hash(params, keys) == before
    params["prepare"]["split"]["train"] = 0.7
    assert lineage.params_hash(params, keys) != before


def test_runs_are_tagged_with_the_params_they_ran_with_not_the_file_on_disk(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `bigmodel-ops <stage> --params other.yaml`: the stage runs with params that differ from
    # <root>/params.yaml; lineage must describe what ran.
    root = make_project(tmp_path / "repo")
    monkeypatch.chdir(root)
    on_disk = yaml.safe_load((root / "params.yaml").read_text())
    other = raw_params(tmp_path)
    other["prepare"]["split"].update(train=0.7, val=0.2)
    client = MlflowClient(mlflow_store)
    tags = {}
    for name, raw in (("disk", on_disk), ("other", other)):
        params = parse_params(raw)
        with tracked_run(params, stage="prepare", run_name=f"prepare-{name}") as run:
            pass
        tags[name] = client.get_run(run.run_id).data.tags
        given = params.model_dump(mode="json")
        assert tags[name]["bigmodel_ops.params_hash_all"] == lineage.params_hash(given, None)
        keys = lineage.stage_param_keys(yaml.safe_load((root / "dvc.yaml").read_text()), "prepare")
        assert tags[name]["bigmodel_ops.params_hash"] == lineage.params_hash(given, keys)
    assert tags["other"]["bigmodel_ops.params_hash_all"] != tags["disk"]["bigmodel_ops.params_hash_all"]
    assert tags["other"]["bigmodel_ops.params_hash"] != tags["disk"]["bigmodel_ops.params_hash"]
    assert tags["other"]["bigmodel_ops.pipeline_id"] != tags["disk"]["bigmodel_ops.pipeline_id"]
    # ...so each belongs to its own pipeline parent run, which logs the params that ran.
    parents = [client.get_run(t["mlflow.parentRunId"]) for t in (tags["disk"], tags["other"])]
    assert parents[0].info.run_id != parents[1].info.run_id
    assert [p.data.params["prepare.split.train"] for p in parents] == ["0.8", "0.7"]


def test_dirty_worktree_changes_the_pipeline_id(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_project(tmp_path / "repo")
    monkeypatch.chdir(root)
    # Files older than the index, refreshed: git status has nothing to rewrite, HEAD and the index
    # stay as they are, and only asking git again can see the edit below.
    for path in root.rglob("*"):
        if ".git" not in path.parts:
            os.utime(path, (time.time() - 100, time.time() - 100))
    subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=root, check=True)
    clean = lineage.lineage_tags(stage="prepare")
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "\n# edit\n")
    dirty = lineage.lineage_tags(stage="prepare")
    assert clean["bigmodel_ops.git_dirty"] == "false" and dirty["bigmodel_ops.git_dirty"] == "true"
    assert clean["bigmodel_ops.pipeline_id"] != dirty["bigmodel_ops.pipeline_id"]


def test_corrupt_dvc_lock_warns_and_the_run_still_starts(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_project(tmp_path / "repo")
    (root / "dvc.lock").write_text("stages: [this is: not: valid yaml\n")
    monkeypatch.chdir(root)
    params = make_params(tmp_path)
    with pytest.warns(lineage.LineageWarning, match="dvc.lock"):
        with tracked_run(params, stage="prepare") as run:
            run.log_metrics({"m": 1.0}, step=0)
    info = MlflowClient(mlflow_store).get_run(run.run_id)
    assert info.info.status == "FINISHED"
    # Tags computed before the failure are kept; the failure itself is recorded.
    assert info.data.tags["bigmodel_ops.git_commit"] != "none"
    assert "dvc.lock" in info.data.tags["bigmodel_ops.lineage_error"]

    # The same through the plugin in a plain mlflow.start_run() of a DVC stage: warning, run starts.
    monkeypatch.setenv("DVC_STAGE", "prepare")
    mlflow.set_tracking_uri(mlflow_store)
    with pytest.warns(lineage.LineageWarning):
        with mlflow.start_run() as plain:
            pass
    assert MlflowClient(mlflow_store).get_run(plain.info.run_id).info.status == "FINISHED"


def test_outside_a_project_the_provider_adds_nothing(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert lineage.LineageContextProvider().in_context() is False
    mlflow.set_tracking_uri(mlflow_store)
    with mlflow.start_run() as run:
        pass
    tags = MlflowClient(mlflow_store).get_run(run.info.run_id).data.tags
    assert not [k for k in tags if k.startswith("bigmodel_ops.")]


def test_provider_is_registered_through_the_entry_point() -> None:
    from mlflow.tracking.context.registry import _run_context_provider_registry

    assert any(isinstance(p, lineage.LineageContextProvider) for p in _run_context_provider_registry)


def test_tag_keys_are_valid_mlflow_names() -> None:
    from mlflow.utils.validation import _validate_tag_name

    for path in ("data/raw file(1).csv", "/abs/path", "../up/x", "a\\b"):
        key = "bigmodel_ops.dep." + lineage.tag_key(path)
        _validate_tag_name(key)
    assert lineage.tag_key("a\\b") == "a_b"  # a backslash is not a path separator in a tag key
    assert lineage.tag_key("../up/x") == "up/x" and lineage.tag_key("/abs/path") == "abs/path"


def test_fluent_tracking_uri_puts_back_the_global_uri_and_the_environment(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking._tracking_service import utils

    from bigmodel_ops.serving import fluent_tracking_uri

    # A store made global earlier in the process (set_tracking_uri also writes the variable),
    # then the environment pointed at another one: both come back as they were.
    earlier, inner = f"sqlite:///{tmp_path / 'earlier.db'}", f"sqlite:///{tmp_path / 'inner.db'}"
    mlflow.set_tracking_uri(earlier)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    with fluent_tracking_uri(inner):
        assert mlflow.get_tracking_uri() == inner
    assert mlflow.get_tracking_uri() == earlier
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_store

    # Unset stays unset.
    utils._tracking_uri = None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with fluent_tracking_uri(inner):
        assert os.environ["MLFLOW_TRACKING_URI"] == inner
    assert utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
