"""Every fine-tuning option has an effect a test can see (finetune params -> FitConfig / HyperParams).

Pooling, per-group learning rates (head multiplier, layer-wise decay), freezing, label smoothing,
class weights, LoRA through peft (fewer trainable weights, merged to plain keys, same logits),
early stopping with the best epoch exported, from-scratch init, the from-scratch control of the
finetune stage, and the bad settings (each a clear error naming the setting).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigmodel_ops.classification import training
from bigmodel_ops.classification.class_weights import balanced_class_weights, class_weight_tensor
from bigmodel_ops.classification.export import load_classifier, save_classifier
from bigmodel_ops.classification.inputs import collate, load_splits
from bigmodel_ops.classification.lora import merge_lora
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.classification.optimization import optimizer_groups
from bigmodel_ops.classification.training import (
    ClassifierModule,
    FitConfig,
    HyperParams,
    build_classifier,
    fit_classifier,
    prepare_model,
    trainable_parameters,
)
from bigmodel_ops.config import parse_params
from bigmodel_ops.contract import Truncation
from bigmodel_ops.errors import ConfigError, DataError
from bigmodel_ops.model import TransformerLM
from bigmodel_ops.pipeline._finetuning import hyperparams
from tests.helpers_finetune import LABELS, make_pretrained, make_project, make_texts, tiny_params
from tests.tiny import tiny_model_config

FIT = FitConfig(num_labels=2, seed=3)


def _batch(n: int = 4, t: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in torch.randint(2, t + 1, (n,), generator=generator).tolist():
        ids = [2] + torch.randint(5, 100, (length - 2,), generator=generator).tolist() + [3]
        rows.append((ids, 0))
    return collate(rows)


def _classifier(objective: str, pooling: str = "auto") -> SequenceClassifier:
    torch.manual_seed(0)
    backbone = TransformerLM(tiny_model_config(vocab_size=100, objective=objective))
    return SequenceClassifier(backbone, num_labels=2, dropout=0.0, pooling=pooling).eval()


def _splits(paths, params):
    return load_splits(
        prepared=paths.prepared,
        model_dir=paths.pretrained_model,
        labels=params.prepare.labels,
        max_length=params.finetune.max_length,
    )


# --- params -> HyperParams ---------------------------------------------------------------------


def test_finetune_precision_overrides_the_profiles_and_bf16_fine_tunes_on_cpu(tmp_path: Path):
    from bigmodel_ops.pipeline._finetuning import fit_config

    bf16_profile = {"profiles": {"precision": "bf16-mixed"}}
    assert (
        fit_config(parse_params(tiny_params(**bf16_profile))).precision == "bf16-mixed"
    )  # null: the profile's
    kept = parse_params(tiny_params(**bf16_profile, finetune={"precision": "32-true"}))
    assert kept.sizing.precision == "bf16-mixed" and fit_config(kept).precision == "32-true"
    with pytest.raises(ConfigError, match=r"finetune\.precision"):
        parse_params(tiny_params(finetune={"precision": "fp8"}))

    # bf16-mixed really fine-tunes in bfloat16 on CPU; the exported weights stay float32.
    class HeadDtype(L.Callback):
        def __init__(self) -> None:
            self.dtypes: set[torch.dtype] = set()

        def on_train_start(self, trainer, pl_module) -> None:
            pl_module.model.head.register_forward_hook(lambda _m, _i, out: self.dtypes.add(out.dtype))

    params, paths, _ = make_project(tmp_path, n_train=16, n_eval=8, **bf16_profile)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)):
        probe = HeadDtype()
        module, _ = fit_classifier(
            FitConfig(num_labels=2, seed=3, precision=precision),
            model_dir=paths.pretrained_model,
            splits=_splits(paths, params),
            hparams=HyperParams(batch_size=8, max_epochs=1),
            callbacks=[probe],
            quiet=True,
        )
        assert probe.dtypes == {dtype}, precision
        assert all(t.dtype == torch.float32 for t in module.export_model().state_dict().values())


def test_params_defaults_keep_todays_behaviour_and_reach_hyperparams():
    params = parse_params(tiny_params())
    ft = params.finetune
    assert (ft.pooling, ft.method, ft.control, ft.from_scratch) == ("auto", "full", "none", False)
    assert (ft.head_lr_mult, ft.layer_lr_decay, ft.freeze_layers, ft.label_smoothing) == (1.0, 1.0, 0, 0.0)
    assert ft.class_weights == "none"
    hp = hyperparams(params)
    assert hp.lr == ft.lr and hp.max_epochs == ft.max_epochs and hp.lora_rank == ft.lora.rank
    assert hp.lora_target_modules == tuple(ft.lora.target_modules)
    # a trial overrides any setting, by its params name or the flat name
    tuned = hp.override({"lora.rank": 2, "pooling": "mean", "lr": 1e-3})
    assert (tuned.lora_rank, tuned.pooling, tuned.lr, tuned.batch_size) == (2, "mean", 1e-3, hp.batch_size)
    assert hp.replace(lora_alpha=4.0).lora_alpha == 4.0
    with pytest.raises(ValueError, match="not fine-tuning settings: \\['nope'\\]"):
        hp.override({"nope": 1})
    assert json.loads(json.dumps(hp.as_dict()))["lora_target_modules"] == list(ft.lora.target_modules)


@pytest.mark.parametrize(
    "finetune,message",
    [
        (
            {"class_weights": [1.0, 2.0, 3.0]},
            "finetune.class_weights has 3 weight(s) but prepare.labels has 2",
        ),
        ({"class_weights": "sometimes"}, "finetune.class_weights"),
        ({"freeze_backbone": True, "freeze_layers": 1}, "freeze_backbone and freeze_layers are both set"),
        ({"from_scratch": True, "control": "scratch"}, "from_scratch is already true"),
        ({"pooling": "max"}, "finetune.pooling"),
        ({"method": "qlora"}, "finetune.method"),
        ({"lora": {"rank": 0}}, "finetune.lora.rank"),
        ({"lora": {"target_modules": []}}, "finetune.lora.target_modules"),
        ({"layer_lr_decay": 1.5}, "finetune.layer_lr_decay"),
        ({"early_stopping_patience": -1}, "finetune.early_stopping_patience"),
        ({"restarts": 0}, "finetune.restarts"),
        ({"combine_restarts": "mean"}, "finetune.combine_restarts"),
        (
            {"combine_restarts": "soup"},
            "combine_restarts: soup averages the weights of several runs, but restarts is 1; set restarts >= 2",
        ),
        ({"truncation": "middle"}, "finetune.truncation"),
        (
            {"truncation": "head_tail", "max_length": 64, "head_tokens": 64},
            "head_tokens (64) must be below max_length (64) with truncation: head_tail",
        ),
        ({"max_length": 1}, "finetune.max_length"),
    ],
)
def test_schema_refuses_bad_finetune_settings(finetune: dict, message: str):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        parse_params(tiny_params(finetune=finetune))


# --- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_mean_pooling_is_the_masked_mean_of_real_tokens(objective: str):
    default = _classifier(objective)
    mean = _classifier(objective, "mean")
    mean.load_state_dict(default.state_dict())
    batch = _batch()
    idx, lengths = batch["idx"], batch["lengths"]
    real = torch.arange(idx.size(1))[None, :] < lengths[:, None]
    with torch.no_grad():
        hidden = mean.backbone.hidden(idx, key_padding_mask=real if objective == "masked" else None)
        expected = torch.stack([hidden[i, : lengths[i]].mean(0) for i in range(len(idx))])
        torch.testing.assert_close(mean.pool(idx, lengths), expected)
        assert not torch.allclose(mean(idx, lengths), default(idx, lengths), atol=1e-4)
    # padding does not change a text's mean-pooled logits
    alone = collate([(idx[1, : lengths[1]].tolist(), 0)])
    with torch.no_grad():
        torch.testing.assert_close(
            mean(alone["idx"], alone["lengths"])[0], mean(idx, lengths)[1], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_mean_max_pooling_concatenates_the_mean_and_the_max_of_real_tokens(objective: str):
    torch.manual_seed(0)
    model = _classifier(objective, "mean_max")
    assert model.head.in_features == 2 * model.backbone.config.n_embd
    batch = _batch()
    idx, lengths = batch["idx"], batch["lengths"]
    assert int(lengths.min()) < idx.size(1)  # some padding, which the max must not see
    real = torch.arange(idx.size(1))[None, :] < lengths[:, None]
    with torch.no_grad():
        hidden = model.backbone.hidden(idx, key_padding_mask=real if objective == "masked" else None)
        expected = torch.stack(
            [
                torch.cat([hidden[i, : lengths[i]].mean(0), hidden[i, : lengths[i]].amax(0)])
                for i in range(len(idx))
            ]
        )
        torch.testing.assert_close(model.pool(idx, lengths), expected)
        alone = collate([(idx[1, : lengths[1]].tolist(), 0)])
        torch.testing.assert_close(
            model(alone["idx"], alone["lengths"])[0], model(idx, lengths)[1], atol=1e-5, rtol=1e-5
        )


def test_pooling_that_does_not_fit_the_backbone_names_the_setting(tmp_path: Path):
    make_pretrained(tmp_path / "causal", [t for t, _ in make_texts(16, seed=0)], objective="causal")
    with pytest.raises(ConfigError, match="finetune.pooling: pooling 'cls' does not fit a causal backbone"):
        prepare_model(tmp_path / "causal", num_labels=2, hparams=HyperParams(pooling="cls"))
    make_pretrained(tmp_path / "masked", [t for t, _ in make_texts(16, seed=0)], objective="masked")
    with pytest.raises(ConfigError, match="finetune.pooling: pooling 'last' does not fit a masked backbone"):
        prepare_model(tmp_path / "masked", num_labels=2, hparams=HyperParams(pooling="last"))
    assert (
        prepare_model(tmp_path / "causal", num_labels=2, hparams=HyperParams(pooling="mean")).pooling
        == "mean"
    )


@pytest.mark.parametrize("pooling", ["mean", "mean_max"])
def test_export_keeps_the_pooling(tmp_path: Path, pooling: str):
    make_pretrained(tmp_path / "model", [t for t, _ in make_texts(16, seed=0)], objective="masked")
    model = build_classifier(tmp_path / "model", num_labels=2, dropout=0.0, pooling=pooling).eval()
    save_classifier(
        model,
        tmp_path / "clf",
        labels=LABELS,
        max_length=24,
        tokenizer_file=tmp_path / "model/tokenizer.json",
    )
    assert json.loads((tmp_path / "clf/config.json").read_text())["pooling"] == pooling
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.model.pooling == pooling
    batch = _batch()
    batch["idx"] = batch["idx"].clamp(max=model.backbone.config.vocab_size - 1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(batch["idx"], batch["lengths"]), model(batch["idx"], batch["lengths"])
        )


# --- learning rates, freezing, loss --------------------------------------------------------------


def test_head_multiplier_and_layer_decay_give_per_group_learning_rates():
    model = _classifier("masked")
    groups = optimizer_groups(
        model, lr=1e-3, weight_decay=0.1, head_lr_mult=10.0, layer_lr_decay=0.5, n_layer=2
    )
    lrs = {g["name"]: g["lr"] for g in groups}
    expected = {
        "top": 1e-3,  # final norm
        "block1": 1e-3 * 0.5,
        "block0": 1e-3 * 0.25,
        "embeddings": 1e-3 * 0.125,
        "head": 1e-2,
    }
    for name, lr in lrs.items():
        assert lr == pytest.approx(expected[name.split("/")[0]]), name
    assert {name.split("/")[0] for name in lrs} == set(expected)
    # every trainable tensor in exactly one group; decay only on Linear matrices
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    assert {g["weight_decay"] for g in groups if g["name"].endswith("/no_decay")} == {0.0}
    assert groups[0]["name"].startswith("top")  # the logged "lr" is the base learning rate
    # and the optimizer the module builds uses them (scheduler at step 0: warmup factor 1/(w+1))
    module = ClassifierModule(
        model,
        HyperParams(lr=1e-3, head_lr_mult=10.0, layer_lr_decay=0.5, warmup_ratio=0.0),
        num_labels=2,
        n_layer=2,
    )
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = module.configure_optimizers()["optimizer"]
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(lrs)


def test_freeze_layers_leaves_embeddings_and_first_blocks_unchanged(tmp_path: Path):
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=8)
    before = {
        k: v.clone()
        for k, v in build_classifier(paths.pretrained_model, num_labels=2, dropout=0.1).state_dict().items()
    }
    module, _ = fit_classifier(
        FIT,
        model_dir=paths.pretrained_model,
        splits=_splits(paths, params),
        hparams=HyperParams(lr=1e-2, batch_size=8, max_epochs=1, freeze_layers=1),
        quiet=True,
    )
    after = module.model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.wte", "backbone.wpe", "backbone.blocks.0."))]
    trained = [k for k in before if k.startswith(("backbone.blocks.1.", "head."))]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    for key in trained:
        if key.endswith(".weight"):
            assert not torch.equal(before[key], after[key]), key
    with pytest.raises(ConfigError, match="finetune.freeze_layers = 3: the backbone has 2 blocks"):
        prepare_model(paths.pretrained_model, num_labels=2, hparams=HyperParams(freeze_layers=3))
    backbone_frozen = prepare_model(
        paths.pretrained_model, num_labels=2, hparams=HyperParams(freeze_backbone=True)
    )
    assert trainable_parameters(backbone_frozen) == sum(p.numel() for p in backbone_frozen.head.parameters())


def test_label_smoothing_and_class_weights_change_the_training_loss():
    model = _classifier("masked")
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    labels = torch.tensor([0, 1, 1])
    plain = ClassifierModule(model, HyperParams(), num_labels=2, n_layer=2).loss(logits, labels)
    smooth = ClassifierModule(model, HyperParams(label_smoothing=0.2), num_labels=2, n_layer=2).loss(
        logits, labels
    )
    logp = torch.log_softmax(logits, -1)
    nll = -logp[torch.arange(3), labels]
    manual = (0.8 * nll + 0.2 * (-logp.mean(-1))).mean()
    assert float(plain) == pytest.approx(float(nll.mean()), abs=1e-6)
    assert float(smooth) == pytest.approx(float(manual), abs=1e-6) and float(smooth) != pytest.approx(
        float(plain)
    )
    weights = torch.tensor([1.0, 3.0])
    weighted = ClassifierModule(model, HyperParams(), num_labels=2, n_layer=2, class_weights=weights)
    manual_w = (weights[labels] * nll).sum() / weights[labels].sum()
    assert float(weighted.loss(logits, labels)) == pytest.approx(float(manual_w), abs=1e-6)


def test_balanced_class_weights_and_their_errors():
    labels = np.array([0, 0, 0, 1, 2, 2])
    assert balanced_class_weights(labels, 3) == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)])
    assert class_weight_tensor("balanced", labels, 3).tolist() == pytest.approx([2 / 3, 2.0, 1.0])
    assert class_weight_tensor("none", labels, 3) is None
    assert class_weight_tensor([1.0, 2.0, 0.5], labels, 3).tolist() == [1.0, 2.0, 0.5]
    with pytest.raises(ConfigError, match=r"finetune.class_weights has 2 weight\(s\) but there are 3 labels"):
        class_weight_tensor([1.0, 2.0], labels, 3)
    with pytest.raises(
        DataError, match=r"finetune.class_weights: balanced: class\(es\) \[1\] have no example"
    ):
        balanced_class_weights(np.array([0, 0, 2]), 3)


# --- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_lora_trains_fewer_weights_and_merges_to_the_plain_model(tmp_path: Path, objective: str):
    make_pretrained(tmp_path / "model", [t for t, _ in make_texts(16, seed=0)], objective=objective)
    full = prepare_model(tmp_path / "model", num_labels=2, hparams=HyperParams(), seed=0)
    lora = prepare_model(
        tmp_path / "model", num_labels=2, hparams=HyperParams(method="lora", lora_rank=2), seed=0
    )
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable_parameters(lora) < trainable_parameters(full) / 2
    assert all("lora_" in n or ".head." in n for n in trainable)
    assert any(n.endswith("head.weight") for n in trainable)  # the head trains fully
    assert sum(".attn.qkv.lora_A" in n for n in trainable) == 2  # one adapter per block and target
    # a trained adapter: merged logits equal the peft model's, with the plain model's keys
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    batch = _batch()
    batch["idx"] = batch["idx"].clamp(max=20)
    lora.eval()
    with torch.no_grad():
        peft_logits = lora(batch["idx"], batch["lengths"])
        merged = merge_lora(lora)
        merged_logits = merged(batch["idx"], batch["lengths"])
    assert type(merged) is SequenceClassifier
    assert set(merged.state_dict()) == set(full.state_dict())
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits, full.eval()(batch["idx"], batch["lengths"]), atol=1e-4)


def test_lora_targets_that_match_nothing_are_refused_before_training(tmp_path: Path):
    make_pretrained(tmp_path / "model", [t for t, _ in make_texts(16, seed=0)], objective="masked")
    with pytest.raises(
        ConfigError, match=r"finetune.lora.target_modules: 'attn.qvk' matches no Linear layer"
    ):
        prepare_model(
            tmp_path / "model",
            num_labels=2,
            hparams=HyperParams(method="lora", lora_target_modules=("attn.qvk",)),
        )
    # suffixes: "proj" = the attention and the MLP projection of every block
    model = prepare_model(
        tmp_path / "model", num_labels=2, hparams=HyperParams(method="lora", lora_target_modules=("proj",))
    )
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert sorted(a.split("backbone.")[1] for a in adapted) == [
        "blocks.0.attn.proj",
        "blocks.0.mlp.proj",
        "blocks.1.attn.proj",
        "blocks.1.mlp.proj",
    ]


# --- best epoch, early stopping, from scratch -----------------------------------------------------


class _Snapshots(L.Callback):
    """The model's weights after each epoch's validation."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def test_early_stopping_and_the_best_epoch_is_exported(tmp_path: Path, monkeypatch):
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=8)
    # a scripted val_acc per epoch: best at epoch 1, then two epochs without improvement
    scripted = iter([0.5, 0.75, 0.6, 0.75, 0.9, 0.9])
    real = training.val_metrics
    monkeypatch.setattr(training, "val_metrics", lambda *args: {**real(*args), "val_acc": next(scripted)})
    snapshots = _Snapshots()
    module, trainer = fit_classifier(
        FIT,
        model_dir=paths.pretrained_model,
        splits=_splits(paths, params),
        hparams=HyperParams(lr=5e-3, batch_size=8, max_epochs=6, early_stopping_patience=2),
        callbacks=[snapshots],
        quiet=True,
    )
    assert len(snapshots.states) == 4 and trainer.current_epoch == 4  # stopped after epoch 3
    assert module.stopped_early and module.best_epoch == 1 and module.best_val["val_acc"] == 0.75
    assert module.last_val["val_acc"] == 0.75  # a tie is not an improvement
    best = module.export_model()
    save_classifier(
        best,
        tmp_path / "clf",
        labels=LABELS,
        max_length=24,
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
    )
    reloaded = load_classifier(tmp_path / "clf").model.state_dict()
    for key, value in snapshots.states[1].items():
        torch.testing.assert_close(reloaded[key], value, atol=0, rtol=0, msg=key)
    assert not torch.equal(reloaded["head.weight"], snapshots.states[3]["head.weight"])


