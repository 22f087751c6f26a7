"""`bigmodel-ops export-hf`: the classifier and the backbone in the Hugging Face `transformers` format.

Writes ``outputs/hf/classifier`` (from ``outputs/finetune/model``) and ``outputs/hf/backbone``
(from ``outputs/pretrain/model``), each with config.json, model.safetensors and the tokenizer files
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that ``AutoTokenizer`` loads; the
tokenizer pads on the right with ``[PAD]``, adds ``[CLS] ... [SEP]`` and truncates to the model's
``max_length`` (classifier) or context (backbone), exactly as bigmodel_ops tokenizes.

Architectures (:func:`hf_architecture`):

- **GPT-2, stock** (``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification``, no remote code): a
  causal backbone without ALiBi, and its classifier with ``last`` pooling. Our model is GPT-2's
  computation exactly (pre-LN blocks, fused qkv, GELU tanh, learned positions, tied embeddings,
  final LayerNorm); GPT-2's Conv1D stores weights transposed, and a model trained without biases
  gets zero biases. ``GPT2ForSequenceClassification`` pools the rightmost token that is not
  ``pad_token_id`` (0), which on right-padded input is our ``last`` real token (always ``[SEP]``).
  Its ``score`` head has no bias: ours is folded into ``ln_f``'s bias, ``ln_f.bias += pinv(W) @ b``
  (exact when the head's rows are independent, checked): the logits are ours, only the final
  hidden state of the *classifier* export is shifted by that constant.
- **Custom** (:mod:`bigmodel_ops.hf_modeling`, copied as ``modeling_bigmodel.py`` and named in
  config.json's ``auto_map``; load with ``trust_remote_code=True``): everything else, i.e. a masked
  (bidirectional pre-LN) backbone, which matches no stock BERT-family model (BERT and RoBERTa are
  post-LN with an embedding LayerNorm; RoBERTa-PreLayerNorm and XLM-R-XL add an embedding
  LayerNorm or offset positions and a tanh pooler head), ALiBi, and ``mean`` pooling.

Needs the ``transformers`` package (a dev extra; the pipeline never imports it). Each folder is
published atomically; an export whose models are missing is a CheckpointError (exit 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bigmodel_ops.contract import CLS_ID, CONFIG_FILE, MASK_ID, PAD_ID, SEP_ID, TOKENIZER_FILE, UNK_ID
from bigmodel_ops.errors import BigModelOpsError, CheckpointError
from bigmodel_ops.paths import ProjectPaths

CUSTOM_MODULE = "modeling_bigmodel"
# ModelConfig fields the exporters know how to map; a new field must be taught here first.
KNOWN_FIELDS = {
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "objective",
    "tie_embeddings",
    "alibi",
}


def hf_architecture(config: Any, pooling: str | None = None) -> str:
    """``gpt2`` where the stock GPT-2 classes compute exactly our model, else ``bigmodel`` (custom)."""
    alibi = bool(getattr(config, "alibi", False))
    if config.objective == "causal" and not alibi and pooling in (None, "last"):
        return "gpt2"
    return "bigmodel"


def require_transformers(what: str = "export-hf") -> Any:
    """The ``transformers`` module; a BigModelOpsError naming ``what`` needs it when not installed."""
    try:
        import transformers
    except ImportError:
        raise BigModelOpsError(
            f"{what} needs the Hugging Face transformers package: pip install transformers"
        ) from None
    return transformers


def _check_known(config: Any, where: Path) -> None:
    unknown = set(config.to_dict()) - KNOWN_FIELDS
    if unknown:
        raise CheckpointError(
            f"{where / CONFIG_FILE}: model config fields {sorted(unknown)} are not known to export-hf "
            "(bigmodel_ops/export_hf.py must map them first)"
        )


# ---- weights -------------------------------------------------------------------------------


def _zeros_if_none(tensor: Any, size: int) -> Any:
    import torch

    return tensor.detach().clone() if tensor is not None else torch.zeros(size)


def gpt2_state_dict(lm: Any) -> dict[str, Any]:
    """Our TransformerLM's weights under GPT-2's names (``transformer.*``, Conv1D transposed)."""
    cfg = lm.config
    C = cfg.n_embd
    sd: dict[str, Any] = {
        "transformer.wte.weight": lm.wte.weight.detach().clone(),
        "transformer.wpe.weight": lm.wpe.weight.detach().clone(),
        "transformer.ln_f.weight": lm.ln_f.weight.detach().clone(),
        "transformer.ln_f.bias": _zeros_if_none(lm.ln_f.bias, C),
    }
    for i, block in enumerate(lm.blocks):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = block.ln_1.weight.detach().clone()
        sd[p + "ln_1.bias"] = _zeros_if_none(block.ln_1.bias, C)
        sd[p + "ln_2.weight"] = block.ln_2.weight.detach().clone()
        sd[p + "ln_2.bias"] = _zeros_if_none(block.ln_2.bias, C)
        for ours, theirs, out in (
            (block.attn.qkv, "attn.c_attn", 3 * C),
            (block.attn.proj, "attn.c_proj", C),
            (block.mlp.fc, "mlp.c_fc", 4 * C),
            (block.mlp.proj, "mlp.c_proj", C),
        ):
            sd[p + theirs + ".weight"] = ours.weight.detach().t().contiguous()
            sd[p + theirs + ".bias"] = _zeros_if_none(ours.bias, out)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = lm.lm_head.weight.detach().clone()
    return sd


def _fold_head_bias(weight: Any, bias: Any) -> Any:
    """delta (C,) with weight @ delta == bias: GPT-2's bias-free score head on a shifted ln_f."""
    import torch

    w, b = weight.detach().double(), bias.detach().double()
    delta = torch.linalg.pinv(w) @ b
    residual = float((w @ delta - b).abs().max()) if b.numel() else 0.0
    if residual > 1e-6 * max(1.0, float(b.abs().max())):
        raise ValueError(f"head bias cannot be folded into ln_f (residual {residual:.2e})")
    return delta.to(weight.dtype)


