"""The fine-tuning setup from params, shared by the tune and finetune stages."""

from __future__ import annotations

from bigmodel_ops.classification.training import FitConfig, HyperParams
from bigmodel_ops.config import Params
from bigmodel_ops.trainer import resolve_precision


def fit_config(params: Params) -> FitConfig:
    """The run's fixed setup (labels, seed, hardware) of the tune and finetune stages."""
    sizing = params.sizing
    return FitConfig(
        num_labels=len(params.prepare.labels),
        seed=params.project.seed,
        accelerator=sizing.accelerator,
        devices=sizing.devices,
        num_nodes=sizing.num_nodes,
        strategy=sizing.strategy,
        precision=resolve_precision(sizing.precision, sizing.accelerator),
        num_workers=sizing.num_workers,
    )


def hyperparams(params: Params) -> HyperParams:
    """Every fine-tuning setting of ``params.finetune`` (a trial or best_params.yaml overrides
    some of them with :meth:`HyperParams.override`)."""
    return HyperParams.from_dict(params.finetune.model_dump(mode="json"))