def test_no_early_stopping_runs_every_epoch(tmp_path: Path, monkeypatch):
    params, paths, _ = make_project(tmp_path, n_train=16, n_eval=8)
    scripted = iter([0.9, 0.5, 0.5])
    real = training.val_metrics
    monkeypatch.setattr(training, "val_metrics", lambda *args: {**real(*args), "val_acc": next(scripted)})
    module, trainer = fit_classifier(
        FIT,
        model_dir=paths.pretrained_model,
        splits=_splits(paths, params),
        hparams=HyperParams(batch_size=8, max_epochs=3, early_stopping_patience=0),
        quiet=True,
    )
    assert trainer.current_epoch == 3 and not module.stopped_early and module.best_epoch == 0


def test_from_scratch_is_the_same_architecture_with_seeded_random_weights(tmp_path: Path):
    pretrained = make_pretrained(
        tmp_path / "model", [t for t, _ in make_texts(16, seed=0)], objective="masked", seed=5
    )
    scratch = prepare_model(tmp_path / "model", num_labels=2, hparams=HyperParams(from_scratch=True), seed=1)
    again = prepare_model(tmp_path / "model", num_labels=2, hparams=HyperParams(from_scratch=True), seed=1)
    loaded = prepare_model(tmp_path / "model", num_labels=2, hparams=HyperParams(), seed=1)
    assert scratch.backbone.config == loaded.backbone.config
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[key], value)
        assert scratch.backbone.state_dict()[key].shape == value.shape
        if key.endswith("weight") and "ln" not in key:
            assert not torch.equal(scratch.backbone.state_dict()[key], value), key
        torch.testing.assert_close(again.backbone.state_dict()[key], scratch.backbone.state_dict()[key])


