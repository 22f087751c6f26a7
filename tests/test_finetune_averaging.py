"""finetune.weight_averaging: ema / swa, the weights of one fine-tuning run averaged along it.

The running averages (EMA and the uniform mean of the late steps, with their starts and edge
cases), the settings' errors, a real fine-tuning run (validation scores the average, the best
epoch keeps the average's weights, not the live ones, and the exported classifier's val metrics
are the ones reported) and the finetune stage (config.json and the model card name the average; a soup
of restarts averages each run's average).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn

from bigmodel_ops.classification.averaging import WeightAverage
from bigmodel_ops.classification.export import load_classifier
from bigmodel_ops.classification.soup import average_weights, evaluate
from bigmodel_ops.classification.training import fit_classifier
from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams, stage_splits
from bigmodel_ops.pipeline.finetune import run as run_finetune
from tests.helpers_finetune import card_of, make_project, refit_restarts, tiny_params


class _W(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


def _run(average: WeightAverage, values: list[float], *, total_steps: int) -> tuple[_W, list[float]]:
    """Steps 1..len(values): the live weight becomes values[i] at step i + 1; the scored weight after each."""
    live = _W()
    average.begin(live, total_steps=total_steps)
    scored = []
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            live.w.fill_(value)
        average.update(live, step=step)
        scored.append(float(average.model(live).w.detach()))
    return live, scored


def test_ema_folds_every_step_in_with_its_decay_the_first_step_copied():
    _, scored = _run(WeightAverage("ema", decay=0.5), [4.0, 8.0, 0.0], total_steps=3)
    assert scored == pytest.approx([4.0, 6.0, 3.0])  # 4; 0.5*4 + 0.5*8; 0.5*6 + 0.5*0


def test_swa_is_the_uniform_mean_of_the_steps_after_its_start():
    # 10 steps, start 0.5: the weights after steps 6..10
    average = WeightAverage("swa", start=0.5)
    live, scored = _run(average, [float(v) for v in range(1, 11)], total_steps=10)
    assert average.start_step == 6 and average.updates == 5
    assert scored[:5] == [1.0, 2.0, 3.0, 4.0, 5.0]  # before the start: the live weights are scored
    assert scored[5:] == pytest.approx([6.0, 6.5, 7.0, 7.5, 8.0])
    assert average.model(live) is not live and float(live.w.detach()) == 10.0


def test_swa_averages_at_least_the_last_step_and_none_scores_the_live_model():
    late = WeightAverage("swa", start=0.99)
    _, scored = _run(late, [1.0, 2.0, 3.0], total_steps=3)
    assert late.start_step == 3 and late.updates == 1 and scored == [1.0, 2.0, 3.0]

    off = WeightAverage("none")
    live, _ = _run(off, [1.0, 2.0], total_steps=2)
    assert not off.active and off.updates == 0 and off.model(live) is live


def test_the_average_is_scored_in_the_live_models_mode():
    average = WeightAverage("ema", decay=0.9)
    live = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    average.begin(live, total_steps=4)
    average.update(live, step=1)
    assert average.model(live.eval()).training is False
    assert average.model(live.train()).training is True


def test_weight_average_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"weight averaging 'polyak' is not one of none, ema, swa"):
        WeightAverage("polyak")
    with pytest.raises(ValueError, match="ema decay 1.0 is not between 0 and 1"):
        WeightAverage("ema", decay=1.0)
    with pytest.raises(ValueError, match=r"swa start 1.0 is not a fraction of the steps in \[0, 1\)"):
        WeightAverage("swa", start=1.0)


@pytest.mark.parametrize(
    "finetune,message",
    [
        ({"weight_averaging": "polyak"}, "finetune.weight_averaging"),
        ({"ema_decay": 1.0}, "finetune.ema_decay"),
        ({"ema_decay": 0.0}, "finetune.ema_decay"),
        ({"swa_start": 1.0}, "finetune.swa_start"),
    ],
)
def test_schema_refuses_bad_averaging_settings(finetune: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_params(finetune=finetune))


def test_weight_averaging_is_refused_with_fsdp_which_shards_the_weights():
    raw = tiny_params(finetune={"weight_averaging": "swa"})
    profile = raw["profile"]
    raw["profiles"][profile].update(accelerator="gpu", strategy="fsdp")
    with pytest.raises(
        ConfigError, match=r"finetune.weight_averaging: swa keeps a full copy .* strategy fsdp"
    ):
        parse_params(raw)
    raw["finetune"]["weight_averaging"] = "none"
    assert parse_params(raw).sizing.strategy == "fsdp"


class _Watch(L.Callback):
    """After each validation: the average's and the live model's weights, and how many steps the average holds."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        averaging = pl_module.averaging
        scored = averaging.model(pl_module.model)
        self.epochs.append(
            {
                "updates": averaging.updates,
                "scored": {k: v.detach().clone() for k, v in scored.state_dict().items()},
                "live": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
            }
        )


