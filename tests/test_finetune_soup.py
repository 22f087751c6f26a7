"""finetune.combine_restarts: soup / greedy_soup, the weights of several fine-tuning runs averaged.

The averaging (floats averaged, integer buffers kept, other shapes refused), the greedy recipe's
order and acceptance rule, the val scorer against the training module's own validation, and the
finetune stage with two restarts and the control: the exported classifier is the mean of the two
runs' best epochs, and the report's val metrics are that model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mlflow.tracking import MlflowClient

from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.soup import average_weights, evaluate, greedy_soup, soup_of, uniform_soup
from bigmodel_ops.classification.training import fit_classifier
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams, stage_splits
from bigmodel_ops.pipeline.finetune import run as run_finetune
from tests.helpers_finetune import card_of, make_project, refit_restarts


class _Scaled(nn.Module):
    """y = w * x, with an integer buffer that averaging must leave alone."""

    def __init__(self, w: float, count: int = 0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.register_buffer("count", torch.tensor(count))


class _W(nn.Module):
    """_Scaled without the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))


def _w(model: nn.Module) -> float:
    return float(model.w.detach())


def _val_acc_near_one(model: _Scaled) -> dict[str, float]:
    """A score that prefers w near 1: 1 - |w - 1| / 10."""
    return {"val_acc": 1.0 - abs(_w(model) - 1.0) / 10.0}


def test_average_weights_averages_floats_keeps_integers_and_leaves_the_inputs_alone():
    models = [_Scaled(1.0, count=3), _Scaled(2.0, count=5), _Scaled(6.0, count=9)]
    soup = average_weights(models)
    assert _w(soup) == pytest.approx(3.0)
    assert int(soup.count) == 3  # the first model's
    assert [_w(m) for m in models] == [1.0, 2.0, 6.0]
    assert soup is not models[0]


def test_average_weights_refuses_models_of_other_shapes_and_no_models():
    wide = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 at 'weight'"):
        average_weights([nn.Linear(2, 2), wide])
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 at 'count'"):
        average_weights([_Scaled(1.0), _W()])
    with pytest.raises(ValueError, match="average_weights: no models"):
        average_weights([])


def test_greedy_soup_adds_models_best_first_while_val_does_not_drop():
    # alone: 0.9, 0.9, 0.95, 0.6 -> order 2, 0, 1 (the earlier of equals first), 3
    models = [_Scaled(0.0), _Scaled(2.0), _Scaled(1.5), _Scaled(5.0)]
    soup = greedy_soup(models, score=_val_acc_near_one)
    # 1.5 (0.95); + 0.0 -> 0.75 (0.975, kept); + 2.0 -> 1.1667 (0.9833, kept); + 5.0 -> 2.125 (0.8875, dropped)
    assert soup.members == [2, 0, 1] and soup.kind == "greedy_soup"
    assert _w(soup.model) == pytest.approx(3.5 / 3)
    assert soup.val["val_acc"] == pytest.approx(1.0 - (3.5 / 3 - 1.0) / 10.0)

    # nothing helps the best model: the soup is the best model alone, with its own score
    lone = greedy_soup([_Scaled(3.0), _Scaled(1.0)], score=_val_acc_near_one)
    assert lone.members == [1] and _w(lone.model) == 1.0 and lone.val == {"val_acc": 1.0}
    with pytest.raises(ValueError, match="greedy_soup: no models"):
        greedy_soup([], score=_val_acc_near_one)


def test_uniform_soup_averages_every_model_and_scores_it_once():
    scored = []

    def score(model: nn.Module) -> dict[str, float]:
        scored.append(_w(model))
        return _val_acc_near_one(model)

    soup = uniform_soup([_Scaled(0.0), _Scaled(2.0), _Scaled(7.0)], score=score)
    assert soup.members == [0, 1, 2] and soup.kind == "soup" and _w(soup.model) == pytest.approx(3.0)
    assert scored == [pytest.approx(3.0)] and soup.val["val_acc"] == pytest.approx(0.8)


