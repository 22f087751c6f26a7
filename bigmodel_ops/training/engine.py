"""Trainer construction shared by the pretrain stage and the throughput benchmark.

Plain arguments only (no params schema), so the GPU benchmark can build exactly the
stage's Trainer on a machine without pydantic or MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from bigmodel_ops.errors import FSDP_NEEDS_GPU, ConfigError


def resolve_accelerator(accelerator: str) -> str:
    """ "auto" becomes "gpu" when CUDA is available, else "cpu"."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def resolve_precision(precision: str, accelerator: str) -> str:
    """ "auto" is bf16-mixed on CUDA (Ampere and newer support it natively), 32-true elsewhere."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if resolve_accelerator(accelerator) == "gpu" else "32-true"


def devices_per_node(accelerator: str, devices: int | str) -> int:
    if isinstance(devices, int):
        return devices
    # Lightning's "auto": every visible GPU, one CPU process.
    return max(1, torch.cuda.device_count()) if resolve_accelerator(accelerator) == "gpu" else 1


def configure_torch(accelerator: str) -> None:
    """TF32 matmuls on Ampere+ for any fp32 work left under mixed precision (no effect on CPU)."""
    if resolve_accelerator(accelerator) == "gpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def _strategy(strategy: str, accelerator: str) -> object:
    if strategy == "fsdp" and resolve_accelerator(accelerator) != "gpu":
        # The schema refuses an explicit cpu; "auto" only resolves here, on a machine without CUDA.
        raise ConfigError(f"accelerator {accelerator!r} resolved to cpu: {FSDP_NEEDS_GPU}")
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Gradients are views into the all-reduce buckets: one copy fewer per step.
        # The backend follows the accelerator (gloo on CPU, nccl on GPU).
        return DDPStrategy(gradient_as_bucket_view=True)
    return strategy  # "auto" or "fsdp"


def build_trainer(
    *,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
    precision: str,
    max_steps: int,
    accumulate_grad_batches: int,
    gradient_clip_val: float,
    val_every_n_steps: int | None,
    callbacks: Sequence[Callback],
    quiet: bool,
    enable_checkpointing: bool,
    default_root_dir: Path | str,
    progress_refresh: int = 10,
) -> pl.Trainer:
    """The Trainer of the pretrain stage.

    No Lightning logger (tracking is our callback), no sanity validation (the val split was
    checked up front, and it would cost a startup delay on every resume), no distributed
    sampler (our loader shards batches by rank itself). Validation runs every
    val_every_n_steps optimizer steps regardless of epochs; None disables it.
    """
    callbacks = list(callbacks)
    if not quiet:
        callbacks.append(TQDMProgressBar(refresh_rate=progress_refresh))
    val_kwargs: dict = {"limit_val_batches": 0}
    if val_every_n_steps is not None:
        val_kwargs = {
            # Lightning counts training batches, not optimizer steps, here.
            "val_check_interval": val_every_n_steps * accumulate_grad_batches,
            "check_val_every_n_epoch": None,
        }
    return pl.Trainer(
        accelerator=resolve_accelerator(accelerator),
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(strategy, accelerator),
        precision=resolve_precision(precision, accelerator),
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val if gradient_clip_val > 0 else None,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=str(default_root_dir),
        **val_kwargs,
    )