# ---- configs -------------------------------------------------------------------------------


def _gpt2_config(transformers: Any, cfg: Any, **extra: Any) -> Any:
    return transformers.GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=cfg.tie_embeddings,
        **extra,
    )


def _custom_config(cls: Any, cfg: Any, *, pooling: str | None, arch: str, **extra: Any) -> Any:
    values = cfg.to_dict()
    values.pop("tie_embeddings")
    values["vocab_size"] = cfg.padded_vocab_size
    config = cls(
        **values,
        pooling=pooling or "cls",
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
        **extra,
    )
    config.architectures = [arch]
    config.auto_map = {
        "AutoConfig": f"{CUSTOM_MODULE}.BigModelConfig",
        "AutoModel": f"{CUSTOM_MODULE}.BigModelModel",
        "AutoModelForMaskedLM": f"{CUSTOM_MODULE}.BigModelForMaskedLM",
        "AutoModelForCausalLM": f"{CUSTOM_MODULE}.BigModelForCausalLM",
        "AutoModelForSequenceClassification": f"{CUSTOM_MODULE}.BigModelForSequenceClassification",
    }
    return config


def _custom_module() -> Any:
    from bigmodel_ops import hf_modeling

    return hf_modeling


def _load_strict(model: Any, state: dict[str, Any], where: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head is not in the state dict; transformers re-ties it.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: export mapping mismatch: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings and hasattr(model, "tie_weights"):
        model.tie_weights()


# ---- folders -------------------------------------------------------------------------------


def _save_tokenizer(
    transformers: Any, tokenizer_file: Path, folder: Path, *, max_length: int, side: str = "right"
) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for ``AutoTokenizer``;
    ``side`` is the end that truncation cuts (right: the head is kept, left: the tail)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    names = {
        "pad_token": PAD_ID,
        "unk_token": UNK_ID,
        "cls_token": CLS_ID,
        "sep_token": SEP_ID,
        "mask_token": MASK_ID,
    }
    specials = {key: tokenizer.id_to_token(index) for key, index in names.items()}
    missing = [key for key, token in specials.items() if token is None]
    if missing:
        raise CheckpointError(f"{tokenizer_file}: no token at the special ids of {missing}")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        padding_side="right",
        truncation_side=side,
        bos_token=specials["cls_token"],
        eos_token=specials["sep_token"],
        **specials,
    )
    fast.save_pretrained(str(folder))


