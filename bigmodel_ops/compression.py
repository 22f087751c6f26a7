"""Compressed variants of a fine-tuned classifier, checked and measured against the fp32 model.

The library of the ``compress`` stage (:mod:`bigmodel_ops.pipeline.compress`) and of
``benchmarks/compression.py``. Three variants of a :class:`~bigmodel_ops.classification.export.TextClassifier`:

- ``int8``: PyTorch dynamic quantisation of the Linear layers the classifier runs (the unused
  LM head stays as it is): int8 weights, activations quantised per batch at run time
  (``torch.ao.quantization.quantize_dynamic``; deprecated in favour of torchao, which is not a
  dependency, and still the eager-mode API that ships with torch 2.13). Saved by
  :func:`save_int8` as safetensors, never pickle: each quantised weight as its int8 values plus
  scale and zero point (the packed quantised tensors themselves are not safetensors-serialisable),
  rebuilt exactly by :func:`load_int8`.
- ``onnx``: the fp32 model exported to ONNX and run with onnxruntime; its logits must equal
  torch's within a tolerance on a fixed batch, else CheckpointError naming the file.
- ``onnx_int8``: the ONNX model with onnxruntime's dynamic quantisation of MatMul / Gemm (the same
  Linear layers as ``int8``).

The ONNX side (export, quantisation, onnxruntime sessions, the check) is
:mod:`bigmodel_ops.onnx_export`; this module holds the torch int8 variant and the measuring.

:func:`compress_classifier` builds them into a folder and measures each against the fp32 model on
labeled texts: accuracy and its drop in points, prediction agreement (%), CPU latency at batch 1
and 32 (median of interleaved calls, :func:`measure_latency`) and weight-file size, as ratios
against the fp32 model measured in the same run. Latency is the model's forward pass on
pre-tokenised batches: tokenisation is the same for every variant and is left out of the ratios.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bigmodel_ops import onnx_export
from bigmodel_ops.classification.export import (
    TextClassifier,
    read_classifier_config,
    text_classifier,
)
from bigmodel_ops.classification.inputs import collate, tokenize_texts
from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.contract import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.model import ModelConfig, TransformerLM
from bigmodel_ops.onnx_export import ONNX_FILE, ONNX_INT8_FILE, Runner

_logger = logging.getLogger(__name__)

INT8_FORMAT = "bigmodel_ops.classifier-int8/1"
INT8_WEIGHTS = "model.int8.safetensors"
REPORT_FILE = "report.json"
BATCH_SIZES = (1, 32)
HEADLINE_BATCH = 32  # `<variant>_speedup` is the batch-32 ratio (b1 is reported beside it)
VARIANTS = ("int8", "onnx", "onnx_int8")


@dataclass(frozen=True)
class Settings:
    """What :func:`compress_classifier` does; the ``compress`` params section maps onto it."""

    exporter: str = "dynamo"
    onnx_opset: int = 18
    onnx_int8: bool = True
    tolerance: float = 1e-3  # max abs logit difference, ONNX fp32 vs torch, on the check batch
    check_batch: int = 32  # the fixed batch: the first texts
    batch_size: int = 64  # scoring batches
    latency_repeats: int = 20
    latency_warmup: int = 2
    max_acc_drop_points: float = 1.0
    # Intra-op threads of torch and onnxruntime while measuring; 0: torch's default (all cores). 1 is
    # robust on a shared machine: with the cores oversubscribed, torch's OpenMP barriers stall
    # (a 2-thread fp32 forward measured 40x slower than 1-thread) while onnxruntime degrades less.
    threads: int = 1


@dataclass
class Result:
    metrics: dict[str, float]
    report: dict[str, Any]
    over_budget: list[str] = field(default_factory=list)  # variants whose accuracy dropped too much


# ---- int8 (torch) ------------------------------------------------------------------------------


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers the classifier runs: all but the backbone's LM head."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "backbone.lm_head"
    ]


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """torch.ao.quantization warns that it moves to torchao; that is known and said in the docs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated.*")
        yield


def quantize_int8(model: SequenceClassifier) -> nn.Module:
    """A copy of model with int8 dynamic quantisation of :func:`quantizable_linears` (eval mode)."""
    import copy

    return _quantize_linears(copy.deepcopy(model).eval(), quantizable_linears(model))


