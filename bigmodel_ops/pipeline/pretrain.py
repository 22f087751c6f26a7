"""Pretrain the transformer LM (masked or causal) with Lightning on the token shards; resumes from the last checkpoint; exports safetensors and registers `<project>-base`.

Named steps, cheap checks first so that bad input fails in seconds and leaves nothing:

1. :func:`check_inputs`: shards index, tokenizer (hash and vocabulary agree with the index),
   token ids, special ids, block size and one batch per rank fit the splits; the step budget;
2. :func:`resume_point`: the latest checkpoint of this configuration (or ``pretrain.resume_from``);
   it must match the model config and the data/optimisation fingerprint, else CheckpointError
   (never a silent restart). Its MLflow run id is re-attached, so one run spans every resume;
3. :func:`fit`: Lightning fit (resumes weights, optimizer, schedule, RNG and data position), a
   final validation, the divergence check; SIGTERM finishes the step in progress, checkpoints it
   and stops (run KILLED, exit 143: :class:`~bigmodel_ops.pretraining.callbacks.GuardedCheckpoint`);
4. :func:`export`: rank 0 writes model.safetensors + config.json + tokenizer.json from the final
   checkpoint (published atomically), the metrics report, logs the model folder and registers
   ``<project>-base`` with alias ``latest-pretrain``.

Runs unchanged under Lightning's DDP launcher (which re-runs the command for the other ranks),
torchrun (``deploy/torchrun.sh``) or SLURM (``deploy/slurm.sbatch``): only global rank 0 logs and
writes outputs (one MLflow run, one set of checkpoints). ``devices`` x ``num_nodes`` processes
with ``batch_size`` B train on exactly the batches (and validate on exactly the rows) of one
process with batch B x world size: each rank reads its own rows of every global batch
(:class:`~bigmodel_ops.pretraining.data.TrainBatches`), and the logged train loss is the mean
over the ranks. The algorithms are in :mod:`bigmodel_ops.pretraining`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch import seed_everything

from bigmodel_ops.config import Params, flatten
from bigmodel_ops.config.sections import PretrainParams
from bigmodel_ops.fsutil import write_json_atomic
from bigmodel_ops.model import ModelConfig, config_from_preset
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import stage_run
from bigmodel_ops.pretraining.callbacks import GuardedCheckpoint
from bigmodel_ops.pretraining.checkpoints import (
    ResumePoint,
    check_compatible,
    checkpoint_dir,
    find_resume_point,
    other_configurations,
    resume_point_from_file,
)
from bigmodel_ops.pretraining.data import DataSpec, PretrainDataModule, unigram_entropy
from bigmodel_ops.pretraining.export import export_from_checkpoint
from bigmodel_ops.pretraining.flops import cuda_device_name, peak_flops, training_flops_per_token
from bigmodel_ops.pretraining.inputs import (
    budget_steps,
    check_token_ids,
    check_tokenizer,
    continuation_ids,
    special_ids,
)
from bigmodel_ops.pretraining.lm_module import ElectraConfig, LMModule, OptimConfig
from bigmodel_ops.shards import ShardIndex
from bigmodel_ops.trainer import (
    MetricsCallback,
    build_trainer,
    configure_torch,
    devices_per_node,
    resolve_accelerator,
    resolve_precision,
)

_logger = logging.getLogger(__name__)

STAGE = "pretrain"
MODEL_ARTIFACT_PATH = "model"
REGISTRY_ALIAS = "latest-pretrain"
_ENTROPY_TOKENS = 10_000_000


@dataclass
class Inputs:
    """What step 1 checked and derived: everything training needs besides the resume point."""

    index: ShardIndex
    tokenizer_sha: str
    config: ModelConfig
    special: dict[str, int]
    datamodule: PretrainDataModule
    accelerator: str
    precision: str
    world_size: int
    tokens_per_step: int
    max_steps: int
    fingerprint: dict[str, Any]
    unigram_entropy: float  # of the val tokens the objective predicts: the loss to beat


def build_model_config(params: Params, *, vocab_size: int) -> ModelConfig:
    m = params.model
    return config_from_preset(
        params.sizing.model_preset,
        vocab_size=vocab_size,
        objective=m.objective,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        dropout=m.dropout,
        bias=m.bias,
        alibi=m.alibi if m.alibi is not None else m.objective == "masked",
    )


def optim_config(pre: PretrainParams) -> OptimConfig:
    """The optimizer settings of the ``pretrain`` section (AdamW, warmup + cosine to ``min_lr``)."""
    return OptimConfig(
        lr=pre.lr,
        min_lr=pre.min_lr,
        warmup_steps=pre.warmup_steps,
        weight_decay=pre.weight_decay,
        beta1=pre.beta1,
        beta2=pre.beta2,
    )


def check_inputs(params: Params, paths: ProjectPaths) -> Inputs:
    """Step 1: DataError for bad shards / tokenizer / block size, before any run is opened."""
    sizing, pre = params.sizing, params.pretrain
    index = ShardIndex.load(paths.shards)
    tokenizer_sha, vocab_size = check_tokenizer(paths.tokenizer_file, index)
    config = build_model_config(params, vocab_size=vocab_size)
    check_token_ids(index, vocab_size=config.vocab_size)
    special = special_ids(index, objective=config.objective)
    spec = DataSpec(
        objective=config.objective,
        block_size=config.block_size,
        batch_size=sizing.batch_size,
        seed=params.project.seed,
        sampling=pre.sampling,
        mask_rate=pre.mask_rate,
        val_mask_rate=pre.val_mask_rate,
        mask_id=special.get("mask", 0),
        vocab_size=config.vocab_size,
        special_ids=tuple(sorted(special.values())),
        protected_ids=tuple(special[k] for k in ("sep", "pad", "cls") if k in special),
        continuation_ids=continuation_ids(paths.tokenizer_file) if pre.masking == "word" else (),
    )
    accelerator = resolve_accelerator(sizing.accelerator)
    world_size = devices_per_node(accelerator, sizing.devices) * sizing.num_nodes
    datamodule = PretrainDataModule(
        index,
        spec,
        val_batches=pre.val_batches,
        num_workers=sizing.num_workers,
        pin_memory=accelerator == "gpu",
    )
    datamodule.check_enough_for_one_batch(world_size)
    tokens_per_step = sizing.batch_size * config.block_size * pre.grad_accum * world_size
    # At most the first 10M val tokens: enough for a stable estimate, cheap for any corpus.
    val_tokens = np.concatenate([np.asarray(m[:_ENTROPY_TOKENS]) for m in datamodule.val_stream.maps])
    entropy = unigram_entropy(
        val_tokens[:_ENTROPY_TOKENS],
        config.vocab_size,
        ignore_ids=spec.protected_ids if config.objective == "masked" else (),
    )
    return Inputs(
        index=index,
        tokenizer_sha=tokenizer_sha,
        config=config,
        special=special,
        datamodule=datamodule,
        accelerator=accelerator,
        precision=resolve_precision(sizing.precision, accelerator),
        world_size=world_size,
        tokens_per_step=tokens_per_step,
        max_steps=budget_steps(
            max_steps=sizing.max_steps, max_tokens=sizing.max_tokens, tokens_per_step=tokens_per_step
        ),
        fingerprint={
            "batch_size": sizing.batch_size,
            "grad_accum": pre.grad_accum,
            "world_size": world_size,
            "sampling": pre.sampling,
            "mask_rate": pre.mask_rate,
            "val_mask_rate": pre.val_mask_rate,
            # Only when set: checkpoints written before the setting existed still resume.
            **({"masking": pre.masking} if pre.masking != "token" else {}),
            **(
                {"task": pre.task, "generator_layers": pre.generator_layers, "rtd_weight": pre.rtd_weight}
                if pre.task != "mlm"
                else {}
            ),
            "seed": params.project.seed,
            "tokenizer_sha256": tokenizer_sha,
            "train_tokens": index.tokens("train"),
        },
        unigram_entropy=entropy,
    )


def resume_point(params: Params, paths: ProjectPaths, inputs: Inputs) -> tuple[ResumePoint | None, Path]:
    """Step 2: (the checkpoint to resume from or None, this configuration's checkpoint folder)."""
    pre = params.pretrain
    optimisation = pre.model_dump(
        include={"lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip"}
    )
    identity = {
        "model": inputs.config.to_dict(),
        "fingerprint": inputs.fingerprint,
        "optimisation": optimisation,
    }
    ckpt_dir = checkpoint_dir(paths.pretrain_checkpoints, identity)
    if pre.resume_from is not None:
        point = resume_point_from_file(pre.resume_from)
    else:
        point = find_resume_point(ckpt_dir)
        others = other_configurations(paths.pretrain_checkpoints, ckpt_dir)
        if point is None and others:
            _logger.warning(
                "no checkpoint of this configuration in %s: pretraining starts from step 0; checkpoints of "
                "%d other configuration(s) are kept in %s (set pretrain.resume_from to continue one of them)",
                ckpt_dir,
                len(others),
                ", ".join(str(p) for p in others),
            )
    if point is not None:
        check_compatible(point, model_config=inputs.config.to_dict(), fingerprint=inputs.fingerprint)
        _logger.info("resuming pretraining from %s (step %d)", point.path, point.global_step)
    return point, ckpt_dir


def fit(
    params: Params,
    inputs: Inputs,
    *,
    run: Any,
    point: ResumePoint | None,
    ckpt_dir: Path,
    quiet: bool,
    callbacks: Sequence[pl.Callback] = (),
) -> tuple[pl.Trainer, MetricsCallback, GuardedCheckpoint]:
    """Step 3: build the module and Trainer, fit (resuming from ``point``), validate the final step.

    Raises TrainingDiverged on a NaN/inf loss (no checkpoint of the diverged state is written).
    """
    sizing, pre = params.sizing, params.pretrain
    module = LMModule(
        inputs.config,
        optim_config(pre),
        total_steps=inputs.max_steps,
        compile=sizing.compile,
        meta={
            "run_id": run.run_id or "",
            "fingerprint": inputs.fingerprint,
            "tokenizer_sha256": inputs.tokenizer_sha,
        },
        unigram_entropy=inputs.unigram_entropy,
        electra=(
            ElectraConfig(generator_layers=pre.generator_layers, rtd_weight=pre.rtd_weight)
            if pre.task == "electra"
            else None
        ),
    )
    flops_per_token, peak = _log_setup(run, inputs, module, point=point, mask_rate=pre.mask_rate)
    metrics = MetricsCallback(
        run,
        log_every_n_steps=params.tracking.log_every_n_steps,
        tokens_per_step=inputs.tokens_per_step,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        world_size=inputs.world_size,
    )
    checkpoint = GuardedCheckpoint(
        str(ckpt_dir), every_n_steps=pre.checkpoint_every_n_steps, after_save=run.flush
    )
    trainer = build_trainer(
        accelerator=inputs.accelerator,
        devices=sizing.devices,
        num_nodes=sizing.num_nodes,
        strategy=sizing.strategy,
        precision=inputs.precision,
        max_steps=inputs.max_steps,
        accumulate_grad_batches=pre.grad_accum,
        gradient_clip_val=pre.grad_clip,
        validate=pre.val_every_n_steps,
        callbacks=[metrics, checkpoint, *callbacks],
        quiet=quiet,
        enable_checkpointing=True,
        default_root_dir=ckpt_dir.parent.parent,
        progress_refresh=params.tracking.log_every_n_steps,
        use_distributed_sampler=False,
    )
    trainer.fit(
        module, datamodule=inputs.datamodule, ckpt_path=str(point.path) if point else None, weights_only=True
    )
    if checkpoint.term_requested:  # SIGTERM after the last step: its checkpoint is written, stop now
        checkpoint.stop()
    if metrics.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=inputs.datamodule, verbose=False)
    module.assert_finite()
    return trainer, metrics, checkpoint


