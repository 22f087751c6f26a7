"""`bigmodel-ops export-hf`: the exports load with Hugging Face transformers and give our logits.

Each case fabricates a pretrained backbone and a classifier (weights perturbed away from their
near-zero init, so a wrong mapping cannot hide), exports them, loads them back with
``AutoTokenizer`` / ``AutoModelForSequenceClassification`` / ``AutoModelFor{Causal,Masked}LM`` /
``AutoModel`` and compares with bigmodel_ops on a padded batch (within 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigmodel_ops.classification.export import load_classifier, save_classifier
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.cli import main
from bigmodel_ops.export_hf import export_hf
from bigmodel_ops.model import ModelConfig, TransformerLM, load_pretrained, save_pretrained
from bigmodel_ops.paths import ProjectPaths
from tests.helpers_finetune import LABELS, make_texts, train_tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXTS = [
    "a great film",
    "the plot was really quite boring and the acting was dull, a tedious story",
    "wonderful",
    "awful awful awful movie",
    "zzzz unknownword qqq",  # unknown pieces
]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)


def _project(root: Path, *, pooling: str, truncation: str = "head", **config) -> ProjectPaths:
    paths = ProjectPaths(root=root)
    texts = [t for t, _ in make_texts(64, seed=1)]
    paths.pretrained_model.mkdir(parents=True)
    train_tokenizer(texts, paths.pretrained_model / "tokenizer.json")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(paths.pretrained_model / "tokenizer.json")).get_vocab_size()
    values = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, **config)
    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(**values))
    _perturb(lm, seed=1)
    save_pretrained(lm, paths.pretrained_model)
    classifier = SequenceClassifier(lm, num_labels=len(LABELS), dropout=0.0, pooling=pooling)
    _perturb(classifier.head, seed=2)
    save_classifier(
        classifier,
        paths.classifier,
        labels=LABELS,
        max_length=16,  # < block_size: the long text is truncated, by us and by the HF tokenizer
        tokenizer_file=paths.pretrained_model / "tokenizer.json",
        truncation=truncation,
        head_tokens=6,
    )
    return paths


CASES = {
    # name: (objective, pooling, extra config, classifier architecture, backbone architecture)
    "causal-last": ("causal", "last", {}, "GPT2ForSequenceClassification", "GPT2LMHeadModel"),
    "causal-last-bias-untied": (
        "causal",
        "last",
        {"bias": True, "tie_embeddings": False},
        "GPT2ForSequenceClassification",
        "GPT2LMHeadModel",
    ),
    "causal-mean": ("causal", "mean", {}, "BigModelForSequenceClassification", "GPT2LMHeadModel"),
    "masked-cls": ("masked", "cls", {}, "BigModelForSequenceClassification", "BigModelForMaskedLM"),
    "masked-mean-max": ("masked", "mean_max", {}, "BigModelForSequenceClassification", "BigModelForMaskedLM"),
    "masked-mean-bias": (
        "masked",
        "mean",
        {"bias": True},
        "BigModelForSequenceClassification",
        "BigModelForMaskedLM",
    ),
}
if "alibi" in ModelConfig.__dataclass_fields__:
    CASES["causal-alibi"] = (
        "causal",
        "last",
        {"alibi": True},
        "BigModelForSequenceClassification",
        "BigModelForCausalLM",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_our_logits(tmp_path: Path, case: str):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    objective, pooling, extra, classifier_arch, backbone_arch = CASES[case]
    paths = _project(tmp_path, pooling=pooling, objective=objective, **extra)
    result = export_hf(paths)
    out = paths.outputs / "hf"
    assert result["classifier"]["architecture"] == classifier_arch
    assert result["backbone"]["architecture"] == backbone_arch
    assert json.loads((out / "export.json").read_text())["classifier"]["architecture"] == classifier_arch

    # classifier: tokenizer ids and logits, padded batch
    folder = out / "classifier"
    remote = result["classifier"]["remote_code"]
    assert (folder / "modeling_bigmodel.py").is_file() == remote
    tok = AutoTokenizer.from_pretrained(folder)
    ours = load_classifier(paths.classifier)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    expected_ids = [e.ids for e in ours.tokenizer.encode_batch(TEXTS)]
    for row, ids in enumerate(expected_ids):
        assert enc["input_ids"][row, : len(ids)].tolist() == ids
        assert int(enc["attention_mask"][row].sum()) == len(ids)
    assert max(map(len, expected_ids)) == 16 > min(map(len, expected_ids))  # truncation and padding
    hf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=remote).eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        theirs = hf(**enc).logits
    mine = ours.logits(TEXTS, batch_size=len(TEXTS))
    diff = float((theirs - mine).abs().max())
    print(f"{case}: classifier {classifier_arch} max |logit diff| {diff:.2e}")
    assert diff < TOL
    assert mine.abs().max() > 0.1  # the comparison is not between near-zero numbers

    # backbone: LM logits on the real positions of a padded batch, and hidden states
    folder = out / "backbone"
    remote = result["backbone"]["remote_code"]
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    lm = load_pretrained(paths.pretrained_model).eval()
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        mine_h = lm.hidden(enc["input_ids"], key_padding_mask=real if objective == "masked" else None)
        mine_lm = lm.lm_head(mine_h)
        auto = AutoModelForCausalLM if objective == "causal" else AutoModelForMaskedLM
        hf_lm = auto.from_pretrained(folder, trust_remote_code=remote).eval()
        theirs_lm = hf_lm(**enc).logits
        base = AutoModel.from_pretrained(folder, trust_remote_code=remote).eval()
        theirs_h = base(**enc).last_hidden_state
    diff_lm = float((theirs_lm[real] - mine_lm[real]).abs().max())
    diff_h = float((theirs_h[real] - mine_h[real]).abs().max())
    print(f"{case}: backbone {backbone_arch} max |logit diff| {diff_lm:.2e}, hidden {diff_h:.2e}")
    assert diff_lm < TOL and diff_h < TOL
    if not extra.get("tie_embeddings", True):
        assert not torch.equal(hf_lm.get_output_embeddings().weight, hf_lm.get_input_embeddings().weight)


def test_export_hf_before_a_model_exists(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    assert main(["export-hf", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bigmodel-ops export-hf: error: nothing to export" in err
    assert "classifier not found (run the finetune stage first)" in err
    assert "pretrained model not found (run the pretrain stage first)" in err
    assert not (tmp_path / "outputs" / "hf").exists()


def test_export_hf_keeps_the_tail_and_refuses_head_tail(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bigmodel_ops.classification.inputs import tokenize_texts
    from bigmodel_ops.errors import CheckpointError

    paths = _project(tmp_path / "tail", pooling="mean", truncation="tail", objective="masked")
    export_hf(paths)
    folder = paths.outputs / "hf" / "classifier"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.truncation_side == "left"
    ours = load_classifier(paths.classifier)
    expected = tokenize_texts(ours.tokenizer, TEXTS, objective="masked", truncation=ours.truncation)
    enc = tok(TEXTS, truncation=True)
    assert enc["input_ids"] == expected and max(map(len, expected)) == 16  # [CLS] + the last 15
    hf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = hf(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits
    assert float((theirs - ours.logits(TEXTS)).abs().max()) < TOL

    # head_tail has no transformers setting: refused, naming the config, and nothing is written
    paths = _project(tmp_path / "both", pooling="mean", truncation="head_tail", objective="masked")
    with pytest.raises(CheckpointError, match=r"model/config\.json: truncation head_tail .* no transformers"):
        export_hf(paths)
    assert not (paths.outputs / "hf").exists()
