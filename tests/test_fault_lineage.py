"""Issue #13, scenario 7: the lineage plugin raising inside MLflow.

The plugin is the real ``mlflow.run_context_provider`` entry point, loaded by MLflow's own
registry; runs go to a real sqlite store. The fault is injected in-process (a part of the plugin
made to raise), never through environment variables read by production code. In every case the
run completes (FINISHED, its metric stored) and the failure is recorded: a
``bigmodel_ops.lineage_error`` tag on the run, or at least a logged warning.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking import lineage
from tests.helpers_tracking import clear_run_env, make_params, make_project, tracked_run

pytestmark = pytest.mark.fault

ERROR_TAG = lineage.PREFIX + "lineage_error"


class InjectedLineageFault(RuntimeError):
    pass


def _boom(*_args: object, **_kwargs: object) -> None:
    raise InjectedLineageFault("injected lineage fault")


@pytest.fixture
def project(tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    clear_run_env(monkeypatch)
    root = make_project(tmp_path / "repo")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_STAGE", "prepare")
    # mlflow_store sets MLFLOW_TRACKING_URI; mlflow.set_tracking_uri would outlive this test.
    from mlflow.tracking.context.registry import _run_context_provider_registry

    # The provider under test is the one MLflow loaded through the entry point.
    assert any(isinstance(p, lineage.LineageContextProvider) for p in _run_context_provider_registry)
    return root


def _plain_run() -> str:
    """A user's plain ``mlflow.start_run()``: the plugin runs inside MLflow's run creation."""
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0)
    return run.info.run_id


def _assert_completed(store: str, run_id: str):
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"x": 1.0}
    return run


def test_plugin_part_raising_run_completes_and_error_tag_keeps_partial_tags(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lineage, "git_info", _boom)
    with pytest.warns(lineage.LineageWarning, match="injected lineage fault"):
        run_id = _plain_run()
    tags = _assert_completed(mlflow_store, run_id).data.tags
    assert tags[ERROR_TAG] == "InjectedLineageFault: injected lineage fault"
    # What was computed before the failure is kept; what comes after it is not invented.
    assert tags[lineage.PREFIX + "stage"] == "prepare" and lineage.PREFIX + "version" in tags
    assert lineage.PREFIX + "git_commit" not in tags and lineage.PREFIX + "pipeline_id" not in tags


def test_plugin_guard_itself_raising_warnings_as_errors_error_still_recorded(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``python -W error``: the plugin's own warning becomes an exception inside MLflow's run
    creation. MLflow would swallow it with a log line; the run must still carry the error."""
    monkeypatch.setattr(lineage, "git_info", _boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lineage.LineageWarning)
        with caplog.at_level(logging.WARNING, logger=lineage.__name__):
            run_id = _plain_run()
    tags = _assert_completed(mlflow_store, run_id).data.tags
    assert "LineageWarning" in tags[ERROR_TAG] and "injected lineage fault" in tags[ERROR_TAG]
    assert any("lineage plugin failed" in r.getMessage() for r in caplog.records)


def test_provider_tags_replaced_by_a_raising_method_run_completes_and_mlflow_logs_it(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider method itself raising (no guard of ours left): MLflow's registry must keep
    the run going, and the error is logged as a warning."""
    monkeypatch.setattr(lineage.LineageContextProvider, "tags", _boom)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    registry_logger = logging.getLogger("mlflow.tracking.context.registry")
    registry_logger.addHandler(handler)
    try:
        run_id = _plain_run()
    finally:
        registry_logger.removeHandler(handler)
    tags = _assert_completed(mlflow_store, run_id).data.tags
    assert not [k for k in tags if k.startswith(lineage.PREFIX)]  # nothing half-made
    assert any("injected lineage fault" in r.getMessage() for r in records)


def test_stage_run_with_lineage_raising_completes_and_records_the_error(
    project: Path, mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our own stage runs compute lineage directly (not through the plugin): the same promise."""
    monkeypatch.setattr(lineage, "dep_versions", _boom)
    params = make_params(tmp_path)
    with pytest.warns(lineage.LineageWarning, match="injected lineage fault"):
        with tracked_run(params, stage="prepare") as run:
            run.log_metrics({"x": 1.0}, step=0)
    tags = _assert_completed(mlflow_store, run.run_id).data.tags
    assert tags[ERROR_TAG] == "InjectedLineageFault: injected lineage fault"
    assert tags[lineage.PREFIX + "git_commit"] != "none"  # computed before the fault, kept
    assert lineage.PREFIX + "pipeline_id" in tags