def _quantize_linears(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """model with int8 dynamic quantisation of its Linear layers ``names`` (eval mode): the one call
    of torch's quantiser, for :func:`quantize_int8` and :func:`load_int8` alike."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet_deprecations():
        return quantize_dynamic(model, set(names), dtype=torch.qint8).eval()


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def save_int8(qmodel: nn.Module, directory: Path, *, classifier_dir: Path) -> Path:
    """Write model.int8.safetensors, config.json and tokenizer.json into directory (must exist).

    Each quantised Linear ``<name>`` is stored as ``<name>.weight_int8`` (int8), ``.weight_scale``
    and ``.weight_zero_point`` (per tensor, or per output channel with ``.weight_axis``) and
    ``.bias``; every other tensor of the model as it is (a tied LM head once, as its embedding).
    """
    from safetensors.torch import save_file

    quantized = _quantized_modules(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, str] = {}
    for name, module in quantized.items():
        weight, bias = module._weight_bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
            schemes[name] = "per_tensor"
        else:
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float64).contiguous()
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
            tensors[f"{name}.weight_axis"] = torch.tensor([weight.q_per_channel_axis()], dtype=torch.int64)
            schemes[name] = "per_channel"
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    seen: set[int] = set()
    for key, value in qmodel.state_dict().items():
        if not isinstance(value, torch.Tensor) or any(key.startswith(f"{n}.") for n in quantized):
            continue
        if value.data_ptr() in seen:  # a tied LM head: TransformerLM re-ties it at load
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(directory / INT8_WEIGHTS))
    config = read_classifier_config(classifier_dir)
    payload = {**config, "format": INT8_FORMAT, "quantized": schemes, "dtype": "qint8"}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    shutil.copyfile(classifier_dir / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    return directory / INT8_WEIGHTS


def load_int8(directory: Path | str) -> TextClassifier:
    """The int8 classifier written by :func:`save_int8` (safetensors; no pickle).

    The quantised weights are rebuilt from their stored int8 values, scales and zero points, so
    the loaded model computes exactly what was saved. CheckpointError names the file on a mismatch.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights = directory / CONFIG_FILE, directory / INT8_WEIGHTS
    try:
        payload = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file}: cannot read the int8 classifier config: {error}") from None
    if payload.get("format") != INT8_FORMAT:
        raise CheckpointError(f"{config_file}: not an int8 classifier (format {payload.get('format')!r})")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: int8 weights not found")
    labels = [str(label) for label in payload["labels"]]
    model = SequenceClassifier(
        TransformerLM(ModelConfig.from_dict(payload["config"])),
        num_labels=len(labels),
        dropout=0.0,
        pooling=str(payload["pooling"]),
    ).eval()
    names = sorted(payload["quantized"])
    if names != sorted(quantizable_linears(model)):
        raise CheckpointError(f"{config_file}: quantised layers {names} do not match the model")
    try:
        tensors = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type on a bad file
        raise CheckpointError(f"{weights}: cannot read int8 weights: {error}") from None
    mismatch = f"{weights}: int8 weights do not match {config_file}"
    # 1. the fp32 tensors (embeddings, norms, ...) into the fp32 model; a tied LM head follows wte
    quantized = {k: v for k, v in tensors.items() if any(k.startswith(f"{n}.") for n in names)}
    rest = {k: v for k, v in tensors.items() if k not in quantized}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{mismatch}: {error}") from None
    expected_missing = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    if model.backbone.lm_head.weight is model.backbone.wte.weight:
        expected_missing.add("backbone.lm_head.weight")
    if set(missing) - expected_missing or unexpected:
        raise CheckpointError(
            f"{mismatch}: missing {sorted(set(missing) - expected_missing)}, unexpected {unexpected}"
        )
    # 2. quantise the same layers, then put the stored int8 weights in place
    qmodel = _quantize_linears(model, names)
    modules = _quantized_modules(qmodel)
    try:
        for name in names:
            weight = _int8_weight(quantized, name, payload["quantized"][name])
            modules[name].set_weight_bias(weight, quantized.get(f"{name}.bias"))
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{mismatch}: {name}: {error}") from None
    return text_classifier(qmodel, directory, payload)