@pytest.mark.parametrize(
    "averaging,updates",
    [
        ({"weight_averaging": "ema", "ema_decay": 0.8}, [4, 8]),
        ({"weight_averaging": "swa", "swa_start": 0.5}, [0, 4]),
    ],
)
def test_fine_tuning_validates_keeps_and_exports_the_average(tmp_path: Path, averaging: dict, updates: list):
    # 32 texts, batch 8: 4 steps per epoch, 2 epochs
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16)
    splits = stage_splits(params, paths)
    watch = _Watch()
    module, _ = fit_classifier(
        fit_config(params),
        model_dir=paths.pretrained_model,
        splits=splits,
        hparams=hyperparams(params).override({"batch_size": 8, "max_epochs": 2, **averaging}),
        callbacks=[watch],
        quiet=True,
    )
    assert [epoch["updates"] for epoch in watch.epochs] == updates
    last = watch.epochs[-1]
    # the last epoch's average is not its live weights (swa: epoch 0 scored the live ones)
    assert any(not torch.equal(last["scored"][k], last["live"][k]) for k in last["live"])

    best = watch.epochs[module.best_epoch]
    exported = module.export_model()
    state = exported.state_dict()
    for key, value in best["scored"].items():
        assert torch.equal(state[key], value), key
    # the exported model's val metrics are the best epoch's reported ones
    scored = evaluate(exported, splits["val"], num_labels=2, batch_size=5)
    assert scored["val_acc"] == module.best_val["val_acc"]
    assert scored["val_loss"] == pytest.approx(module.best_val["val_loss"], rel=1e-5)


def test_finetune_stage_exports_the_average_and_names_it_in_config_and_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    finetune = {"max_epochs": 2, "batch_size": 8, "weight_averaging": "ema", "ema_decay": 0.8}
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16, finetune=finetune)
    report = run_finetune(params, paths=paths, quiet=True)

    exported = load_classifier(paths.classifier)
    splits = stage_splits(params, paths)
    assert evaluate(exported.model, splits["val"], num_labels=2) == pytest.approx(
        {key: report[key] for key in ("val_acc", "val_loss", "val_f1")}
    )
    config = json.loads((paths.classifier / "config.json").read_text())
    assert (config["hparams"]["weight_averaging"], config["hparams"]["ema_decay"]) == ("ema", 0.8)
    card = card_of(params, config)
    assert (
        f"best epoch {report['best_epoch']} of an exponential moving average of the weights (decay 0.8)"
        in card
    )


def test_a_soup_of_restarts_averages_each_runs_averaged_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    finetune = {
        "max_epochs": 2,
        "batch_size": 8,
        "restarts": 2,
        "combine_restarts": "soup",
        "weight_averaging": "swa",
        "swa_start": 0.5,
    }
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=16, finetune=finetune)
    run_finetune(params, paths=paths, quiet=True)

    assert (hyperparams(params).weight_averaging, hyperparams(params).swa_start) == ("swa", 0.5)
    runs = refit_restarts(params, paths, 2)
    expected = average_weights(runs).state_dict()
    for key, value in load_classifier(paths.classifier).model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
