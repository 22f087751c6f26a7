"""SequenceClassifier, metrics, input checks and the safetensors export (bigmodel_ops.classification)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigmodel_ops.classification.export import load_classifier, save_classifier
from bigmodel_ops.classification.inputs import collate, load_splits, read_labeled_split, tokenize_texts
from bigmodel_ops.classification.metrics import confusion_matrix, metrics_from_confusion
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.classification.training import build_classifier
from bigmodel_ops.config import parse_params
from bigmodel_ops.contract import Truncation, load_tokenizer
from bigmodel_ops.contract import check_model_dir as check_pretrained_dir
from bigmodel_ops.errors import CheckpointError, ConfigError, DataError
from bigmodel_ops.model import TransformerLM, read_exported_config
from tests.helpers_finetune import LABELS, make_pretrained, make_project, make_texts, tiny_params, write_split
from tests.tiny import tiny_model_config


def _classifier(objective: str, *, num_labels: int = 3) -> SequenceClassifier:
    torch.manual_seed(0)
    backbone = TransformerLM(tiny_model_config(vocab_size=100, objective=objective))
    return SequenceClassifier(backbone, num_labels=num_labels, dropout=0.1).eval()


@pytest.mark.parametrize("objective,pooling", [("masked", "cls"), ("causal", "last")])
def test_forward_shapes_and_pooling(objective: str, pooling: str):
    model = _classifier(objective)
    assert model.pooling == pooling
    idx = torch.randint(5, 100, (4, 9))
    lengths = torch.tensor([9, 5, 1, 7])
    idx[1, 5:] = 0
    idx[2, 1:] = 0
    idx[3, 7:] = 0
    logits = model(idx, lengths)
    assert logits.shape == (4, 3)
    pooled = model.pool(idx, lengths)
    assert pooled.shape == (4, model.backbone.config.n_embd)
    if objective == "causal":
        # the last real token's state; causal attention needs no padding mask
        hidden = model.backbone.hidden(idx)
        expected = hidden[torch.arange(4), lengths - 1]
    else:
        mask = torch.arange(9)[None, :] < lengths[:, None]
        expected = model.backbone.hidden(idx, key_padding_mask=mask)[:, 0]
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_padding_does_not_change_logits(objective: str):
    model = _classifier(objective)
    short = [2, 17, 45, 9, 3]
    long = [2] + list(range(10, 30)) + [3]
    alone = collate([(short, 0)])
    padded = collate([(long, 0), (short, 1)])
    assert padded["idx"].shape[1] > alone["idx"].shape[1]
    with torch.no_grad():
        single = model(alone["idx"], alone["lengths"])[0]
        in_batch = model(padded["idx"], padded["lengths"])[1]
    assert torch.allclose(single, in_batch, atol=1e-5), (single, in_batch)


def test_masked_padding_would_matter_without_the_mask():
    # The check above is meaningful: without the key padding mask the CLS state does change.
    model = _classifier("masked")
    batch = collate([([2] + list(range(10, 30)) + [3], 0), ([2, 17, 45, 9, 3], 1)])
    alone = collate([([2, 17, 45, 9, 3], 1)])
    with torch.no_grad():
        unmasked = model.backbone.hidden(batch["idx"])[1, 0]
        reference = model.backbone.hidden(alone["idx"])[0, 0]
    assert not torch.allclose(unmasked, reference, atol=1e-5)


def test_metrics_by_hand():
    preds = torch.tensor([0, 0, 1, 1, 2, 0])
    targets = torch.tensor([0, 1, 1, 1, 2, 2])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx([1 / 3, 1.0, 1.0])
    assert m["recall"] == pytest.approx([1.0, 2 / 3, 0.5])
    f1 = [2 * p * r / (p + r) for p, r in zip(m["precision"], m["recall"], strict=True)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_metrics_agree_with_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 4, (200,), generator=generator)
    preds = torch.randint(0, 3, (200,), generator=generator)  # class 3 is never predicted
    m = metrics_from_confusion(confusion_matrix(preds, targets, 4))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(targets, preds))
    assert m["macro_f1"] == pytest.approx(
        sk.f1_score(targets, preds, average="macro", labels=range(4), zero_division=0)
    )
    assert m["precision"] == pytest.approx(
        list(sk.precision_score(targets, preds, average=None, labels=range(4), zero_division=0))
    )
    assert m["recall"] == pytest.approx(
        list(sk.recall_score(targets, preds, average=None, labels=range(4), zero_division=0))
    )


def test_tokenizer_truncates_including_specials(tmp_path: Path):
    make_pretrained(tmp_path / "model", [t for t, _ in make_texts(20, seed=0)], objective="masked")
    tokenizer = load_tokenizer(tmp_path / "model" / "tokenizer.json", max_length=6)
    ids = tokenize_texts(tokenizer, ["the film was great and the plot was lovely", ""], objective="masked")
    assert len(ids[0]) == 6 and ids[0][0] == 2 and ids[0][-1] == 3
    assert ids[1] == [2, 3]


def test_truncation_keeps_the_head_the_tail_or_both():
    ids = list(range(10, 20))  # 10 plays [CLS], 19 [SEP]
    assert Truncation(4).apply(ids) == [10, 11, 12, 13]
    assert Truncation(4, "tail").apply(ids) == [10, 17, 18, 19]
    assert Truncation(6, "head_tail", 2).apply(ids) == [10, 11, 16, 17, 18, 19]
    for keep, head in (("head", 0), ("tail", 0), ("head_tail", 3)):
        assert Truncation(10, keep, head).apply(ids) == ids  # short enough: unchanged
    with pytest.raises(ValueError, match="head_tokens must be between 1 and max_length - 1 = 5"):
        Truncation(6, "head_tail", 6)
    with pytest.raises(ValueError, match="truncation 'middle' is not one of"):
        Truncation(6, "middle")
    # config.json round trip; a folder written before truncation existed keeps the head
    cut = Truncation(6, "head_tail", 2)
    assert Truncation.from_config(cut.as_config(), source="c.json") == cut
    assert Truncation.from_config({"max_length": 8}, source="c.json") == Truncation(8)
    bad = {"max_length": 8, "truncation": "head_tail", "head_tokens": 9}
    with pytest.raises(CheckpointError, match=r"c\.json: invalid truncation settings: head_tokens"):
        Truncation.from_config(bad, source="c.json")


@pytest.mark.parametrize("keep", ["head", "tail", "head_tail"])
def test_a_classifier_reads_the_part_of_a_long_text_its_truncation_keeps(tmp_path: Path, keep: str):
    _, paths, _ = make_project(tmp_path, n_train=8, n_eval=4)
    model = build_classifier(paths.pretrained_model, num_labels=2, dropout=0.0).eval()
    save_classifier(
        model,
        tmp_path / "clf",
        labels=LABELS,
        max_length=12,
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
        truncation=keep,
        head_tokens=5,
    )
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.truncation == Truncation(12, keep, 5) and loaded.config["truncation"] == keep

    def text(first: str, middle: str, last: str) -> str:  # 29 tokens, each word one token
        return " ".join([first, *["film"] * 12, middle, *["film"] * 12, last])

    base = text("plot", "acting", "story")
    other_start = text("the", "acting", "story")
    other_middle = text("plot", "really", "story")
    other_end = text("plot", "acting", "quite")
    whole = load_tokenizer(tmp_path / "clf" / "tokenizer.json")
    assert len(whole.encode(base).ids) == 29  # the words are in this tiny vocabulary
    ids = tokenize_texts(loaded.tokenizer, [base], objective="masked", truncation=loaded.truncation)[0]
    assert len(ids) == 12 and ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP] whatever is kept
    logits = loaded.logits([base])

    def changes(other: str) -> bool:
        return not torch.allclose(loaded.logits([other]), logits, rtol=0.0, atol=1e-6)

    reads = {"start": changes(other_start), "middle": changes(other_middle), "end": changes(other_end)}
    expected = {
        "head": {"start": True, "middle": False, "end": False},
        "tail": {"start": False, "middle": False, "end": True},
        "head_tail": {"start": True, "middle": False, "end": True},
    }
    assert reads == expected[keep]


def test_val_batches_and_inference_batches_group_texts_of_similar_length(tmp_path: Path):
    import numpy as np

    from bigmodel_ops.classification.datamodule import ClassificationDataModule
    from bigmodel_ops.classification.inputs import TokenizedSplit

    lengths = [3, 9, 5, 12, 4, 12, 7, 2, 10, 6]
    split = TokenizedSplit(ids=[[2] + [7] * (n - 2) + [3] for n in lengths], labels=np.arange(10) % 2)
    data = ClassificationDataModule({"train": split, "val": split}, batch_size=4, seed=0)
    batches = list(data.val_dataloader())
    seen = [int(n) for batch in batches for n in batch["lengths"]]
    assert seen == sorted(lengths, reverse=True)  # longest first: each batch pads little
    assert [int(b["idx"].shape[1]) for b in batches] == [12, 7, 3]  # padded to 12, 7 and 3, not 12 each
    rows = torch.cat([b["rows"] for b in batches])
    assert sorted(rows.tolist()) == list(range(10))  # every row once, named by its split row
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.as_tensor(split.labels)[rows])
    assert [lengths[r] for r in rows.tolist()] == seen
    train = [int(n) for batch in data.train_dataloader() for n in batch["lengths"]]
    assert sorted(train) == sorted(lengths) and train != seen  # training order stays shuffled


def _grouped(lengths, *, batch_size, world=1, rank=0, seed=0, epoch=0, group_batches=5):
    from bigmodel_ops.classification.datamodule import LengthGroupedSampler

    sampler = LengthGroupedSampler(
        list(range(len(lengths))),
        lengths=lengths,
        batch_size=batch_size,
        num_replicas=world,
        rank=rank,
        seed=seed,
        group_batches=group_batches,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def test_length_grouped_training_batches_pad_less_cover_every_row_and_shard_like_plain_shuffling():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 256) for _ in range(400)]
    order = _grouped(lengths, batch_size=8)
    assert sorted(order) == list(range(400))  # every row once an epoch
    batches = [order[i : i + 8] for i in range(0, 400, 8)]

    def padded(batches):  # tokens computed when each batch is padded to its longest text
        return sum(max(lengths[r] for r in b) * len(b) for b in batches)

    plain = list(range(400))
    rng.shuffle(plain)
    assert padded(batches) < 0.8 * padded([plain[i : i + 8] for i in range(0, 400, 8)])
    for start in range(0, 50, 5):  # within a group of 5 batches, the batches hold disjoint length ranges
        spans = sorted(
            (min(lengths[r] for r in b), max(lengths[r] for r in b)) for b in batches[start : start + 5]
        )
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False)), spans
    # the batches of a group come in a shuffled order, not always longest first
    firsts = [_grouped(lengths, batch_size=8, epoch=e)[:8] for e in range(6)]
    assert any(
        max(lengths[r] for r in b) < max(lengths[r] for r in _grouped(lengths, batch_size=8, epoch=e)[:40])
        for e, b in enumerate(firsts)
    )
    # seeded by seed + epoch, the same on every call
    assert _grouped(lengths, batch_size=8, epoch=1) == _grouped(lengths, batch_size=8, epoch=1)
    assert _grouped(lengths, batch_size=8, epoch=1) != order != _grouped(lengths, batch_size=8, seed=1)
    # two ranks of 4: step i's two batches are together the batch i of one process of 8
    ranks = [_grouped(lengths, batch_size=4, world=2, rank=r) for r in range(2)]
    for i in range(50):
        together = ranks[0][4 * i : 4 * i + 4] + ranks[1][4 * i : 4 * i + 4]
        assert sorted(together) == sorted(batches[i]), i
    # an odd split on two ranks: rows repeat only to even out the ranks
    odd = [_grouped(lengths[:9], batch_size=4, world=2, rank=r) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 5 and set(odd[0] + odd[1]) == set(range(9))


def test_group_by_length_reaches_the_training_loader():
    import numpy as np

    from bigmodel_ops.classification.datamodule import ClassificationDataModule, LengthGroupedSampler
    from bigmodel_ops.classification.inputs import TokenizedSplit

    lengths = [3 + (7 * i) % 60 for i in range(64)]
    split = TokenizedSplit(ids=[[2] + [7] * (n - 2) + [3] for n in lengths], labels=np.arange(64) % 2)
    widths = {}
    for grouped in (False, True):
        data = ClassificationDataModule(
            {"train": split, "val": split}, batch_size=8, seed=0, group_by_length=grouped
        )
        loader = data.train_dataloader()
        assert isinstance(loader.sampler, LengthGroupedSampler) is grouped
        batches = list(loader)
        assert sorted(torch.cat([b["rows"] for b in batches]).tolist()) == list(range(64))
        widths[grouped] = sum(int(b["idx"].numel()) for b in batches)
    assert widths[True] < 0.8 * widths[False]


def test_truncation_settings_the_backbone_or_the_export_cannot_follow(tmp_path: Path):
    _, paths, _ = make_project(tmp_path, n_train=8, n_eval=4)
    block = read_exported_config(paths.pretrained_model)[0].block_size
    with pytest.raises(ConfigError, match=rf"capped at the backbone's block_size {block}\): head_tokens"):
        load_splits(
            prepared=paths.prepared,
            model_dir=paths.pretrained_model,
            labels=LABELS,
            max_length=block + 64,
            truncation="head_tail",
            head_tokens=block,
        )
    raw = tiny_params(finetune={"truncation": "head_tail", "head_tokens": 8}, compress={"huggingface": True})
    with pytest.raises(ConfigError, match="compress.huggingface: true cannot export a classifier with"):
        parse_params(raw)


def test_missing_pretrained_model_names_the_path(tmp_path: Path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        check_pretrained_dir(tmp_path / "nowhere")
    make_pretrained(tmp_path / "model", ["a b c"], objective="masked")
    (tmp_path / "model" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        check_pretrained_dir(tmp_path / "model")


def test_label_checks_name_file_and_row(tmp_path: Path):
    path = tmp_path / "train.parquet"
    write_split(path, [("good film", "positive"), ("odd", "neutral")], labels=LABELS)
    with pytest.raises(DataError, match=r"train\.parquet: row 1: label 'neutral' is not in prepare\.labels"):
        read_labeled_split(path, LABELS)
    write_split(path, [("good film", "positive"), ("bad film", "negative")], labels=["positive", "negative"])
    with pytest.raises(DataError, match=r"row 0: label_id 0 does not match label 'positive'"):
        read_labeled_split(path, LABELS)
    with pytest.raises(DataError, match="missing.parquet: labeled split not found"):
        read_labeled_split(tmp_path / "missing.parquet", LABELS)
    texts, ids = read_labeled_split(path, ["positive", "negative"])
    assert texts == ["good film", "bad film"] and ids.tolist() == [0, 1]


def test_tokenizer_without_cls_is_refused_for_masked(tmp_path: Path):
    make_pretrained(tmp_path / "model", ["a b c d"], objective="masked")
    tok_path = tmp_path / "model" / "tokenizer.json"
    data = json.loads(tok_path.read_text())
    data["post_processor"] = None
    tok_path.write_text(json.dumps(data))
    tokenizer = load_tokenizer(tok_path, max_length=8)
    with pytest.raises(CheckpointError, match=r"\[CLS\]"):
        tokenize_texts(tokenizer, ["a b"], objective="masked", source=str(tok_path))
    assert tokenize_texts(tokenizer, ["a b"], objective="causal")  # pooling the last token needs no CLS


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_export_roundtrip_gives_the_same_logits(tmp_path: Path, objective: str):
    params, paths, _ = make_project(tmp_path, objective=objective, n_train=8, n_eval=4)
    model = build_classifier(paths.pretrained_model, num_labels=2, dropout=0.1).eval()
    save_classifier(
        model,
        tmp_path / "clf",
        labels=LABELS,
        max_length=24,
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
        extra={"mlflow_run_id": "x"},
    )
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.labels == LABELS and loaded.config["mlflow_run_id"] == "x"
    splits = load_splits(
        prepared=paths.prepared,
        model_dir=paths.pretrained_model,
        labels=params.prepare.labels,
        max_length=params.finetune.max_length,
        splits=("val",),
    )
    batch = collate([(ids, 0) for ids in splits["val"].ids])
    with torch.no_grad():
        expected = model(batch["idx"], batch["lengths"])
    texts = read_labeled_split(paths.prepared / "val.parquet", LABELS)[0]
    widths: list[int] = []
    hook = loaded.model.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))
    # in the order of the texts, computed longest first (batches of similar length)
    torch.testing.assert_close(loaded.logits(texts, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    hook.remove()
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    # predict = the most probable label and its softmax probability, of the logits computed above
    labels, scores = loaded.predict(texts, batch_size=3)
    probs = torch.softmax(expected, dim=-1)
    assert labels == [LABELS[i] for i in probs.argmax(dim=-1).tolist()]
    assert scores == pytest.approx(probs.max(dim=-1).values.tolist(), abs=1e-5)


def test_load_classifier_refuses_a_backbone_export(tmp_path: Path):
    make_pretrained(tmp_path / "model", ["a b c"], objective="masked")
    with pytest.raises(CheckpointError, match="not a classifier export"):
        load_classifier(tmp_path / "model")
    with pytest.raises(CheckpointError, match="classifier not found"):
        load_classifier(tmp_path / "absent")


def test_params_accept_threshold_pruner_only_with_a_threshold():
    raw = tiny_params(tune={"pruner": "threshold"})
    with pytest.raises(Exception, match="prune_threshold"):
        parse_params(raw)
    raw = tiny_params(tune={"pruner": "threshold", "prune_threshold": 0.5})
    assert parse_params(raw).tune.prune_threshold == 0.5