def _log_setup(
    run: Any, inputs: Inputs, module: LMModule, *, point: ResumePoint | None, mask_rate: float
) -> tuple[float, float | None]:
    """Log the resolved setup (first run only) and the MFU/resume tags; return (training FLOPs per
    token, the device's peak FLOP/s or None when unknown)."""
    device_name = cuda_device_name() if inputs.accelerator == "gpu" else None
    peak = peak_flops(device_name, inputs.precision)
    n_params = module.model.num_parameters()
    flops_per_token = training_flops_per_token(inputs.config, n_params=n_params, mask_rate=mask_rate)
    if module.electra is not None:  # the discriminator never runs its LM head; the generator does
        generator = module.generator
        flops_per_token = training_flops_per_token(
            inputs.config, n_params=n_params, mask_rate=0.0
        ) + training_flops_per_token(
            generator.config, n_params=generator.num_parameters(), mask_rate=mask_rate
        )
    if point is None:
        run.log_params(
            {
                "resolved": {
                    "model": inputs.config.to_dict(),
                    "n_params": n_params,
                    "max_steps": inputs.max_steps,
                    "tokens_per_step": inputs.tokens_per_step,
                    "world_size": inputs.world_size,
                    "precision": inputs.precision,
                    "accelerator": inputs.accelerator,
                    "device": device_name or "cpu",
                    "peak_flops_per_device": peak if peak is not None else "unknown",
                    "flops_per_token": flops_per_token,
                    "train_tokens": inputs.index.tokens("train"),
                    "val_tokens": inputs.index.tokens("val"),
                    "tokenizer_sha256": inputs.tokenizer_sha,
                }
            }
        )
    run.set_tags(
        {
            "bigmodel_ops.mfu": "measured" if peak is not None else "unknown",
            **({"bigmodel_ops.resumed_from_step": point.global_step} if point else {}),
        }
    )
    return flops_per_token, peak


