"""The fine-tuning setup from params, shared by the tune and finetune stages."""

from __future__ import annotations

from collections.abc import Sequence

from bigmodel_ops.classification.inputs import TokenizedSplit, load_splits
from bigmodel_ops.classification.training import FitConfig, HyperParams
from bigmodel_ops.config import Params
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.trainer import resolve_precision


def fit_config(params: Params) -> FitConfig:
    """The run's fixed setup (labels, seed, hardware) of the tune and finetune stages; the
    precision is ``finetune.precision`` when set, else the active profile's."""
    sizing = params.sizing
    return FitConfig(
        num_labels=len(params.prepare.labels),
        seed=params.project.seed,
        accelerator=sizing.accelerator,
        devices=sizing.devices,
        num_nodes=sizing.num_nodes,
        strategy=sizing.strategy,
        precision=resolve_precision(params.finetune.precision or sizing.precision, sizing.accelerator),
        num_workers=sizing.num_workers,
    )


def hyperparams(params: Params) -> HyperParams:
    """Every fine-tuning setting of ``params.finetune`` (a trial or best_params.yaml overrides
    some of them with :meth:`HyperParams.override`)."""
    return HyperParams.from_dict(params.finetune.model_dump(mode="json"))


def stage_splits(
    params: Params, paths: ProjectPaths, *, splits: Sequence[str] = ("train", "val")
) -> dict[str, TokenizedSplit]:
    """The prepared ``splits`` tokenised with the pretrained model's tokenizer as fine-tuning reads
    them (``finetune.max_length`` / ``truncation`` / ``head_tokens``); the errors of
    :func:`~bigmodel_ops.classification.inputs.load_splits`."""
    finetune = params.finetune
    return load_splits(
        prepared=paths.prepared,
        model_dir=paths.pretrained_model,
        labels=params.prepare.labels,
        max_length=finetune.max_length,
        truncation=finetune.truncation,
        head_tokens=finetune.head_tokens,
        splits=splits,
    )