# --- the finetune stage ---------------------------------------------------------------------------


def test_finetune_stage_with_lora_mean_pooling_and_the_scratch_control(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bigmodel_ops.pipeline.finetune import run as run_finetune

    monkeypatch.chdir(tmp_path)
    finetune = {
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["attn.qkv", "mlp.fc"]},
        "pooling": "mean",
        "head_lr_mult": 5.0,
        "label_smoothing": 0.1,
        "class_weights": "balanced",
        "control": "scratch",
        "max_epochs": 2,
        "batch_size": 8,
        "max_length": 10,
        "truncation": "head_tail",
        "head_tokens": 4,
    }
    params, paths, _ = make_project(tmp_path, n_train=32, n_eval=8, finetune=finetune)
    report = run_finetune(params, paths=paths, quiet=True)

    assert report["trainable_params"] < report["total_params"] / 2
    for key in ("control_val_acc", "control_val_loss", "control_val_f1", "control_best_epoch"):
        assert key in report, key
    assert report["pretrained_gain_val_acc"] == pytest.approx(report["val_acc"] - report["control_val_acc"])
    assert json.loads(paths.finetune_report.read_text()) == report
    # the export: one plain classifier (no adapter keys), mean pooling, loads and predicts
    config = json.loads((paths.classifier / "config.json").read_text())
    assert config["pooling"] == "mean" and config["hparams"]["method"] == "lora"
    assert (config["max_length"], config["truncation"], config["head_tokens"]) == (10, "head_tail", 4)
    assert config["best_epoch"] == report["best_epoch"]
    from safetensors import safe_open

    with safe_open(str(paths.classifier / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert not [k for k in keys if "lora" in k or "base_model" in k]
    assert "head.weight" in keys and "backbone.blocks.0.attn.qkv.weight" in keys
    classifier = load_classifier(paths.classifier)
    labels, _ = classifier.predict(["great film", "awful plot"])
    assert set(labels) <= set(LABELS)
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("ft-test").experiment_id],
        filter_string="attributes.run_name = 'finetune'",
    )[0]
    assert run.data.metrics["control_val_acc"] == report["control_val_acc"]
    assert run.data.params["hparams.method"] == "lora"
    assert math.isfinite(run.data.metrics["best_val_loss"])
    # the stage's cost covers both fits: the main fit's, then (latest) the main plus the control's
    history = MlflowClient().get_metric_history(run.info.run_id, "cost/cpu_hours")
    assert len(history) == 2 and history[1].value > history[0].value > 0
    assert run.data.metrics["cost/cpu_hours"] == history[1].value
    # the control is saved for the evaluate stage to score on the test split
    assert json.loads((paths.control_classifier / "control.json").read_text()) == {"trained": True}
    control = load_classifier(paths.control_classifier)
    assert control.config["from_scratch"] is True and control.labels == classifier.labels
    assert control.truncation == classifier.truncation == Truncation(10, "head_tail", 4)