def test_soup_of_names_an_unknown_kind(tmp_path: Path):
    params, paths, _ = make_project(tmp_path, n_train=16, n_eval=8)
    val = stage_splits(params, paths)["val"]
    with pytest.raises(ValueError, match=r"unknown soup 'mean' \(valid: soup, greedy_soup\)"):
        soup_of([_Scaled(1.0)], kind="mean", val=val, num_labels=2)


def test_evaluate_matches_the_training_modules_validation(tmp_path: Path):
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16)
    splits = stage_splits(params, paths)
    module, _ = fit_classifier(
        fit_config(params),
        model_dir=paths.pretrained_model,
        splits=splits,
        hparams=hyperparams(params).replace(batch_size=8, max_epochs=1),
        quiet=True,
    )
    model = module.export_model().train()  # evaluate switches to eval mode and back
    scored = evaluate(model, splits["val"], num_labels=2, batch_size=5)
    assert scored["val_acc"] == module.best_val["val_acc"]
    assert scored["val_f1"] == pytest.approx(module.best_val["val_f1"])
    assert scored["val_loss"] == pytest.approx(module.best_val["val_loss"], rel=1e-5)
    assert model.training


def test_finetune_stage_exports_the_soup_of_its_restarts_and_reports_its_val_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    finetune = {"max_epochs": 2, "batch_size": 8, "restarts": 2, "combine_restarts": "soup"}
    params, paths, _ = make_project(
        tmp_path, n_train=32, n_eval=16, finetune={**finetune, "control": "scratch"}
    )
    report = run_finetune(params, paths=paths, quiet=True)

    assert report["combine_restarts"] == "soup" and report["control_combine_restarts"] == "soup"
    assert report["soup_members"] == [0, 1] and report["soup_seeds"] == [7, 1007] and report["soup_size"] == 2
    assert report["control_soup_members"] == [0, 1] and "kept_restart" not in report
    assert "control_kept_restart" not in report and len(report["restart_val_acc"]) == 2
    assert report["pretrained_gain_val_acc"] == pytest.approx(report["val_acc"] - report["control_val_acc"])
    assert json.loads(paths.finetune_report.read_text()) == report

    # the exported classifier is the mean of the two runs' best epochs (the same seeds, refitted)
    runs = refit_restarts(params, paths, 2)
    splits = stage_splits(params, paths)
    exported = load_classifier(paths.classifier)
    expected = average_weights(runs).state_dict()
    for key, value in exported.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert not torch.equal(runs[0].state_dict()["head.weight"], runs[1].state_dict()["head.weight"])
    # ... and the report's val metrics are that model's
    assert evaluate(exported.model, splits["val"], num_labels=2) == pytest.approx(
        {key: report[key] for key in ("val_acc", "val_loss", "val_f1")}
    )
    config = json.loads((paths.classifier / "config.json").read_text())
    assert (config["combine_restarts"], config["soup_members"], config["soup_seeds"]) == (
        "soup",
        [0, 1],
        [7, 1007],
    )
    assert "restart" not in config
    card = card_of(params, config)
    assert "soup: the mean of restarts [0, 1] (seeds [7, 1007]), each at its best epoch" in card

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("ft-test").experiment_id
    runs_ = client.search_runs([experiment], filter_string="attributes.run_name = 'finetune'")
    parent = max(runs_, key=lambda r: r.info.start_time)
    assert parent.data.metrics["best_val_acc"] == report["val_acc"]
    assert parent.data.metrics["soup_size"] == 2 and parent.data.metrics["control_soup_size"] == 2
    assert parent.data.metrics["control_val_acc"] == report["control_val_acc"]


def test_greedy_soup_in_the_stage_starts_from_the_best_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    finetune = {"max_epochs": 1, "batch_size": 8, "restarts": 2, "combine_restarts": "greedy_soup"}
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16, finetune=finetune)
    report = run_finetune(params, paths=paths, quiet=True)
    tries = report["restart_val_acc"]
    first = 1 if tries[1] > tries[0] else 0
    assert report["combine_restarts"] == "greedy_soup" and report["soup_members"][0] == first
    assert report["soup_size"] == len(report["soup_members"]) in (1, 2)
    assert report["val_acc"] >= max(tries)  # the greedy soup never reads below its best run on val
    if report["soup_size"] == 1:
        assert report["val_acc"] == max(tries)
