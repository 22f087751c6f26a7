"""The compress section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bigmodel_ops.config._base import PositiveInt, _Strict


class CompressParams(_Strict):
    """The compress stage: int8 dynamic quantisation (torch) and ONNX (onnxruntime, fp32 and int8)
    of the fine-tuned classifier, each measured against the fp32 model (bigmodel_ops/compression.py)."""

    enabled: bool = True  # false: the stage writes a report saying so and measures nothing
    # dynamo: torch.export-based (torch's default exporter, needs onnxscript); torchscript: the older
    # tracing exporter (dynamo=False), deprecated by torch but a few seconds faster.
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    onnx_opset: int = Field(default=18, ge=14, le=23)
    onnx_int8: bool = True  # also onnxruntime's dynamic int8 quantisation of the ONNX model
    # ONNX vs torch: max abs logit difference allowed on a fixed batch (the first check_batch test
    # texts); above it the stage fails naming the file and publishes nothing.
    tolerance: float = Field(default=1e-3, gt=0.0)
    check_batch: PositiveInt = 32
    batch_size: PositiveInt = 64
    # Median CPU latency at batch 1 and 32 over this many rounds, fp32 and variants interleaved.
    latency_repeats: PositiveInt = 20
    latency_warmup: int = Field(default=2, ge=0)
    # Intra-op threads of torch and onnxruntime while compressing and measuring; 0: torch's default
    # (all cores). 1 keeps the ratios meaningful on a shared machine, where torch's multi-threaded
    # kernels stall when the cores are oversubscribed.
    latency_threads: int = Field(default=1, ge=0)
    # Test accuracy a variant may lose, in points; beyond it: warn (report and tags say so) or fail.
    max_acc_drop_points: float = Field(default=1.0, ge=0.0)
    on_acc_drop: Literal["warn", "fail"] = "warn"
    # Also write the classifier and the pretrained backbone in the Hugging Face transformers format
    # under outputs/compress/hf (what `bigmodel-ops export-hf` writes); needs the transformers package.
    huggingface: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        if self.exporter == "dynamo" and self.onnx_opset < 18:
            raise ValueError("compress.onnx_opset must be >= 18 with the dynamo exporter")
        return self