def _write_backbone(transformers: Any, source: Path, folder: Path) -> dict[str, Any]:
    from bigmodel_ops.model import load_pretrained

    lm = load_pretrained(source).eval()
    cfg = lm.config
    _check_known(cfg, source)
    arch = hf_architecture(cfg)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(_gpt2_config(transformers, cfg))
        _load_strict(model, gpt2_state_dict(lm), source)
        class_name = "GPT2LMHeadModel"
    else:
        module = _custom_module()
        class_name = "BigModelForCausalLM" if cfg.objective == "causal" else "BigModelForMaskedLM"
        config = _custom_config(module.BigModelConfig, cfg, pooling=None, arch=class_name)
        model = getattr(module, class_name)(config)
        state = {f"transformer.{k}": v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        if not cfg.tie_embeddings:
            state["lm_head.weight"] = lm.lm_head.weight.detach().clone()
        _load_strict(model, state, source)
    model.save_pretrained(str(folder))
    _save_tokenizer(transformers, source / TOKENIZER_FILE, folder, max_length=cfg.block_size)
    if arch != "gpt2":
        _copy_custom_module(folder)
    return {"architecture": class_name, "remote_code": arch != "gpt2"}


def _write_classifier(transformers: Any, source: Path, folder: Path) -> dict[str, Any]:
    from bigmodel_ops.classification.export import load_classifier

    classifier = load_classifier(source)
    side = _truncation_side(classifier.truncation, source)  # refused before anything is written
    model_ours = classifier.model.eval()
    lm = model_ours.backbone
    cfg = lm.config
    _check_known(cfg, source)
    labels = classifier.labels
    label_maps = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    arch = hf_architecture(cfg, model_ours.pooling)
    weight, bias = model_ours.head.weight.detach(), model_ours.head.bias.detach()
    if arch == "gpt2":
        try:
            delta = _fold_head_bias(weight, bias)
        except ValueError:
            arch = "bigmodel"
    if arch == "gpt2":
        model = transformers.GPT2ForSequenceClassification(_gpt2_config(transformers, cfg, **label_maps))
        state = {k: v for k, v in gpt2_state_dict(lm).items() if k != "lm_head.weight"}
        state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + delta
        state["score.weight"] = weight.clone()
        _load_strict(model, state, source)
        class_name = "GPT2ForSequenceClassification"
    else:
        module = _custom_module()
        class_name = "BigModelForSequenceClassification"
        config = _custom_config(
            module.BigModelConfig, cfg, pooling=model_ours.pooling, arch=class_name, **label_maps
        )
        model = module.BigModelForSequenceClassification(config)
        state = {f"transformer.{k}": v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        state["head.weight"], state["head.bias"] = weight.clone(), bias.clone()
        _load_strict(model, state, source)
    model.save_pretrained(str(folder))
    _save_tokenizer(
        transformers,
        source / TOKENIZER_FILE,
        folder,
        max_length=classifier.max_length,
        side=side,
    )
    if arch != "gpt2":
        _copy_custom_module(folder)
    return {"architecture": class_name, "remote_code": arch != "gpt2", "labels": labels}


def _truncation_side(truncation: Any, source: Path) -> str:
    """The tokenizer's truncation_side for the classifier's truncation; CheckpointError for
    head_tail, which a transformers tokenizer cannot do (it would read other tokens than ours)."""
    if truncation.keep == "head_tail":
        raise CheckpointError(
            f"{source / CONFIG_FILE}: truncation head_tail (the first and the last tokens of a long "
            "text) has no transformers tokenizer setting; export a classifier fine-tuned with "
            "finetune.truncation head or tail"
        )
    return "left" if truncation.keep == "tail" else "right"


def _copy_custom_module(folder: Path) -> None:
    shutil.copyfile(_custom_module().__file__, folder / f"{CUSTOM_MODULE}.py")


def export_hf(paths: ProjectPaths, *, out: Path | None = None) -> dict[str, Any]:
    """Export the fine-tuned classifier and the pretrained backbone in the Hugging Face transformers format.

    Writes ``<out>/classifier`` and ``<out>/backbone`` (``out`` defaults to ``outputs/hf``) for
    those of ``outputs/finetune/model`` and ``outputs/pretrain/model`` that exist; CheckpointError
    (before anything is written) when neither does. Returns {name: {folder, architecture,
    remote_code, ...}}, also written to ``<out>/export.json``.
    """
    from bigmodel_ops.classification.export import read_classifier_config
    from bigmodel_ops.contract import check_model_dir
    from bigmodel_ops.fsutil import publish

    out = Path(out) if out is not None else paths.outputs / "hf"
    sources: dict[str, Path] = {}
    problems = []
    try:
        read_classifier_config(paths.classifier)
        sources["classifier"] = paths.classifier
    except CheckpointError as error:
        problems.append(str(error))
    try:
        check_model_dir(paths.pretrained_model)
        sources["backbone"] = paths.pretrained_model
    except CheckpointError as error:
        problems.append(str(error))
    if not sources:
        raise CheckpointError("nothing to export: " + "; ".join(problems))
    transformers = require_transformers()
    writers = {"classifier": _write_classifier, "backbone": _write_backbone}
    result: dict[str, Any] = {}
    for name, source in sources.items():
        target = out / name
        with publish(target) as pub:
            folder = pub.staged(target)
            folder.mkdir()
            info = writers[name](transformers, source, folder)
        result[name] = {"folder": str(target), "source": str(source), **info}
    for problem in problems:
        result.setdefault("skipped", []).append(problem)
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
