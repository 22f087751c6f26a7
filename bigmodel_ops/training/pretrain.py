"""The `pretrain` stage: token shards -> a pretrained TransformerLM, tracked and resumable.

Order of work (cheap checks first, so bad input fails in seconds and leaves nothing):

1. shards index, tokenizer (hash and vocabulary agree with the index), block size
   fits the splits, sequential batches fit the train split;
2. a checkpoint in outputs/pretrain/checkpoints? It must match the model config and
   the data/optimisation fingerprint, else CheckpointError (never a silent restart);
   the MLflow run id stored in it is re-attached, so one run spans every resume;
3. Lightning fit (resumes from the checkpoint: weights, optimizer, schedule, RNG and
   data position), a final validation, divergence check;
4. rank 0 exports model.safetensors + config.json + tokenizer.json from the final
   checkpoint into a temporary folder and renames it into place, writes the metrics
   report the same way, logs the model folder and registers `<project>-base` with
   alias `latest-pretrain`.

Runs unchanged under Lightning's DDP launcher (which re-runs the command for the other
ranks), torchrun or SLURM: only global rank 0 logs (stage_run hands the others a no-op
run) and writes outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import seed_everything

from bigmodel_ops.config import Params, flatten
from bigmodel_ops.errors import DataError
from bigmodel_ops.fsutil import replace_dir, sha256_file, write_json_atomic
from bigmodel_ops.model import ModelConfig, TransformerLM, config_from_preset, save_pretrained
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.shards import ShardIndex
from bigmodel_ops.training.callbacks import GuardedCheckpoint, TrainingMetrics
from bigmodel_ops.training.checkpoints import (
    ResumePoint,
    check_compatible,
    checkpoint_dir,
    find_resume_point,
    other_configurations,
    resume_point_from_file,
)
from bigmodel_ops.training.data import DataSpec, PretrainDataModule
from bigmodel_ops.training.engine import (
    build_trainer,
    configure_torch,
    devices_per_node,
    resolve_accelerator,
    resolve_precision,
)
from bigmodel_ops.training.flops import cuda_device_name, peak_flops, training_flops_per_token
from bigmodel_ops.training.lm_module import LMModule, OptimConfig

_logger = logging.getLogger(__name__)

STAGE = "pretrain"
MODEL_ARTIFACT_PATH = "model"
REGISTRY_ALIAS = "latest-pretrain"
TOKENIZER_FILE = "tokenizer.json"
# Tokens of each shard checked for out-of-range ids (a full scan of a huge corpus would
# cost minutes; the tokenize stage writes only valid ids, this catches foreign shards).
_ID_CHECK_TOKENS = 2_000_000


def check_tokenizer(tokenizer_file: Path, index: ShardIndex) -> tuple[str, int]:
    """(sha256, vocab size) of tokenizer.json after checking it against the shards index."""
    if not tokenizer_file.is_file():
        raise DataError(f"{tokenizer_file}: tokenizer not found (run the tokenize stage first)")
    sha = sha256_file(tokenizer_file)
    if index.tokenizer_sha256 and index.tokenizer_sha256 != sha:
        raise DataError(
            f"{tokenizer_file}: sha256 {sha[:12]}... differs from the tokenizer the shards in "
            f"{index.directory} were made with ({index.tokenizer_sha256[:12]}...); re-run the tokenize stage"
        )
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise DataError(f"{tokenizer_file}: not a valid tokenizer file: {error}") from None
    if vocab != index.vocab_size:
        raise DataError(
            f"{index.directory / 'index.json'}: vocab_size {index.vocab_size} does not match the tokenizer "
            f"{tokenizer_file} ({vocab} tokens); re-run the tokenize stage"
        )
    return sha, vocab


def check_token_ids(index: ShardIndex, *, vocab_size: int) -> None:
    """DataError if a shard holds ids outside the model vocabulary (checks each shard's head)."""
    for split, infos in index.splits.items():
        for info, tokens in zip(infos, index.open_split(split), strict=True):
            head = np.asarray(tokens[:_ID_CHECK_TOKENS])
            top = int(head.max()) if head.size else 0
            if top >= vocab_size:
                raise DataError(
                    f"{index.directory / info.file}: token id {top} is outside the model vocabulary "
                    f"(vocab_size {vocab_size}); the shards do not belong to this tokenizer"
                )


def budget_steps(*, max_steps: int | None, max_tokens: int | None, tokens_per_step: int) -> int:
    """Optimizer steps of the budget: the smaller of max_steps and ceil(max_tokens / tokens_per_step)."""
    candidates = []
    if max_steps is not None:
        candidates.append(max_steps)
    if max_tokens is not None:
        candidates.append(-(-max_tokens // tokens_per_step))
    return max(1, min(candidates))


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
    )


def _special_ids(index: ShardIndex, *, objective: str) -> dict[str, int]:
    needed = ["sep"] + (["mask"] if objective == "masked" else [])
    missing = [name for name in needed if name not in index.special_ids]
    if missing:
        raise DataError(
            f"{index.directory / 'index.json'}: special_ids lacks {missing} (needed for {objective} LM)"
        )
    return index.special_ids


def export_from_checkpoint(
    checkpoint: Path, *, config: ModelConfig, target: Path, tokenizer_file: Path, extra: dict[str, Any]
) -> None:
    """Write model.safetensors + config.json + tokenizer.json from a Lightning checkpoint.

    Reading the weights back from the final checkpoint gives one code path for every
    strategy (single device, DDP, FSDP with full state dicts) and guarantees that the
    export is exactly the state a resume would continue from.
    """
    data = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    state = {k.removeprefix("model."): v for k, v in data["state_dict"].items() if k.startswith("model.")}
    model = TransformerLM(config)
    model.load_state_dict(state, strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_pretrained(model, tmp, extra=extra)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_pretrain(params: Params, *, paths: ProjectPaths, quiet: bool = False) -> dict[str, Any]:
    """Run the pretrain stage; returns the metrics report (also written to paths.pretrain_report).

    Raises DataError (shards / tokenizer / block size), CheckpointError (an incompatible
    checkpoint) or TrainingDiverged (NaN/inf loss; the last good checkpoint is kept and
    the MLflow run is marked FAILED).
    """
    from bigmodel_ops.tracking import stage_run

    started = time.perf_counter()
    sizing, pre = params.sizing, params.pretrain

    # 1. Inputs.
    index = ShardIndex.load(paths.shards)
    tokenizer_sha, vocab_size = check_tokenizer(paths.tokenizer_file, index)
    config = build_model_config(params, vocab_size=vocab_size)
    if index.vocab_size > config.vocab_size:  # cannot happen after check_tokenizer; kept as a guard
        raise DataError(
            f"{paths.shards}: shards vocab {index.vocab_size} exceeds the model's {config.vocab_size}"
        )
    check_token_ids(index, vocab_size=config.vocab_size)
    special = _special_ids(index, objective=config.objective)
    spec = DataSpec(
        objective=config.objective,
        block_size=config.block_size,
        batch_size=sizing.batch_size,
        seed=params.project.seed,
        sampling=pre.sampling,
        mask_rate=pre.mask_rate,
        mask_id=special.get("mask", 0),
        vocab_size=config.vocab_size,
        special_ids=tuple(sorted(special.values())),
        protected_ids=tuple(special[k] for k in ("sep", "pad", "cls") if k in special),
    )
    accelerator = resolve_accelerator(sizing.accelerator)
    precision = resolve_precision(sizing.precision, accelerator)
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
    max_steps = budget_steps(
        max_steps=sizing.max_steps, max_tokens=sizing.max_tokens, tokens_per_step=tokens_per_step
    )
    fingerprint = {
        "batch_size": sizing.batch_size,
        "grad_accum": pre.grad_accum,
        "world_size": world_size,
        "sampling": pre.sampling,
        "mask_rate": pre.mask_rate,
        "seed": params.project.seed,
        "tokenizer_sha256": tokenizer_sha,
        "train_tokens": index.tokens("train"),
    }

    # 2. Resume point: the latest checkpoint of this configuration, or the one params name.
    optimisation = pre.model_dump(
        include={"lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip"}
    )
    ckpt_dir = checkpoint_dir(
        paths.pretrain_checkpoints,
        {"model": config.to_dict(), "fingerprint": fingerprint, "optimisation": optimisation},
    )
    point: ResumePoint | None
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
        check_compatible(point, model_config=config.to_dict(), fingerprint=fingerprint)
        _logger.info("resuming pretraining from %s (step %d)", point.path, point.global_step)

    configure_torch(accelerator)
    device_name = cuda_device_name() if accelerator == "gpu" else None
    peak = peak_flops(device_name, precision)

    # Same init on every rank and in every rerun (the data and masks have their own seeds).
    seed_everything(params.project.seed, verbose=False)
    with stage_run(
        params,
        stage=STAGE,
        resume_run_id=point.meta.get("run_id") if point else None,
        system_metrics=True,
        log_stage_params=point is None,
    ) as run:
        module = LMModule(
            config,
            OptimConfig(
                lr=pre.lr,
                min_lr=pre.min_lr,
                warmup_steps=pre.warmup_steps,
                weight_decay=pre.weight_decay,
                beta1=pre.beta1,
                beta2=pre.beta2,
            ),
            total_steps=max_steps,
            compile=sizing.compile,
            meta={"run_id": run.run_id or "", "fingerprint": fingerprint, "tokenizer_sha256": tokenizer_sha},
        )
        n_params = module.model.num_parameters()
        flops_per_token = training_flops_per_token(config, n_params=n_params, mask_rate=pre.mask_rate)
        if point is None:
            run.log_params(
                {
                    "resolved": {
                        "model": config.to_dict(),
                        "n_params": n_params,
                        "max_steps": max_steps,
                        "tokens_per_step": tokens_per_step,
                        "world_size": world_size,
                        "precision": precision,
                        "accelerator": accelerator,
                        "device": device_name or "cpu",
                        "peak_flops_per_device": peak if peak is not None else "unknown",
                        "flops_per_token": flops_per_token,
                        "train_tokens": index.tokens("train"),
                        "val_tokens": index.tokens("val"),
                        "tokenizer_sha256": tokenizer_sha,
                    }
                }
            )
        run.set_tags(
            {
                "bigmodel_ops.mfu": "measured" if peak is not None else "unknown",
                **({"bigmodel_ops.resumed_from_step": point.global_step} if point else {}),
            }
        )
        metrics = TrainingMetrics(
            run,
            log_every_n_steps=params.tracking.log_every_n_steps,
            tokens_per_step=tokens_per_step,
            flops_per_token=flops_per_token,
            peak_flops=peak,
            world_size=world_size,
        )
        checkpoint = GuardedCheckpoint(
            str(ckpt_dir), every_n_steps=pre.checkpoint_every_n_steps, after_save=run.flush
        )
        trainer = build_trainer(
            accelerator=accelerator,
            devices=sizing.devices,
            num_nodes=sizing.num_nodes,
            strategy=sizing.strategy,
            precision=precision,
            max_steps=max_steps,
            accumulate_grad_batches=pre.grad_accum,
            gradient_clip_val=pre.grad_clip,
            val_every_n_steps=pre.val_every_n_steps,
            callbacks=[metrics, checkpoint],
            quiet=quiet,
            enable_checkpointing=True,
            default_root_dir=paths.pretrain_checkpoints.parent,
            progress_refresh=params.tracking.log_every_n_steps,
        )
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(point.path) if point else None, weights_only=True
        )
        if metrics.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        module.assert_finite()

        report: dict[str, Any] = {
            "run_id": run.run_id,
            "global_step": trainer.global_step,
            "max_steps": max_steps,
            "tokens": trainer.global_step * tokens_per_step,
            "train_loss": metrics.last.get("train/loss"),
            "val_loss": metrics.last.get("val/loss"),
            "val_perplexity": metrics.last.get("val/perplexity"),
            "tokens_per_s": metrics.last.get("perf/tokens_per_s"),
            "mfu": metrics.last.get("perf/mfu", "unknown"),
            "train_seconds": metrics.train_seconds,
            "resumed_from_step": point.global_step if point else None,
            "n_params": n_params,
            "world_size": world_size,
            "model_version": None,
        }
        if not trainer.is_global_zero:
            return report

        # 4. Outputs (rank 0).
        final = Path(checkpoint.last_model_path or ckpt_dir / "last.ckpt")
        export_from_checkpoint(
            final,
            config=config,
            target=paths.pretrained_model,
            tokenizer_file=paths.tokenizer_file,
            extra={
                "tokenizer_sha256": tokenizer_sha,
                "special_ids": special,
                "training": {
                    k: report[k] for k in ("run_id", "global_step", "tokens", "train_loss", "val_loss")
                },
            },
        )
        report["wall_seconds"] = time.perf_counter() - started
        run.log_metrics({"perf/wall_s": report["wall_seconds"]}, step=trainer.global_step)
        version = run.log_model_dir(
            paths.pretrained_model,
            artifact_path=MODEL_ARTIFACT_PATH,
            registered_model_name=f"{params.project.name}-base" if pre.register_model else None,
            alias=REGISTRY_ALIAS,
            tags={"tokenizer_sha256": tokenizer_sha, "objective": config.objective},
        )
        run.flush()
        if version is not None:
            report["model_version"] = str(version.version)
        write_json_atomic(paths.pretrain_report, report)
        run.log_dict(report, "metrics/pretrain.json")
        _logger.info("pretraining done: %s", flatten(report))
        return report
