"""Throughput of the pretrain stage's training path vs a plain PyTorch loop, side by side.

    python benchmarks/pretrain_throughput.py --device cpu --preset tiny --quick
    python benchmarks/pretrain_throughput.py --device cuda --preset gpt2-124m --objective causal \\
        --block-size 1024 --batch-size 32 --no-tracking

Variants, run interleaved (the order rotates every repeat) in one process, on the same
random-token shards, model config, batch, optimizer (AdamW + param groups, fused on CUDA),
schedule (warmup + cosine) and gradient clipping:

- lightning+tracking: our LMModule + Trainer (build_trainer, as the stage builds it) with
  the stage's MetricsCallback logging to a real sqlite MLflow store through stage_run
  (skipped with --no-tracking or when mlflow / pydantic are not installed);
- lightning: the same without the metrics callback (tracking off);
- plain: a hand-written loop (the nanoGPT way) over the same data loader.

Checkpointing and validation are off in all variants (they are I/O, measured elsewhere).
Each variant's steady state is timed between optimizer steps `warmup` and `steps`, with a
CUDA sync at both marks. Reported: tokens/s (median over repeats), ratio lightning/plain,
logging overhead (1 - tracked/untracked), data-wait fraction of step time (time the
training loop waited on the loader), peak GPU memory and MFU (CUDA only; "unknown" when
the GPU is not in the peak table). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from benchmarks._project import make_shards  # noqa: E402
from bigmodel_ops.model import PRESETS, TransformerLM, config_from_preset  # noqa: E402
from bigmodel_ops.pretraining.data import DataSpec, ResumableBatchLoader, TokenStream, TrainBatches  # noqa: E402
from bigmodel_ops.pretraining.flops import cuda_device_name, mfu, peak_flops, training_flops_per_token  # noqa: E402
from bigmodel_ops.pretraining.lm_module import LMModule, OptimConfig, build_optimizer  # noqa: E402
from bigmodel_ops.shards import ShardIndex  # noqa: E402
from bigmodel_ops.trainer import MetricsCallback, build_trainer, configure_torch  # noqa: E402

DEFAULT_VOCAB = {"gpt2-124m": 50257, "bert-base": 30522}


class StepTimer(Callback):
    """Wall time between the end of optimizer step `start` and of step `stop`, and the time the
    loop waited on the loader in between.

    Synchronises CUDA at both marks so queued kernels are counted.
    """

    def __init__(self, *, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.t_start = self.t_stop = 0.0
        self.fetch_start = self.fetch_stop = 0.0

    def _mark(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, float]:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        loader = trainer.fit_loop._combined_loader
        fetch = sum(item.fetch_seconds for item in loader.flattened if isinstance(item, ResumableBatchLoader))
        return time.perf_counter(), fetch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.start and self.t_start == 0.0:
            self.t_start, self.fetch_start = self._mark(trainer, pl_module)
        elif trainer.global_step == self.stop and self.t_stop == 0.0:
            self.t_stop, self.fetch_stop = self._mark(trainer, pl_module)

    @property
    def seconds(self) -> float:
        return self.t_stop - self.t_start

    @property
    def data_wait_fraction(self) -> float:
        return (self.fetch_stop - self.fetch_start) / max(self.seconds, 1e-12)


def new_loader(index: ShardIndex, spec: DataSpec, *, workers: int, pin: bool) -> ResumableBatchLoader:
    return ResumableBatchLoader(
        TrainBatches(TokenStream.from_index(index, "train"), spec),
        num_workers=workers,
        pin_memory=pin,
        seed=spec.seed,
    )


def run_lightning(module, loader, args, *, sink, log_every, tokens_per_step, flops, peak) -> dict:
    callbacks = []
    if sink is not False:
        callbacks.append(
            MetricsCallback(
                sink,
                log_every_n_steps=log_every,
                tokens_per_step=tokens_per_step,
                flops_per_token=flops,
                peak_flops=peak,
            )
        )
    timer = StepTimer(start=args.warmup, stop=args.steps)
    trainer = build_trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        num_nodes=1,
        strategy="auto",
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=1,
        gradient_clip_val=1.0,
        validate=None,
        callbacks=[*callbacks, timer],
        quiet=True,
        enable_checkpointing=False,
        default_root_dir=args.tmp,
        use_distributed_sampler=False,  # as the stage: the loader shards batches by rank itself
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        # Validation is off here on purpose (the stage validates; its cost is measured elsewhere).
        warnings.filterwarnings(
            "ignore", message="You defined a `validation_step` but have no `val_dataloader`"
        )
        trainer.fit(module, train_dataloaders=loader)
    steps = args.steps - args.warmup
    return {
        "tokens_per_s": steps * tokens_per_step / timer.seconds,
        "data_wait_frac": timer.data_wait_fraction,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }


def run_plain(model, loader, args, *, tokens_per_step: int, optim: OptimConfig) -> dict:
    device = torch.device(args.device)
    opt, sched = build_optimizer(model, optim, total_steps=args.steps, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if args.precision.startswith("bf16")
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    step, t0, fetch0 = 0, 0.0, 0.0
    while step < args.steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                if "tokens" in batch:
                    _, loss = model(batch["tokens"][:, :-1], batch["tokens"][:, 1:])
                else:
                    _, loss = model(batch["input_ids"], batch["labels"], positions=batch["positions"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step in (args.warmup, args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step == args.warmup:
                    t0, fetch0 = time.perf_counter(), loader.fetch_seconds
                else:
                    seconds = time.perf_counter() - t0
            if step == args.steps:
                break
    return {
        "tokens_per_s": (args.steps - args.warmup) * tokens_per_step / seconds,
        "data_wait_frac": (loader.fetch_seconds - fetch0) / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


@contextlib.contextmanager
def tracking_run(args):
    """A real stage run on a temporary sqlite store, or None when tracking is off/unavailable."""
    if args.no_tracking:
        yield None
        return
    try:
        import mlflow  # noqa: F401

        from bigmodel_ops.config import load_params
        from bigmodel_ops.tracking import stage_run
    except ImportError as error:
        print(f"tracking unavailable ({error}); measuring without it", file=sys.stderr)
        yield None
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.tmp}/mlflow.db"
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cwd = os.getcwd()
    os.chdir(args.tmp)  # spool and artifacts stay in the temp dir
    try:
        with stage_run(
            params.tracking,
            experiment=params.experiment_name,
            stage="benchmark-pretrain",
            params=params.model_dump(mode="json"),
            log_stage_params=False,
        ) as run:
            yield run, params.tracking.log_every_n_steps
    finally:
        os.chdir(cwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--objective", choices=["causal", "masked"], default="causal")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per timed run")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing (compile)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--no-tracking", action="store_true", help="skip the tracked variant (no mlflow needed)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    args.steps = args.steps or (40 if args.quick else 150)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 5)
    args.repeats = args.repeats or (2 if cuda else 3)
    args.batch_size = args.batch_size or (32 if cuda else 16)
    args.num_workers = args.num_workers if args.num_workers is not None else (2 if cuda else 0)
    args.compile = cuda if args.compile is None else args.compile
    args.precision = "bf16-mixed" if cuda else "32-true"
    vocab = args.vocab_size or DEFAULT_VOCAB.get(args.preset, 8000)
    configure_torch("gpu" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        config = config_from_preset(
            args.preset, vocab_size=vocab, objective=args.objective, block_size=args.block_size
        )
        make_shards(
            Path(tmp) / "shards",
            vocab=vocab,
            tokens=max(2_000_000, 4 * args.batch_size * (config.block_size + 1)),
            seed=0,
        )
        index = ShardIndex.load(Path(tmp) / "shards")
        spec = DataSpec(
            objective=args.objective,
            block_size=config.block_size,
            batch_size=args.batch_size,
            seed=0,
            vocab_size=vocab,
            mask_id=4,
            special_ids=(0, 1, 2, 3, 4),
            protected_ids=(3,),
        )
        tokens_per_step = args.batch_size * config.block_size
        optim = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10, weight_decay=0.1)
        module = LMModule(config, optim, total_steps=args.steps, compile=args.compile)
        plain_model = TransformerLM(config).to(args.device)
        if args.compile:
            plain_model.compile()
        n_params = plain_model.num_parameters()
        flops = training_flops_per_token(config, n_params=n_params, mask_rate=spec.mask_rate)
        peak = peak_flops(cuda_device_name(), args.precision) if cuda else None
        results: dict[str, list[dict]] = {}
        with tracking_run(args) as tracked:
            variants = ["lightning", "plain"] + (["lightning+tracking"] if tracked else [])
            for r in range(args.repeats):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for name in order:
                    loader = new_loader(index, spec, workers=args.num_workers, pin=cuda)
                    if name == "plain":
                        out = run_plain(
                            plain_model, loader, args, tokens_per_step=tokens_per_step, optim=optim
                        )
                    else:
                        sink, every = tracked if name == "lightning+tracking" else (False, 10)
                        out = run_lightning(
                            module,
                            loader,
                            args,
                            sink=sink,
                            log_every=every,
                            tokens_per_step=tokens_per_step,
                            flops=flops,
                            peak=peak,
                        )
                    results.setdefault(name, []).append(out)
                    print(
                        f"repeat {r} {name:20s} {out['tokens_per_s']:12.0f} tok/s  data-wait {out['data_wait_frac']:.4f}",
                        file=sys.stderr,
                    )

    def median(name: str, key: str) -> float | None:
        values = [o[key] for o in results.get(name, []) if o[key] is not None]
        return statistics.median(values) if values else None

    lit = median("lightning", "tokens_per_s")
    plain = median("plain", "tokens_per_s")
    tracked_tps = median("lightning+tracking", "tokens_per_s")
    stage_tps = tracked_tps if tracked_tps is not None else lit
    summary = {
        "benchmark": "pretrain_throughput",
        "device": cuda_device_name() if cuda else "cpu",
        "preset": args.preset,
        "objective": args.objective,
        "block_size": config.block_size,
        "batch_size": args.batch_size,
        "vocab_size": vocab,
        "n_params": n_params,
        "precision": args.precision,
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "tokens_per_s_lightning_tracked": tracked_tps,
        "tokens_per_s_lightning": lit,
        "tokens_per_s_plain": plain,
        "ratio_stage_vs_plain": stage_tps / plain,
        "ratio_lightning_untracked_vs_plain": lit / plain,
        "logging_overhead": (1.0 - tracked_tps / lit) if tracked_tps is not None else None,
        "data_wait_frac_stage": median(
            "lightning+tracking" if tracked_tps else "lightning", "data_wait_frac"
        ),
        "data_wait_frac_plain": median("plain", "data_wait_frac"),
        "peak_mem_gib_stage": median("lightning", "peak_mem_gib"),
        "peak_mem_gib_plain": median("plain", "peak_mem_gib"),
        "mfu_stage": mfu(tokens_per_s=stage_tps, flops_per_token=flops, peak=peak) if peak else "unknown",
        "mfu_plain": mfu(tokens_per_s=plain, flops_per_token=flops, peak=peak) if peak else "unknown",
        "flops_per_token": flops,
    }
    summary = {
        k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in summary.items()
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
