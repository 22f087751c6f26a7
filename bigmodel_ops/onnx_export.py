"""The ONNX variants of a fine-tuned classifier: export, onnxruntime quantisation, run and check.

One job: turn the fp32 :class:`~bigmodel_ops.classification.model.SequenceClassifier` into ONNX
files and run them with onnxruntime, for :mod:`bigmodel_ops.compression` (which builds and
measures every variant):

- :func:`export_onnx`: the fp32 model as one ONNX file (the torch.export-based exporter by
  default, or the older tracing one), inputs ``idx`` / ``lengths``, output ``logits``, dynamic
  batch and sequence length;
- :func:`quantize_onnx`: onnxruntime's dynamic quantisation of its MatMul / Gemm nodes (the
  ``onnx_int8`` variant: the same Linear layers as torch's ``int8``);
- :func:`onnx_runner`: an onnxruntime CPU session as a :data:`Runner`;
- :func:`check_onnx`: the exported model's logits must equal torch's within a tolerance on a fixed
  batch, else CheckpointError naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel_ops.classification.model import SequenceClassifier
from bigmodel_ops.errors import CheckpointError

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
INPUT_NAMES = ("idx", "lengths")
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "torchscript")

# Runs a model on (idx, lengths) and returns (B, num_labels) float32 logits.
Runner = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def export_onnx(
    model: SequenceClassifier,
    path: Path,
    *,
    example: tuple[torch.Tensor, torch.Tensor],
    opset: int,
    exporter: str,
) -> Path:
    """Export model (fp32) to one ONNX file: inputs idx (batch, seq) and lengths (batch), int64;
    output logits (batch, num_labels). Batch and sequence length are dynamic (seq up to block_size).

    ``dynamo``: the torch.export-based exporter (torch's default since 2.9; needs onnxscript).
    ``torchscript``: the older tracing exporter (``dynamo=False``), deprecated by torch, faster to run.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = model.eval()
    kwargs: dict[str, Any]
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("seq", max=model.backbone.config.block_size)
        kwargs = {"dynamic_shapes": ({0: batch, 1: seq}, {0: batch}), "external_data": False}
    else:
        kwargs = {
            "dynamic_axes": {
                "idx": {0: "batch", 1: "seq"},
                "lengths": {0: "batch"},
                OUTPUT_NAME: {0: "batch"},
            }
        }
    export_logger = logging.getLogger("torch.onnx")
    level = export_logger.level
    export_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Discard()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=exporter == "dynamo",
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                verbose=False,
                **kwargs,
            )
    finally:
        export_logger.setLevel(level)
    return path


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def quantize_onnx(source: Path, target: Path) -> Path:
    """onnxruntime dynamic quantisation (int8 weights) of the MatMul / Gemm nodes of source,
    after onnxruntime's pre-processing (shape inference and graph optimisation)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(
            str(prepared), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    return target


def onnx_runner(path: Path) -> Runner:
    """An onnxruntime CPU session on path, with torch's thread count and no spinning threads (an
    idle spinning pool would steal the CPU from the variant timed next)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {error}") from None

    def run(idx: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        return session.run([OUTPUT_NAME], {"idx": idx.numpy(), "lengths": lengths.numpy()})[0]

    return run


def check_onnx(
    runner: Runner,
    reference: Runner,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    tolerance: float,
    path: Path,
) -> float:
    """Max abs difference of the logits on batch; CheckpointError naming path above tolerance."""
    got, want = runner(*batch), reference(*batch)
    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not np.isfinite(diff) or diff > tolerance:
        raise CheckpointError(
            f"{path}: the ONNX export disagrees with the torch model: max abs logit difference "
            f"{diff:.3g} on a fixed batch of {batch[0].shape[0]} texts (shape {got.shape} vs "
            f"{want.shape}), above the tolerance {tolerance:g} (compress.tolerance); nothing was published"
        )
    return diff


def versions() -> dict[str, str]:
    """The versions of onnx and onnxruntime (for the report)."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
