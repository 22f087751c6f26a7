"""The pretrain stage: masking, schedule, data position, training, export, tracking, bad input.

Everything is real: a WordPiece tokenizer, packed shards, Lightning training of a 2-layer
model on CPU, a sqlite MLflow store (conftest), safetensors export.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import CheckpointError, DataError, TrainingDiverged
from bigmodel_ops.model import IGNORE_INDEX, ModelConfig, TransformerLM, load_pretrained, parameter_groups
from bigmodel_ops.pipeline.pretrain import check_inputs
from bigmodel_ops.pipeline.pretrain import run as run_pretrain
from bigmodel_ops.pretraining.checkpoints import find_resume_point
from bigmodel_ops.pretraining.data import DataSpec, ResumableBatchLoader, TokenStream, TrainBatches
from bigmodel_ops.pretraining.flops import mfu, peak_flops, training_flops_per_token
from bigmodel_ops.pretraining.lm_module import (
    ElectraConfig,
    LMModule,
    OptimConfig,
    lr_factor,
    replace_with_samples,
)
from bigmodel_ops.pretraining.masking import mask_tokens, masked_count, word_continuation_ids
from bigmodel_ops.shards import ShardIndex
from tests.faults import PoisonAtStep
from tests.helpers_pretrain import ckpt_dir, make_project, raw_params, train_tokenizer, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _pretrain_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_mask_tokens_80_10_10_statistics_and_separator_untouched():
    rng = np.random.default_rng(0)
    vocab, sep, mask = 1000, 3, 4
    tokens = rng.integers(5, vocab, size=(512, 128))
    tokens[:, ::9] = sep  # separators scattered through every row
    inputs, positions, labels = mask_tokens(
        tokens,
        rng=np.random.default_rng(1),
        mask_rate=0.15,
        mask_id=mask,
        protected_ids=np.array([sep]),
        random_ids=np.arange(5, vocab),
    )
    m = masked_count(128, 0.15)
    assert m == 19 and positions.shape == labels.shape == (512, m)
    picked = np.take_along_axis(tokens, positions, axis=1)
    assert (picked != sep).all(), "a separator was selected for prediction"
    assert (labels == picked).all()
    assert (inputs[tokens == sep] == sep).all(), "a separator was altered"
    unselected = np.ones_like(tokens, dtype=bool)
    np.put_along_axis(unselected, positions, False, axis=1)
    assert (inputs[unselected] == tokens[unselected]).all(), "a token outside the selection changed"
    after = np.take_along_axis(inputs, positions, axis=1)
    n = after.size
    masked = (after == mask).mean()
    kept = (after == picked).mean()
    randomised = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.01
    # A random replacement equals the original with probability 1/995: counted as "kept".
    assert abs(randomised - 0.1) < 0.01 and abs(kept - 0.1) < 0.01, (masked, randomised, kept, n)
    assert not np.isin(after[(after != mask) & (after != picked)], [0, 1, 2, 3, 4]).any()
    # Selection is uniform over positions (no position preferred).
    counts = np.bincount(positions.ravel(), minlength=128)[tokens[0] != sep]
    assert counts.min() > 0.5 * counts.mean()


def test_mask_tokens_row_with_too_few_tokens_ignores_unfilled_slots():
    tokens = np.full((1, 16), 3)
    tokens[0, :2] = [7, 8]
    _, positions, labels = mask_tokens(
        tokens,
        rng=np.random.default_rng(0),
        mask_rate=0.5,
        mask_id=4,
        protected_ids=np.array([3]),
        random_ids=np.arange(5, 20),
    )
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == [7, 8]
    assert (labels == IGNORE_INDEX).sum() == 6


def test_whole_word_masking_picks_the_pieces_of_a_word_together():
    # Words of 1 to 3 pieces: a word start is an id in 5..99, a continuation piece 100..199.
    rng = np.random.default_rng(0)
    rows, T, sep = 256, 96, 3
    tokens = np.empty((rows, T), dtype=np.int64)
    word = np.empty((rows, T), dtype=np.int64)  # each position's word number within its row
    for r in range(rows):
        t, w = 0, 0
        while t < T:
            pieces = [int(rng.integers(5, 100))] + [
                int(rng.integers(100, 200)) for _ in range(rng.integers(0, 3))
            ]
            pieces = [sep] if rng.random() < 0.05 else pieces
            n = min(len(pieces), T - t)
            tokens[r, t : t + n], word[r, t : t + n] = pieces[:n], w
            t, w = t + n, w + 1
    continuation = np.arange(100, 200)
    kwargs = {
        "mask_rate": 0.2,
        "mask_id": 4,
        "protected_ids": np.array([sep]),
        "random_ids": np.arange(5, 200),
    }
    inputs, positions, labels = mask_tokens(
        tokens, rng=np.random.default_rng(1), continuation_ids=continuation, **kwargs
    )
    assert positions.shape == (rows, masked_count(T, 0.2))
    picked = np.zeros_like(tokens, dtype=bool)
    np.put_along_axis(picked, positions, True, axis=1)
    assert not picked[tokens == sep].any() and (inputs[tokens == sep] == sep).all()
    # Only the word that the last slot falls in may be cut: at most one per row.
    per_row = [
        sum(
            bool(picked[r][word[r] == w].any() and not picked[r][word[r] == w].all())
            for w in np.unique(word[r])
        )
        for r in range(rows)
    ]
    assert max(per_row) <= 1, max(per_row)
    # Token masking of the same rows cuts words all the time: the test can tell the two apart.
    _, token_positions, _ = mask_tokens(tokens, rng=np.random.default_rng(1), **kwargs)
    token_picked = np.zeros_like(tokens, dtype=bool)
    np.put_along_axis(token_picked, token_positions, True, axis=1)
    cut = sum(
        bool(token_picked[r][word[r] == w].any() and not token_picked[r][word[r] == w].all())
        for r in range(rows)
        for w in np.unique(word[r])
    )
    assert cut > 2 * rows, cut
    # Every picked piece is predicted, whole words and the 80/10/10 split alike.
    assert (labels == np.take_along_axis(tokens, positions, axis=1)).all()
    after = np.take_along_axis(inputs, positions, axis=1)
    assert abs((after == 4).mean() - 0.8) < 0.02


def test_word_continuation_ids_of_wordpiece_and_byte_level_bpe():
    wordpiece = {"[PAD]": 0, "[SEP]": 1, "un": 2, "##believ": 3, "##able": 4, "film": 5, ".": 6}
    assert word_continuation_ids(wordpiece, model="WordPiece").tolist() == [3, 4]
    bpe = {"<pad>": 0, "\u0120un": 1, "believ": 2, "able": 3, "\u0120film": 4, ".": 5, "'t": 6, "2": 7}
    assert word_continuation_ids(bpe, model="BPE").tolist() == [2, 3, 7]
    assert word_continuation_ids({"a": 0, "b": 1}, model="WordLevel").tolist() == []


def test_masked_gather_loss_equals_boolean_mask_loss():
    torch.manual_seed(0)
    model = TransformerLM(
        ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, objective="masked")
    )
    idx = torch.randint(5, 50, (3, 16))
    positions = torch.tensor([[1, 4, 9], [0, 2, 15], [3, 5, 7]])
    labels = torch.randint(5, 50, (3, 3))
    labels[2, 1] = IGNORE_INDEX
    dense = torch.full((3, 16), IGNORE_INDEX)
    dense.scatter_(1, positions, labels)
    _, loss_gather = model(idx, labels, positions=positions)
    _, loss_bool = model(idx, dense)
    assert torch.allclose(loss_gather, loss_bool, atol=1e-6)


def test_lr_schedule_warmup_then_cosine_to_min():
    f = lambda s: lr_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_parameter_groups_decay_only_linear_matrices():
    model = TransformerLM(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    }
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "blocks.0.ln_1.bias", "blocks.0.mlp.fc.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert no_decay["weight_decay"] == 0.0


def test_peak_flops_table_and_unknown_hardware():
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert peak_flops(None, "32-true") is None and peak_flops("Tesla T4", "16-mixed") is None
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak=None) is None
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak=1e13, devices=2) == pytest.approx(0.05)


def test_token_stream_windows_cross_shard_boundaries(tmp_path: Path):
    from bigmodel_ops.paths import ProjectPaths

    paths = ProjectPaths(root=tmp_path)
    train_tokenizer(paths.tokenizer_file)
    index = write_shards(paths, shard_tokens=100)
    assert len(index.splits["train"]) > 3
    stream = TokenStream.from_index(index, "train")
    flat = np.concatenate([np.asarray(m) for m in index.open_split("train")]).astype(np.int64)
    offsets = np.array([0, 95, 99, 100, 250, len(flat) - 33])
    assert (stream.windows(offsets, 33) == flat[offsets[:, None] + np.arange(33)]).all()


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_loader_position_resumes_exactly_across_epochs(tmp_path: Path, sampling: str):
    from bigmodel_ops.paths import ProjectPaths

    paths = ProjectPaths(root=tmp_path)
    train_tokenizer(paths.tokenizer_file)
    index = write_shards(paths, train_docs=60)
    spec = DataSpec(
        objective="masked",
        block_size=16,
        batch_size=4,
        seed=3,
        sampling=sampling,
        vocab_size=index.vocab_size,
        special_ids=(0, 1, 2, 3, 4),
        protected_ids=(3,),
    )
    stream = TokenStream.from_index(index, "train")

    def batches(loader: ResumableBatchLoader, n: int) -> list[torch.Tensor]:
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch["input_ids"])
                if len(out) == n:
                    break
        return out

    full = ResumableBatchLoader(TrainBatches(stream, spec), seed=3)
    per_epoch = len(full)
    assert per_epoch >= 2
    reference = batches(full, 3 * per_epoch)
    assert not torch.equal(reference[0], reference[per_epoch])  # epochs differ (masks, or windows)
    first = ResumableBatchLoader(TrainBatches(stream, spec), seed=3)
    k = per_epoch + 1  # mid-way through the second epoch
    head = batches(first, k)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 1
    resumed = ResumableBatchLoader(TrainBatches(stream, spec), seed=3)
    resumed.load_state_dict(state)
    tail = batches(resumed, 3 * per_epoch - k)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))
    with pytest.raises(CheckpointError, match="batches per epoch"):
        ResumableBatchLoader(TrainBatches(stream, spec, world_size=2), seed=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def test_pretrain_trains_exports_registers_and_tracks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths, _ = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = run_pretrain(params, paths=paths, quiet=True)

    # Training happened and the loss went down.
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)
    assert run.info.status == "FINISHED" and run.info.run_id == report["run_id"]
    losses = _history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in losses] == [2, 4, 6, 8, 10, 12]
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    assert [s for s, _ in _history(client, run.info.run_id, "val/loss")] == [4, 8, 12]
    lrs = dict(_history(client, run.info.run_id, "train/lr"))
    assert lrs[2] == pytest.approx(3e-3) and lrs[12] == pytest.approx(3e-4)
    for key in ("perf/tokens_per_s", "train/tokens", "train/epoch", "perf/data_wait_frac"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [2, 4, 6, 8, 10, 12], key
    assert dict(_history(client, run.info.run_id, "train/tokens"))[12] == 12 * 4 * 32
    assert not _history(client, run.info.run_id, "perf/mfu")  # CPU: unknown, not a number
    data = client.get_run(run.info.run_id).data
    assert data.tags["bigmodel_ops.mfu"] == "unknown"
    assert data.params["pretrain.lr"] == "0.003" and data.params["resolved.max_steps"] == "12"
    assert data.params["resolved.peak_flops_per_device"] == "unknown"
    assert data.params["profiles.cpu.model_preset"] == "tiny"

    # Export: safetensors + config + tokenizer; equal to the final checkpoint.
    model = load_pretrained(paths.pretrained_model)
    exported = json.loads((paths.pretrained_model / "config.json").read_text())
    assert exported["tokenizer_sha256"] == ShardIndex.load(paths.shards).tokenizer_sha256
    assert exported["training"]["global_step"] == 12
    assert (paths.pretrained_model / "tokenizer.json").read_bytes() == paths.tokenizer_file.read_bytes()
    ckpt = torch.load(ckpt_dir(paths) / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["bigmodel_ops"]["meta"]["run_id"] == run.info.run_id
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["state_dict"][f"model.{name}"]), name
    assert (ckpt_dir(paths) / "step-00000012.ckpt").is_file()

    # Registry: <project>-base with alias latest-pretrain pointing at this run's model folder.
    version = client.get_model_version_by_alias("pt-test-base", "latest-pretrain")
    assert version.run_id == run.info.run_id and str(version.version) == report["model_version"]
    assert version.source.endswith("/model")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= artifacts
    on_disk = json.loads(paths.pretrain_report.read_text())
    assert on_disk["global_step"] == 12 and on_disk["val_loss"] == pytest.approx(report["val_loss"])
    assert math.isclose(on_disk["val_perplexity"], math.exp(on_disk["val_loss"]), rel_tol=1e-9)


def test_pretrain_masked_objective_with_accumulation_and_token_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    # max_tokens 3000 at 4 x 32 x 2 (accumulation) = 256 tokens per step -> 12 steps.
    params, paths, _ = make_project(
        tmp_path,
        model={"objective": "masked"},
        profiles={"max_steps": None, "max_tokens": 3000},
        pretrain={"grad_accum": 2, "lr": 5e-3, "sampling": "sequential"},
    )
    monkeypatch.chdir(tmp_path)
    report = run_pretrain(params, paths=paths, quiet=True)
    assert report["global_step"] == 12 and report["tokens"] == 12 * 256
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)
    losses = _history(client, run.info.run_id, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert load_pretrained(paths.pretrained_model).config.objective == "masked"


def test_whole_word_masking_in_the_stage_trains_and_keeps_val_loss_on_token_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths, _ = make_project(
        tmp_path, model={"objective": "masked"}, pretrain={"masking": "word", "lr": 5e-3}
    )
    monkeypatch.chdir(tmp_path)
    vocab = Tokenizer.from_file(str(paths.tokenizer_file)).get_vocab()
    pieces = sorted(i for token, i in vocab.items() if token.startswith("##"))
    inputs = check_inputs(params, paths)
    assert pieces and list(inputs.datamodule.spec.continuation_ids) == pieces
    assert inputs.fingerprint["masking"] == "word"
    token_inputs = check_inputs(parse_params(raw_params(model={"objective": "masked"})), paths)
    assert token_inputs.datamodule.spec.continuation_ids == () and "masking" not in token_inputs.fingerprint
    report = run_pretrain(params, paths=paths, quiet=True)
    assert report["global_step"] == 12
    (run,) = _pretrain_runs(MlflowClient(mlflow_store))
    assert run.data.params["pretrain.masking"] == "word"
    # The same val batches (token masking at val_mask_rate) as a token-masking run would score.
    val = inputs.datamodule.val_dataloader().dataset
    assert val.spec.continuation_ids == () and val.spec.mask_rate == params.pretrain.val_mask_rate


def test_electra_replaces_only_the_filled_slots_with_generator_samples():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 90, size=(6, 40))
    tokens[0, 5:] = 2  # a row of separators (protected): fewer unprotected tokens than slots
    inputs, positions, labels = mask_tokens(
        tokens, rng=rng, mask_rate=0.3, mask_id=4, protected_ids=np.array([2]), random_ids=np.arange(5, 90)
    )
    assert (labels == IGNORE_INDEX).any()  # the short row leaves slots unfilled
    logits = torch.randn(6, positions.shape[1], 128)
    logits[..., 90:] = 100.0  # padding ids would win every draw if they were not excluded
    original, corrupted = replace_with_samples(
        torch.tensor(inputs), torch.tensor(positions), torch.tensor(labels), logits, vocab_size=90
    )
    assert torch.equal(original, torch.tensor(tokens))  # the masked rows, restored
    slots = np.zeros(tokens.shape, dtype=bool)
    np.put_along_axis(slots, positions, labels != IGNORE_INDEX, axis=1)
    changed = (corrupted != original).numpy()
    assert not changed[~slots].any()  # nothing outside the filled slots moves
    assert changed[slots].mean() > 0.9  # 90 ids to draw from: a sample rarely equals the original
    assert int(corrupted.max()) < 90


def test_electra_module_trains_generator_discriminator_and_head_with_shared_embeddings():
    config = ModelConfig(vocab_size=90, block_size=32, n_layer=2, n_head=2, n_embd=32, objective="masked")
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.1)
    module = LMModule(
        config, optim, total_steps=4, electra=ElectraConfig(generator_layers=1, rtd_weight=50.0)
    )
    assert len(module.generator.blocks) == 1 and module.generator.wte is module.model.wte
    rng = np.random.default_rng(1)
    inputs, positions, labels = mask_tokens(
        rng.integers(5, 90, size=(4, 32)), rng=rng, mask_rate=0.25, mask_id=4,
        protected_ids=np.array([2]), random_ids=np.arange(5, 90),
    )  # fmt: skip
    batch = {
        "input_ids": torch.tensor(inputs),
        "positions": torch.tensor(positions),
        "labels": torch.tensor(labels),
    }
    loss = module._electra_loss(batch)
    generator_loss = module._loss(batch)  # what validation reports: the generator's MLM loss
    # At init the discriminator guesses 50/50: about log 2 per position, times rtd_weight.
    assert loss.item() == pytest.approx(generator_loss.item() + 50.0 * math.log(2), rel=0.1)
    loss.backward()
    for name in ("model.blocks.0.attn.qkv.weight", "generator.blocks.0.attn.qkv.weight", "rtd_head.weight"):
        assert module.get_parameter(name).grad.abs().sum() > 0, name
    optimised = {
        id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]
    }
    assert {id(p) for p in module.parameters()} == optimised


def test_electra_in_the_stage_exports_only_the_discriminator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths, _ = make_project(
        tmp_path, model={"objective": "masked"}, pretrain={"task": "electra", "generator_layers": 1}
    )
    monkeypatch.chdir(tmp_path)
    inputs = check_inputs(params, paths)
    assert inputs.fingerprint["task"] == "electra" and inputs.fingerprint["rtd_weight"] == 50.0
    report = run_pretrain(params, paths=paths, quiet=True)
    assert report["global_step"] == 12
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)
    assert run.data.params["pretrain.task"] == "electra"
    losses = _history(client, run.info.run_id, "train/loss")
    assert losses[-1][1] < losses[0][1] - 5.0, losses  # mostly the RTD head learning the base rate
    # val/loss is the generator's MLM loss, with its gap to the unigram entropy.
    assert report["val_gap_to_unigram"] == pytest.approx(report["unigram_entropy"] - report["val_loss"])
    # The exported backbone is the discriminator alone: a plain masked TransformerLM.
    model = load_pretrained(paths.pretrained_model)
    ckpt = torch.load(ckpt_dir(paths) / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("generator.blocks.") for k in ckpt["state_dict"])
    assert model.config.objective == "masked" and report["n_params"] == model.num_parameters()
    # FLOPs (for MFU) count the generator too: more than the same backbone's masked LM.
    mlm = training_flops_per_token(model.config, n_params=model.num_parameters(), mask_rate=0.15)
    assert float(run.data.params["resolved.flops_per_token"]) > mlm
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["state_dict"][f"model.{name}"]), name


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ---------------------------------------------------------------------------------------------


def _assert_no_outputs(paths) -> None:
    assert not paths.pretrained_model.exists()
    assert not paths.pretrain_report.exists()
    assert not paths.pretrain_checkpoints.exists()


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides):
    params, paths, _ = make_project(tmp_path, **overrides)
    monkeypatch.chdir(tmp_path)
    return params, paths


def test_block_size_longer_than_a_split_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(tmp_path, monkeypatch, val_docs=4, model={"block_size": 48})
    with pytest.raises(DataError, match=r"split 'val' has \d+ tokens, fewer than block_size \+ 1 = 49"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_sequential_batch_larger_than_train_split_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(
        tmp_path, monkeypatch, train_docs=20, pretrain={"sampling": "sequential"}, profiles={"batch_size": 64}
    )
    with pytest.raises(DataError, match="fewer than one sequential batch"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_tokenizer_hash_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(tmp_path, monkeypatch)
    write_shards(paths, tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="differs from the tokenizer the shards .* were made with"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_vocab_mismatch_between_index_and_tokenizer_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params, paths = _project(tmp_path, monkeypatch)
    index = ShardIndex.load(paths.shards)
    write_shards(paths, vocab_size=index.vocab_size + 100)
    with pytest.raises(DataError, match=rf"vocab_size {index.vocab_size + 100} does not match the tokenizer"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_truncated_shard_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(tmp_path, monkeypatch)
    shard = paths.shards / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match="train_00001.bin: truncated or corrupt shard"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_empty_split_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(tmp_path, monkeypatch)
    raw = json.loads((paths.shards / "index.json").read_text())
    raw["splits"]["val"] = []
    (paths.shards / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="split 'val' has no tokens"):
        run_pretrain(params, paths=paths, quiet=True)
    _assert_no_outputs(paths)


def test_checkpoint_of_another_model_config_is_refused_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params, paths = _project(
        tmp_path, monkeypatch, profiles={"max_steps": 4}, pretrain={"register_model": False}
    )
    run_pretrain(params, paths=paths, quiet=True)
    last = ckpt_dir(paths) / "last.ckpt"
    before = last.read_bytes()
    changed = parse_params(
        raw_params(
            profiles={"max_steps": 8},
            model={"n_embd": 48},
            pretrain={"register_model": False, "resume_from": str(last)},
        )
    )
    with pytest.raises(
        CheckpointError, match=r"(?s)step 4\).*model.n_embd: checkpoint 32, params 48.*delete .*checkpoints"
    ):
        run_pretrain(changed, paths=paths, quiet=True)
    assert last.read_bytes() == before
    assert load_pretrained(paths.pretrained_model).config.n_embd == 32  # the finished export is kept


def test_changed_settings_train_in_their_own_folder_and_keep_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    params, paths = _project(
        tmp_path, monkeypatch, profiles={"max_steps": 4}, pretrain={"register_model": False}
    )
    run_pretrain(params, paths=paths, quiet=True)
    first = ckpt_dir(paths)
    before = (first / "last.ckpt").read_bytes()
    changed = parse_params(
        raw_params(profiles={"max_steps": 4}, pretrain={"register_model": False, "lr": 5e-4})
    )
    with caplog.at_level("WARNING"):
        report = run_pretrain(changed, paths=paths, quiet=True)
    assert report["resumed_from_step"] is None and report["global_step"] == 4
    assert "pretraining starts from step 0" in caplog.text and str(first) in caplog.text
    folders = sorted(paths.pretrain_checkpoints.glob("config-*"))
    assert len(folders) == 2 and first in folders
    assert (first / "last.ckpt").read_bytes() == before
    # Raising only the budget continues the same configuration.
    more = parse_params(raw_params(profiles={"max_steps": 6}, pretrain={"register_model": False, "lr": 5e-4}))
    assert run_pretrain(more, paths=paths, quiet=True)["resumed_from_step"] == 4


def test_resume_from_a_missing_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params, paths = _project(tmp_path, monkeypatch, pretrain={"resume_from": "nope/last.ckpt"})
    with pytest.raises(
        CheckpointError, match="nope/last.ckpt: checkpoint named by pretrain.resume_from does not exist"
    ):
        run_pretrain(params, paths=paths, quiet=True)


def test_nan_loss_stops_keeps_last_good_checkpoint_and_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    params, paths = _project(tmp_path, monkeypatch, tracking={"log_every_n_steps": 5})
    poison = PoisonAtStep(5)  # the loss of the 6th step
    with pytest.raises(TrainingDiverged, match="NaN/inf .* last good checkpoint is kept"):
        run_pretrain(params, paths=paths, quiet=True, callbacks=[poison])
    assert poison.fired
    # Checkpoint at step 4 is the last one: the step-8 checkpoint of the NaN state was refused.
    names = sorted(p.name for p in ckpt_dir(paths).glob("*.ckpt"))
    assert names == ["last.ckpt", "step-00000004.ckpt"]
    point = find_resume_point(ckpt_dir(paths))
    assert point.global_step == 4
    state = torch.load(point.path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    (run,) = _pretrain_runs(MlflowClient(mlflow_store))
    assert run.info.status == "FAILED"
    assert not paths.pretrained_model.exists() and not paths.pretrain_report.exists()


def test_corrupt_last_checkpoint_falls_back_to_newest_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params, paths = _project(
        tmp_path, monkeypatch, profiles={"max_steps": 4}, pretrain={"register_model": False}
    )
    run_pretrain(params, paths=paths, quiet=True)
    last = ckpt_dir(paths) / "last.ckpt"
    good = last.read_bytes()
    last.unlink()  # break the hard link before corrupting
    last.write_bytes(good[: len(good) // 2])  # a torn write
    point = find_resume_point(ckpt_dir(paths))
    assert point.path.name == "step-00000004.ckpt" and point.global_step == 4
    # And the stage resumes from it and finishes.
    more = parse_params(raw_params(profiles={"max_steps": 6}, pretrain={"register_model": False}))
    report = run_pretrain(more, paths=paths, quiet=True)
    assert report["resumed_from_step"] == 4 and report["global_step"] == 6


# ---------------------------------------------------------------------------------------------
# The console
# ---------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _bar_states(out: str) -> list[str]:
    """The states the training bar was drawn in (tqdm redraws a line with carriage returns)."""
    return [part.strip() for part in re.split(r"[\r\n]", out) if part.strip().startswith("Training")]


def test_progress_bar_counts_optimizer_steps_across_epochs_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    # 60 train docs: a few batches per epoch, so 8 steps x 2 accumulated batches cross epochs.
    params, paths = _project(
        tmp_path,
        monkeypatch,
        train_docs=60,
        profiles={"max_steps": 8},
        tracking={"log_every_n_steps": 2},
        pretrain={"grad_accum": 2, "register_model": False},
    )
    handler = _Records()
    loggers = [logging.getLogger(f"lightning.{p}.utilities.rank_zero") for p in ("pytorch", "fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        report = run_pretrain(params, paths=paths, quiet=False)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    states = _bar_states(capsys.readouterr().out)
    assert report["global_step"] == 8
    steps = [int(m.group(1)) for s in states if (m := re.search(r"\| (\d+)/8 \[", s))]
    assert steps and steps[-1] == 8 and steps == sorted(steps), states  # one bar, never restarting
    assert not [s for s in states if "/?" in s], states
    assert re.search(
        r"8/8 \[[\d:]+<00:00, +[\d.]+step/s, epoch=[1-9], loss=[\d.]+, val_loss=[\d.]+\]", states[-1]
    )
    # Lightning's own chatter is gone; what it says about this run is not.
    assert any("`Trainer.fit` stopped" in m for m in handler.messages), handler.messages
    assert not [m for m in handler.messages if "Tip:" in m or "available: " in m], handler.messages

    # A resumed run's bar starts at the resumed step.
    more = parse_params(
        raw_params(
            profiles={"max_steps": 10},
            tracking={"log_every_n_steps": 2},
            pretrain={"grad_accum": 2, "register_model": False},
        )
    )
    assert run_pretrain(more, paths=paths, quiet=False)["resumed_from_step"] == 8
    states = _bar_states(capsys.readouterr().out)
    assert states[0].startswith("Training:  80%") and "| 8/10 [" in states[0], states
    assert "| 10/10 [" in states[-1], states