def test_finetune_stage_refuses_bad_settings_before_training(tmp_path: Path, monkeypatch, capsys):
    from bigmodel_ops.cli import main

    cases = [
        ({"pooling": "cls"}, "causal", "finetune.pooling: pooling 'cls' does not fit a causal backbone"),
        (
            {"method": "lora", "lora": {"target_modules": ["attention.q"]}},
            "masked",
            "finetune.lora.target_modules: 'attention.q' matches no Linear layer",
        ),
        ({"freeze_layers": 5}, "masked", "finetune.freeze_layers = 5: the backbone has 2 blocks"),
    ]
    for i, (finetune, objective, expected) in enumerate(cases):
        root = tmp_path / str(i)
        root.mkdir()
        monkeypatch.chdir(root)  # the CLI's paths are relative to the working directory
        _, paths, params_file = make_project(
            root, objective=objective, n_train=8, n_eval=4, finetune=finetune
        )
        assert main(["finetune", "--params", str(params_file), "--quiet"]) == 2
        assert expected in capsys.readouterr().err
        assert not paths.classifier.exists() and not paths.finetune_report.exists()


def test_cross_entropy_reference_for_label_smoothing_is_torchs():
    # the manual formula used above is PyTorch's definition (guards the test itself)
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    logp = torch.log_softmax(logits, -1)
    manual = (0.7 * -logp[torch.arange(5), labels] + 0.3 * -logp.mean(-1)).mean()
    assert float(F.cross_entropy(logits, labels, label_smoothing=0.3)) == pytest.approx(
        float(manual), abs=1e-6
    )


def test_the_served_classifier_imports_no_training_library():
    import subprocess
    import sys

    code = (
        "import sys, bigmodel_ops.classification.export\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pydantic', 'peft', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
