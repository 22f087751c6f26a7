"""The fine-tuning setup from params, shared by the tune and finetune stages."""

from __future__ import annotations

from bigmodel_ops.classification.training import FitConfig
from bigmodel_ops.config import Params
from bigmodel_ops.trainer import resolve_precision


def fit_config(params: Params) -> FitConfig:
    """The fine-tuning setup (all but the searched hyperparameters) of the tune and finetune stages."""
    sizing, ft = params.sizing, params.finetune
    return FitConfig(
        num_labels=len(params.prepare.labels),
        seed=params.project.seed,
        warmup_ratio=ft.warmup_ratio,
        freeze_backbone=ft.freeze_backbone,
        grad_clip=ft.grad_clip,
        accelerator=sizing.accelerator,
        devices=sizing.devices,
        num_nodes=sizing.num_nodes,
        strategy=sizing.strategy,
        precision=resolve_precision(sizing.precision, sizing.accelerator),
        num_workers=sizing.num_workers,
    )