def export(
    params: Params,
    paths: ProjectPaths,
    inputs: Inputs,
    *,
    run: Any,
    report: dict[str, Any],
    final_checkpoint: Path,
) -> None:
    """Step 4 (rank 0): the model folder, the registered base model and the metrics report."""
    export_from_checkpoint(
        final_checkpoint,
        config=inputs.config,
        target=paths.pretrained_model,
        tokenizer_file=paths.tokenizer_file,
        extra={
            "tokenizer_sha256": inputs.tokenizer_sha,
            "special_ids": inputs.special,
            "training": {k: report[k] for k in ("run_id", "global_step", "tokens", "train_loss", "val_loss")},
        },
    )
    version = run.log_model_dir(
        paths.pretrained_model,
        artifact_path=MODEL_ARTIFACT_PATH,
        registered_model_name=f"{params.project.name}-base" if params.pretrain.register_model else None,
        alias=REGISTRY_ALIAS,
        tags={"tokenizer_sha256": inputs.tokenizer_sha, "objective": inputs.config.objective},
    )
    run.flush()
    if version is not None:
        report["model_version"] = str(version.version)
    write_json_atomic(paths.pretrain_report, report)
    run.log_dict(report, "metrics/pretrain.json")


def run(
    params: Params, *, paths: ProjectPaths, quiet: bool = False, callbacks: Sequence[pl.Callback] = ()
) -> dict[str, Any]:
    """Pretrain the transformer LM (masked or causal) with Lightning on the token shards; resumes from the last checkpoint; exports safetensors and registers `<project>-base`.

    Returns the metrics report (also written to paths.pretrain_report). ``callbacks`` are added to
    the Trainer (tests inject faults this way). Raises DataError (shards / tokenizer / block
    size), CheckpointError (an incompatible checkpoint, no valid checkpoint in a folder that has
    some, a checkpoint that cannot be written) or TrainingDiverged (NaN/inf loss; the last good
    checkpoint is kept and the MLflow run is marked FAILED).
    """
    started = time.perf_counter()
    inputs = check_inputs(params, paths)
    point, ckpt_dir = resume_point(params, paths, inputs)
    configure_torch(inputs.accelerator)
    # Same init on every rank and in every rerun (the data and masks have their own seeds).
    seed_everything(params.project.seed, verbose=False)
    with stage_run(
        params,
        STAGE,
        resume_run_id=point.meta.get("run_id") if point else None,
        system_metrics=True,
        log_stage_params=point is None,
    ) as run:
        trainer, metrics, checkpoint = fit(
            params, inputs, run=run, point=point, ckpt_dir=ckpt_dir, quiet=quiet, callbacks=callbacks
        )
        last = metrics.last
        report: dict[str, Any] = {
            "run_id": run.run_id,
            "global_step": trainer.global_step,
            "max_steps": inputs.max_steps,
            "tokens": trainer.global_step * inputs.tokens_per_step,
            "train_loss": last.get("train/loss"),
            "val_loss": last.get("val/loss"),
            "val_perplexity": last.get("val/perplexity"),
            "unigram_entropy": inputs.unigram_entropy,
            "val_gap_to_unigram": last.get("val/gap_to_unigram"),
            "tokens_per_s": last.get("perf/tokens_per_s"),
            "mfu": last.get("perf/mfu", "unknown"),
            "train_seconds": metrics.train_seconds,
            "resumed_from_step": point.global_step if point else None,
            "n_params": trainer.lightning_module.model.num_parameters(),
            "world_size": inputs.world_size,
            "model_version": None,
        }
        if not trainer.is_global_zero:
            return report
        report["wall_seconds"] = time.perf_counter() - started
        run.log_metrics({"perf/wall_s": report["wall_seconds"]}, step=trainer.global_step)
        final = Path(checkpoint.last_model_path or ckpt_dir / "last.ckpt")
        export(params, paths, inputs, run=run, report=report, final_checkpoint=final)
        _logger.info("pretraining done: %s", flatten(report))
        return report