def _int8_weight(tensors: dict[str, torch.Tensor], name: str, scheme: str) -> torch.Tensor:
    """The quantised weight of layer name from its stored int8 values, scale(s) and zero point(s):
    dequantised in float64 and quantised again with the same scale, which gives back the same int8
    values (checked)."""
    q = tensors[f"{name}.weight_int8"]
    scale = tensors[f"{name}.weight_scale"].double()
    zero = tensors[f"{name}.weight_zero_point"].long()
    with _quiet_deprecations():
        if scheme == "per_tensor":
            dq = (q.double() - zero.item()) * scale.item()
            weight = torch.quantize_per_tensor(dq.float(), scale.item(), int(zero.item()), torch.qint8)
        else:
            axis = int(tensors[f"{name}.weight_axis"].item())
            shape = [1] * q.dim()
            shape[axis] = -1
            dq = (q.double() - zero.view(shape)) * scale.view(shape)
            weight = torch.quantize_per_channel(dq.float(), scale, zero, axis, torch.qint8)
    if not torch.equal(weight.int_repr(), q):
        raise ValueError("the stored int8 weights do not round-trip")
    return weight


# ---- measuring ---------------------------------------------------------------------------------


def torch_runner(model: nn.Module) -> Runner:
    model.eval()

    def run(idx: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(idx, lengths).float().numpy()

    return run


def encode(classifier: TextClassifier, texts: Sequence[str]) -> list[list[int]]:
    objective = classifier.model.backbone.config.objective
    return tokenize_texts(
        classifier.tokenizer, [str(t) for t in texts], objective=objective, truncation=classifier.truncation
    )


def make_batch(ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate([(row, 0) for row in ids])
    return batch["idx"], batch["lengths"]


def predict_logits(runner: Runner, ids: Sequence[list[int]], *, batch_size: int) -> np.ndarray:
    chunks = [runner(*make_batch(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)


def compare(y: np.ndarray, reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy, its drop from the reference's in points, and prediction agreement in %."""
    ref_pred, pred = reference.argmax(axis=1), logits.argmax(axis=1)
    acc, ref_acc = float((pred == y).mean()), float((ref_pred == y).mean())
    return {
        "test_acc": acc,
        "acc_drop_points": 100.0 * (ref_acc - acc),
        "agreement": 100.0 * float((pred == ref_pred).mean()),
        "max_abs_logit_diff": float(np.max(np.abs(logits - reference))),
    }


def measure_latency(
    runners: dict[str, Runner],
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]],
    *,
    repeats: int,
    warmup: int,
) -> dict[str, dict[int, float]]:
    """Median wall time (ms) of each runner on each batch, the runners interleaved: each round
    times every runner once, in an order rotated each round, so that load from other processes
    and the after-effects of one runner on the next fall on all of them alike."""
    names = list(runners)
    result: dict[str, dict[int, float]] = {name: {} for name in names}
    for size, batch in batches.items():
        for _ in range(warmup):
            for name in names:
                runners[name](*batch)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                runners[name](*batch)
                times[name].append((time.perf_counter() - start) * 1000.0)
        for name in names:
            result[name][size] = float(np.median(times[name]))
    return result


def file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def latency_batches(ids: Sequence[list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 1 and 32 texts of the split (texts repeat when it is smaller)."""
    ids = list(ids) or [[0]]
    return {size: make_batch([ids[i % len(ids)] for i in range(size)]) for size in BATCH_SIZES}


def compress_classifier(
    classifier: TextClassifier,
    classifier_dir: Path,
    texts: Sequence[str],
    y: np.ndarray,
    out_dir: Path,
    *,
    settings: Settings,
) -> Result:
    """Build the variants into out_dir (which must exist) and measure them against the fp32 model.

    Files: model.int8.safetensors + config.json + tokenizer.json (:func:`load_int8` reads them),
    model.onnx, model.int8.onnx (with ``settings.onnx_int8``) and report.json. Raises
    CheckpointError when the ONNX export disagrees with torch beyond ``settings.tolerance``.
    """
    with _threads(settings.threads):
        return _compress(classifier, classifier_dir, texts, y, out_dir, settings=settings)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compress(
    classifier: TextClassifier,
    classifier_dir: Path,
    texts: Sequence[str],
    y: np.ndarray,
    out_dir: Path,
    *,
    settings: Settings,
) -> Result:
    fp32 = classifier.model.eval()
    ids = encode(classifier, texts)
    reference = torch_runner(fp32)
    check_batch = make_batch(ids[: settings.check_batch])

    started = time.perf_counter()
    save_int8(quantize_int8(fp32), out_dir, classifier_dir=classifier_dir)
    int8 = load_int8(out_dir)  # what is measured is what was saved
    onnx_path = onnx_export.export_onnx(
        fp32,
        out_dir / ONNX_FILE,
        example=make_batch(ids[:2]),
        opset=settings.onnx_opset,
        exporter=settings.exporter,
    )
    runners: dict[str, Runner] = {"fp32": reference, "int8": torch_runner(int8.model)}
    runners["onnx"] = onnx_export.onnx_runner(onnx_path)
    onnx_diff = onnx_export.check_onnx(
        runners["onnx"], reference, check_batch, tolerance=settings.tolerance, path=onnx_path
    )
    files = {"fp32": classifier_dir / WEIGHTS_FILE, "int8": out_dir / INT8_WEIGHTS, "onnx": onnx_path}
    if settings.onnx_int8:
        files["onnx_int8"] = onnx_export.quantize_onnx(onnx_path, out_dir / ONNX_INT8_FILE)
        runners["onnx_int8"] = onnx_export.onnx_runner(files["onnx_int8"])
    build_s = time.perf_counter() - started

    logits = {name: predict_logits(run, ids, batch_size=settings.batch_size) for name, run in runners.items()}
    latency = measure_latency(
        runners, latency_batches(ids), repeats=settings.latency_repeats, warmup=settings.latency_warmup
    )
    sizes = {name: file_mb(path) for name, path in files.items()}

    base = compare(y, logits["fp32"], logits["fp32"])
    metrics: dict[str, float] = {
        "fp32_test_acc": base["test_acc"],
        "fp32_size_mb": sizes["fp32"],
        **{f"fp32_latency_b{b}_ms": latency["fp32"][b] for b in BATCH_SIZES},
        "onnx_check_max_abs_diff": onnx_diff,
        "test_examples": float(len(y)),
        "build_seconds": build_s,
    }
    over_budget = []
    for name in (v for v in VARIANTS if v in runners):
        figures = compare(y, logits["fp32"], logits[name])
        metrics.update({f"{name}_{key}": value for key, value in figures.items()})
        metrics[f"{name}_size_mb"] = sizes[name]
        metrics[f"{name}_size_ratio"] = sizes[name] / sizes["fp32"]
        for b in BATCH_SIZES:
            metrics[f"{name}_latency_b{b}_ms"] = latency[name][b]
            metrics[f"{name}_speedup_b{b}"] = latency["fp32"][b] / latency[name][b]
        metrics[f"{name}_speedup"] = metrics[f"{name}_speedup_b{HEADLINE_BATCH}"]
        within = figures["acc_drop_points"] <= settings.max_acc_drop_points
        metrics[f"{name}_within_budget"] = float(within)
        if not within:
            over_budget.append(name)
    report = {
        "metrics": metrics,
        "settings": settings.__dict__,
        "files": {name: path.name for name, path in files.items()},
        "latency": "median ms of the model's forward pass on pre-tokenised batches of 1 and 32 test "
        f"texts, {settings.latency_repeats} interleaved rounds; speedup = fp32 / variant at batch "
        f"{HEADLINE_BATCH}",
        "size": "bytes of the weight file (fp32: model.safetensors of the classifier), in MB",
        "quantizer": {
            "int8": "torch.ao.quantization.quantize_dynamic, qint8 weights, Linear layers",
            "onnx_int8": "onnxruntime.quantization.quantize_dynamic, QInt8 weights, MatMul/Gemm",
        },
        "versions": {"torch": torch.__version__, **onnx_export.versions()},
        "threads": torch.get_num_threads(),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return Result(metrics=metrics, report=report, over_budget=over_budget)
