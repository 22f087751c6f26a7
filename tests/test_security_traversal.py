"""Path traversal from data, the file system and the registry: rejected or neutralised, nothing
written outside the project.

- labels from the data (and params) shaped as ``../`` paths, absolute paths and URL-encoded
  traversal become plain metric names (no ``/``), and the prepare stage writes only inside the
  project;
- an output folder planted as a symlink out of the project is replaced by a real folder, the
  place it pointed to is left untouched;
- a registered model whose stored artifact holds a symlink out of its folder is refused when
  loaded (nothing outside is read).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.errors import CheckpointError
from tests.faults import run_stage_process
from tests.helpers_evaluate import MODEL_NAME
from tests.helpers_serving import CHAMPION_URI, make_registered_model
from tests.test_prepare import labeled_rows, params_dict, review, write_csv

pytestmark = pytest.mark.fault

_TRAVERSING = ["../../escaped", "/tmp/absolute-label", "%2e%2e%2fencoded", "..\\\\windows"]


def _files_outside(tmp_path: Path, project: Path) -> set[Path]:
    store = tmp_path / "mlflow-store"
    return {
        p
        for p in tmp_path.rglob("*")
        if not p.is_relative_to(project) and not p.is_relative_to(store) and p.is_file()
    }


def test_traversing_labels_become_plain_metric_names_and_nothing_is_written_outside(
    tmp_path: Path, mlflow_store: str
):
    project = tmp_path / "work" / "project"
    project.mkdir(parents=True)
    rows = [(review(i, i % 2 == 0), _TRAVERSING[i % len(_TRAVERSING)]) for i in range(160)]
    write_csv(project / "reviews.csv", rows)
    raw = params_dict(source={"kind": "csv", "path": "reviews.csv"}, labels=list(_TRAVERSING))
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = _files_outside(tmp_path, project)
    result = run_stage_process(project, "prepare")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files_outside(tmp_path, project) == before
    assert not Path("/tmp/absolute-label").exists() and not (tmp_path / "escaped").exists()
    client = MlflowClient(mlflow_store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'prepare'")
    label_metrics = [k for k in run.data.metrics if k.startswith("data.labels.train.")]
    assert len(label_metrics) == len(_TRAVERSING), run.data.metrics
    assert all("/" not in k and "\\" not in k and "%" not in k for k in label_metrics), label_metrics
    assert "data.labels.train..._.._escaped" in label_metrics


def test_an_output_folder_planted_as_a_symlink_out_of_the_project_is_replaced_not_followed(
    tmp_path: Path, mlflow_store: str
):
    project, outside = tmp_path / "project", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not yours")
    (project / "outputs").mkdir(parents=True)
    (project / "outputs" / "prepared").symlink_to(outside, target_is_directory=True)
    write_csv(project / "reviews.csv", labeled_rows(100))
    raw = params_dict(source={"kind": "csv", "path": "reviews.csv"})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_stage_process(project, "prepare")
    assert result.returncode == 0, result.stderr[-3000:]
    prepared = project / "outputs" / "prepared"
    assert prepared.is_dir() and not prepared.is_symlink()
    assert (prepared / "train.parquet").is_file()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "not yours"


def test_a_registered_artifact_linking_out_of_its_folder_is_refused(
    tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "served").mkdir()
    registered = make_registered_model(tmp_path / "served", _migrated_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    source = MlflowClient(registered.uri).get_model_version_by_alias(MODEL_NAME, "champion").source
    local = Path(mlflow.artifacts.download_artifacts(source, tracking_uri=registered.uri))
    (tokenizer,) = local.rglob("tokenizer.json")
    secret = tmp_path / "secret" / "tokenizer.json"  # a valid file elsewhere: only the link is wrong
    secret.parent.mkdir()
    secret.write_bytes(tokenizer.read_bytes())
    tokenizer.unlink()
    tokenizer.symlink_to(secret)
    mlflow.set_tracking_uri(registered.uri)
    try:
        with pytest.raises(
            CheckpointError, match=r"tokenizer.json: a link that leads out of the classifier folder"
        ):
            mlflow.pyfunc.load_model(CHAMPION_URI)
    finally:
        mlflow.set_tracking_uri(None)
