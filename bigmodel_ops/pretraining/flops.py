"""Peak FLOP/s of known accelerators and model FLOPs utilisation (MFU).

Only dense (not 2:4-sparse) tensor-core peaks are listed: vendor sheets often quote the
sparse figure, which is twice as high and would halve the reported MFU. Lightning's own
table has no H200 entry (Lightning issue #20660), hence this one.

Unknown hardware (CPUs included) has no entry: MFU is then reported as "unknown", never
as a made-up number.
"""

from __future__ import annotations

from bigmodel_ops.model import ModelConfig

# (device-name fragment, precision class) -> dense peak FLOP/s. Checked in order, so the
# more specific fragments come first. "bf16" covers bf16/fp16 mixed precision; "tf32" is
# fp32 training with TF32 matmuls (torch.set_float32_matmul_precision("high")).
_PEAKS: list[tuple[str, str, float]] = [
    ("H200", "bf16", 989e12),
    ("H200", "tf32", 494.5e12),
    ("H100", "bf16", 989e12),  # SXM; the PCIe part is slower but rarely named differently
    ("H100", "tf32", 494.5e12),
    ("A100", "bf16", 312e12),
    ("A100", "tf32", 156e12),
]


def precision_class(precision: str) -> str:
    """Map a Lightning precision string to the peak-table class ("bf16" or "tf32")."""
    return "bf16" if precision.startswith(("bf16", "16")) else "tf32"


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for this precision, or None when unknown (e.g. CPU)."""
    if not device_name:
        return None
    cls = precision_class(precision)
    upper = device_name.upper()
    for fragment, kind, value in _PEAKS:
        if fragment in upper and kind == cls:
            return value
    return None


def cuda_device_name() -> str | None:
    """Name of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def training_flops_per_token(config: ModelConfig, *, n_params: int, mask_rate: float | None = None) -> float:
    """Training FLOPs per input token: 6N + attention (PaLM appendix B).

    For the masked objective the LM head runs only at the masked positions, so its share
    of 6N is scaled by the mask rate instead of counted for every token (otherwise MFU
    would be flattered by work that is never done).
    """
    flops = 6.0 * n_params + 12.0 * config.n_layer * config.n_embd * config.block_size
    if config.objective == "masked" and mask_rate is not None:
        head = 6.0 * config.padded_vocab_size * config.n_embd
        flops -= head * (1.0 - mask_rate)
    return flops


def mfu(*, tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved FLOP/s over the peak of all devices; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
