"""finetune.restarts: several fine-tuning runs from different seeds, the best by val_acc kept.

The selection rule (first of equals, never a NaN), the seeds, and the finetune stage with two
restarts and the from-scratch control: one child run per restart, the kept run exported and
reported, restart 0 the same run a single fine-tuning trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.restarts import Restart, pick_best, restart_seed
from bigmodel_ops.pipeline.finetune import run as run_finetune
from bigmodel_ops.tracking.frontpage import run_cost
from tests.helpers_finetune import make_project


def _restart(index: int, val_acc: float) -> Restart:
    return Restart(
        index=index,
        seed=index,
        val={"val_acc": val_acc},
        best_epoch=0,
        epochs=1,
        global_step=1,
        stopped_early=False,
    )


def test_pick_best_takes_the_highest_val_acc_and_the_first_of_equals():
    assert pick_best([_restart(0, 0.7), _restart(1, 0.8), _restart(2, 0.75)]) == 1
    assert pick_best([_restart(0, 0.8), _restart(1, 0.8)]) == 0
    assert pick_best([_restart(0, math.nan), _restart(1, 0.5)]) == 1
    assert pick_best([_restart(0, 0.5), _restart(1, math.nan)]) == 0
    assert pick_best([_restart(0, math.nan), _restart(1, math.nan)]) == 0
    assert pick_best([_restart(0, 0.6)]) == 0
    with pytest.raises(ValueError, match="no restarts"):
        pick_best([])


def test_restart_seeds_start_at_the_run_seed_and_stay_apart():
    assert [restart_seed(7, k) for k in range(3)] == [7, 1007, 2007]
    with pytest.raises(ValueError, match="restart must be >= 0"):
        restart_seed(7, -1)


def _finetune_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("ft-test").experiment_id
    return client.search_runs([experiment], filter_string="tags.`bigmodel_ops.stage` = 'finetune'")


def test_finetune_stage_keeps_the_best_of_its_restarts_and_gives_the_control_as_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    finetune = {"max_epochs": 2, "batch_size": 8, "control": "scratch", "use_tuned": False}
    single_root, root = tmp_path / "single", tmp_path / "restarts"
    single_root.mkdir()
    root.mkdir()
    monkeypatch.chdir(single_root)
    single_finetune = {**finetune, "control": "none"}
    params, paths, _ = make_project(single_root, n_train=32, n_eval=16, finetune=single_finetune)
    single = run_finetune(params, paths=paths, quiet=True)
    assert "restarts" not in single and "kept_restart" not in single  # the default report is unchanged

    monkeypatch.chdir(root)
    params, paths, _ = make_project(root, n_train=32, n_eval=16, finetune={**finetune, "restarts": 2})
    report = run_finetune(params, paths=paths, quiet=True)

    tries = report["restart_val_acc"]
    assert report["restarts"] == 2 and len(tries) == 2
    # restart 0 is the run a single fine-tuning trains (same seed, same data order)
    assert tries[0] == single["val_acc"]
    kept = report["kept_restart"]
    assert kept == (1 if tries[1] > tries[0] else 0)
    assert report["val_acc"] == tries[kept] == max(tries)
    assert report["kept_seed"] == 7 + 1000 * kept
    assert report["control_kept_restart"] == (
        1 if report["control_restart_val_acc"][1] > report["control_restart_val_acc"][0] else 0
    )
    assert report["control_val_acc"] == max(report["control_restart_val_acc"])
    assert report["pretrained_gain_val_acc"] == pytest.approx(report["val_acc"] - report["control_val_acc"])
    assert json.loads(paths.finetune_report.read_text()) == report

    # the exported classifier is the kept run, and says which one it is
    config = json.loads((paths.classifier / "config.json").read_text())
    assert (config["restart"], config["seed"], config["best_epoch"]) == (
        kept,
        report["kept_seed"],
        report["best_epoch"],
    )
    labels, _ = load_classifier(paths.classifier).predict(["great film"])
    assert len(labels) == 1

    # MLflow: the stage's run, one child run per restart with its own curves and seed
    client = MlflowClient(mlflow_store)
    runs = _finetune_runs(client)
    parent = max((r for r in runs if r.info.run_name == "finetune"), key=lambda r: r.info.start_time)
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    names = [f"finetune/{who}restart-{k}" for who in ("", "control-") for k in range(2)]
    assert sorted(children) == sorted(names)
    best_losses = []
    for k in range(2):
        child = children[f"finetune/restart-{k}"]
        assert child.info.status == "FINISHED"
        assert child.data.tags["bigmodel_ops.seed"] == str(7 + 1000 * k)
        assert child.data.metrics["best_val_acc"] == tries[k]
        assert client.get_metric_history(child.info.run_id, "train_loss")
        best_losses.append(child.data.metrics["best_val_loss"])
        control = children[f"finetune/control-restart-{k}"]
        assert control.data.metrics["best_val_acc"] == report["control_restart_val_acc"][k]
        assert control.data.tags["bigmodel_ops.seed"] == str(7 + 1000 * k)
    assert best_losses[0] != best_losses[1]  # two seeds, two runs
    history = client.get_metric_history(parent.info.run_id, "restart_val_acc")
    assert [(m.step, m.value) for m in history] == [(0, tries[0]), (1, tries[1])]
    history = client.get_metric_history(parent.info.run_id, "control_restart_val_acc")
    assert [m.value for m in history] == report["control_restart_val_acc"]
    assert parent.data.metrics["kept_restart"] == kept
    assert parent.data.metrics["best_val_acc"] == report["val_acc"]
    assert parent.data.metrics["control_val_acc"] == report["control_val_acc"]
    assert not client.get_metric_history(parent.info.run_id, "train_loss")  # curves are the children's
    # each fit's cost is in its child run; the stage's cost (as the front page sums it) is theirs
    assert "cost/cpu_hours" not in parent.data.metrics
    costs = [children[name].data.metrics["cost/cpu_hours"] for name in names]
    assert min(costs) > 0
    assert run_cost(client, parent.info.run_id).cpu_hours == pytest.approx(sum(costs))
