"""Our masked LM against Hugging Face transformers' BertForMaskedLM of the same size: val loss against
tokens seen and against training wall time, on the same shards, batches and budget, in one process.

    python benchmarks/mlm_reference.py --data ../shared/data/imdb_reviews_2500.csv
    python benchmarks/mlm_reference.py --data reviews.csv --steps 1000 --eval-every 100 --seed 2
    python benchmarks/mlm_reference.py --data reviews.csv --set model.alibi=false   # like with like
    python benchmarks/mlm_reference.py --data reviews.csv --quick                   # smoke test (< 1 minute)

In a temporary project folder (MLflow: a sqlite store in that folder, no system metrics), with the
repo's params.yaml where only the source (the given CSV), the objective (masked), the seed and the
``--set`` overrides change, the pipeline's own prepare and tokenize stages run as library calls.
The pretrain stage's own input checks (:func:`bigmodel_ops.pipeline.pretrain.check_inputs`) then give
the model config (the active profile's preset and the ``model`` section), the batch spec, the step
budget and the unigram entropy of the val tokens, exactly as the stage derives them.

Two masked LMs train side by side, step for step, in this process:

  ours: :class:`bigmodel_ops.model.TransformerLM` of that config (pre-norm, no biases by default,
        tied LM head, learned absolute positions plus ALiBi when ``model.alibi`` is on: the
        default of the masked objective), the LM head run at the masked slots only;
  hf:   ``transformers.BertForMaskedLM`` of the same vocabulary, layers, heads, width, MLP width
        (4 x width), ``max_position_embeddings`` = block size and dropout; otherwise BERT as
        it comes (post-norm, biases, exact GELU, learned absolute positions only, a transform
        layer before its tied decoder, one token type); its standard ``labels`` forward, which
        runs the decoder at every position and averages the loss over the masked ones.

Both get the pretrain stage's optimisation: AdamW (``pretrain.lr``, betas, weight decay on the
matrices of Linear layers only: ``bigmodel_ops.model.parameter_groups`` applied to each model),
warmup + cosine to ``min_lr`` over the budget (the stage's LR lambda), gradient clipping at
``grad_clip`` and ``grad_accum`` micro-batches per step. Same batches: one loader
(:class:`~bigmodel_ops.pretraining.data.TrainBatches`, the stage's random windows and 80/10/10
masking at ``pretrain.mask_rate``) yields each batch once and the very same tensors go to both
models; BERT's (B, T) labels are our (B, M) labels scattered to our masked positions. Which model
steps first alternates every step. Only each model's forward, backward, clipping and optimizer
step are timed (with a CUDA sync), never the batch building or the evaluations.

At step 0 and every ``--eval-every`` steps (and the last), both are scored on the same fixed val
batches (``pretrain.val_batches`` of them, masked at ``val_mask_rate`` with fixed seeds: the
stage's val batches), dropout off.

Reading the output: a table with one row per evaluation (step, tokens seen, each model's val loss
in nats, each model's cumulative training seconds), the unigram entropy of the val tokens beside it
(the loss of a model that knows token frequencies only: a loss below it means context was used),
then as the LAST line one JSON object: steps, tokens, eval_steps, ours_val_loss / hf_val_loss (one
per eval step), ours_seconds / hf_seconds (cumulative training seconds at each eval step),
unigram_entropy, ours_final_gap / hf_final_gap (entropy minus the final val loss: > 0 means the
model learnt beyond token frequencies), ours_params / hf_params (every distinct parameter, position
embeddings included, a tied matrix once), alibi (whether ours used ALiBi) and the settings. Loss
against tokens is the comparison of the two recipes at equal data; the seconds say what each costs.

``--quick``: 6 steps of 8 rows of 64 tokens, an evaluation every 3 (a smoke test of every code
path, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks._project import log, project_dir  # noqa: E402
from benchmarks.pretraining_value import build_params  # noqa: E402

QUICK_STEPS = 6
QUICK_EVAL_EVERY = 3
IGNORE_INDEX = -100  # bigmodel_ops.model.IGNORE_INDEX, and the label transformers ignores


@dataclass
class Trainee:
    """One model with its optimizer, schedule, loss and the record of its run."""

    name: str
    model: Any
    optimizer: Any
    schedule: Any
    loss: Any  # (model, batch) -> scalar loss tensor
    seconds: float = 0.0  # cumulative training wall time
    val_loss: list[float] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)


def ours_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Our model's loss, as the pretrain stage computes it: the LM head at the masked slots only."""
    _, loss = model(batch["input_ids"], batch["labels"], positions=batch["positions"])
    return loss


def hf_labels(batch: dict[str, Any]) -> Any:
    """(B, T) labels for BertForMaskedLM: our (B, M) labels at our positions, IGNORE_INDEX elsewhere
    (a slot our masking left unfilled is IGNORE_INDEX in both)."""
    import torch

    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    return labels.scatter_(1, batch["positions"], batch["labels"])


def hf_loss(model: Any, batch: dict[str, Any]) -> Any:
    """BertForMaskedLM's own loss: cross-entropy averaged over the labelled positions."""
    return model(input_ids=batch["input_ids"], labels=batch["hf_labels"]).loss


def bert_config(config: Any, *, pad_id: int) -> Any:
    """A BertConfig the size of our ModelConfig; everything else is BERT's default."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=4 * config.n_embd,  # our MLP width
        max_position_embeddings=config.block_size,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        type_vocab_size=1,  # one segment: packed windows have no sentence pairs
        pad_token_id=pad_id,
        tie_word_embeddings=True,  # as ours
    )


def count_parameters(model: Any) -> int:
    """Every distinct parameter (a tied matrix once), position embeddings included."""
    return sum(p.numel() for p in model.parameters())


def new_trainee(name: str, model: Any, *, loss: Any, pretrain: Any, total_steps: int, device: Any) -> Trainee:
    """``model`` on ``device`` with the pretrain stage's optimizer and LR schedule."""

    from bigmodel_ops.pipeline.pretrain import optim_config
    from bigmodel_ops.pretraining.lm_module import build_optimizer

    model = model.to(device).train()
    optimizer, schedule = build_optimizer(
        model, optim_config(pretrain), total_steps=total_steps, device=device
    )
    return Trainee(name=name, model=model, optimizer=optimizer, schedule=schedule, loss=loss)


def build_trainees(inputs: Any, *, params: Any, device: Any) -> tuple[Trainee, Trainee]:
    """(ours, hf), each initialised from the same seed."""
    import torch
    from transformers import BertForMaskedLM

    from bigmodel_ops.model import TransformerLM

    common = {"pretrain": params.pretrain, "total_steps": inputs.max_steps, "device": device}
    torch.manual_seed(params.project.seed)
    ours = new_trainee("ours", TransformerLM(inputs.config), loss=ours_loss, **common)
    torch.manual_seed(params.project.seed)
    bert = BertForMaskedLM(bert_config(inputs.config, pad_id=inputs.special.get("pad", 0)))
    hf = new_trainee("hf", bert, loss=hf_loss, **common)
    return ours, hf


def on_device(batch: dict[str, Any], *, device: Any) -> dict[str, Any]:
    """The batch on ``device``, with BERT's (B, T) labels derived from ours: both models read these
    very tensors."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    moved["hf_labels"] = hf_labels(moved)
    return moved


def sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def train_step(
    trainee: Trainee, micro_batches: list[dict[str, Any]], *, grad_clip: float, autocast: Any, device: Any
) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); its wall seconds."""
    import torch

    sync(device)
    started = time.perf_counter()
    for batch in micro_batches:
        with autocast():
            loss = trainee.loss(trainee.model, batch)
        (loss / len(micro_batches)).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), grad_clip)
    trainee.optimizer.step()
    trainee.schedule.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - started
    trainee.seconds += seconds
    if not math.isfinite(float(loss.detach())):
        raise SystemExit(f"{trainee.name}: training loss {float(loss)}: diverged (lower pretrain.lr)")
    return seconds


def evaluate(trainee: Trainee, val_batches: list[dict[str, Any]], *, autocast: Any) -> float:
    """Mean of the per-batch val losses (as the pretrain stage's validation), dropout off."""
    import torch

    trainee.model.eval()
    with torch.no_grad(), autocast():
        losses = [float(trainee.loss(trainee.model, batch)) for batch in val_batches]
    trainee.model.train()
    return sum(losses) / len(losses)


def endless(loader: Any) -> Iterator[dict[str, Any]]:
    """The train loader's batches, epoch after epoch."""
    while True:
        yield from loader


def eval_steps(*, steps: int, every: int) -> list[int]:
    """0, every, 2 x every, ... and the last step."""
    marks = list(range(0, steps + 1, every))
    return marks if marks[-1] == steps else [*marks, steps]


def prepare_data(args: argparse.Namespace, *, root: Path, data: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Params, paths and the tokenize report, after the pipeline's prepare and tokenize stages."""
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline import prepare, tokenize

    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    overrides = [f"profiles.max_steps={args.steps}"] if args.steps else []
    params = build_params(
        data=data,
        text_column=args.text_column,
        label_column=args.label_column,
        objective="masked",
        seed=args.seed,
        tracking_uri=uri,
        quick=args.quick,
        overrides=overrides + list(args.set or []),
    )
    if params.model.objective != "masked" or params.pretrain.task != "mlm":
        raise SystemExit("mlm_reference compares masked LMs: model.objective masked, pretrain.task mlm")
    paths = ProjectPaths(root)
    started = time.perf_counter()
    rows = prepare.run(params, paths=paths, quiet=True)["rows"]
    log(f"prepare: {rows['train']} train / {rows['val']} val / {rows['pretrain']} pretrain rows")
    report = tokenize.run(params, paths=paths, quiet=True)
    log(f"tokenize: vocab {report.get('vocab_size')} ({time.perf_counter() - started:.0f}s with prepare)")
    return params, paths, report


def train_side_by_side(
    ours: Trainee, hf: Trainee, *, inputs: Any, params: Any, marks: list[int], device: Any, autocast: Any
) -> None:
    """Both models through ``inputs.max_steps`` steps of the same batches, evaluated at ``marks``."""
    from bigmodel_ops.pretraining.data import ResumableBatchLoader, TrainBatches, ValBatches

    data = inputs.datamodule
    loader = ResumableBatchLoader(TrainBatches(data.train_stream, data.spec), seed=data.spec.seed)
    val_set = ValBatches(data.val_stream, data.spec, n_batches=params.pretrain.val_batches)
    val_batches = [on_device(val_set[i], device=device) for i in range(len(val_set))]
    batches = endless(loader)
    accum, clip = params.pretrain.grad_accum, params.pretrain.grad_clip
    for step in range(inputs.max_steps + 1):
        if step in marks:
            for trainee in (ours, hf):
                trainee.val_loss.append(evaluate(trainee, val_batches, autocast=autocast))
                trainee.val_seconds.append(trainee.seconds)
            log(
                f"  step {step:>5}  val loss ours {ours.val_loss[-1]:.4f}  hf {hf.val_loss[-1]:.4f}  "
                f"({ours.seconds:.1f}s / {hf.seconds:.1f}s of training)"
            )
        if step == inputs.max_steps:
            break
        micro = [on_device(next(batches), device=device) for _ in range(accum)]
        order = (ours, hf) if step % 2 == 0 else (hf, ours)
        for trainee in order:
            train_step(trainee, micro, grad_clip=clip, autocast=autocast, device=device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; returns the summary."""
    import torch

    from bigmodel_ops.pipeline.pretrain import check_inputs
    from bigmodel_ops.trainer import configure_torch

    started = time.perf_counter()
    data = Path(args.data).resolve()
    with project_dir(args.keep, prefix="mlm-reference-") as root:
        params, paths, tok_report = prepare_data(args, root=root, data=data)
        inputs = check_inputs(params, paths)
        configure_torch(inputs.accelerator)
        device = torch.device("cuda" if inputs.accelerator == "gpu" else "cpu")
        bf16 = inputs.precision.startswith("bf16") and device.type == "cuda"
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        ours, hf = build_trainees(inputs, params=params, device=device)
        every = args.eval_every or (QUICK_EVAL_EVERY if args.quick else params.pretrain.val_every_n_steps)
        marks = eval_steps(steps=inputs.max_steps, every=every)
        config = inputs.config
        log(
            f"mlm-reference: {data.name}, seed {params.project.seed}, preset {params.sizing.model_preset} "
            f"({config.n_layer} x {config.n_embd}, {config.n_head} heads, block {config.block_size}, "
            f"alibi {config.alibi}), batch {params.sizing.batch_size}, {inputs.max_steps} steps of "
            f"{inputs.tokens_per_step:,} tokens, lr {params.pretrain.lr:g}; params ours "
            f"{count_parameters(ours.model):,}, hf {count_parameters(hf.model):,}; {device.type}, "
            f"{torch.get_num_threads()} torch threads{' [QUICK]' if args.quick else ''}"
        )
        train_side_by_side(
            ours, hf, inputs=inputs, params=params, marks=marks, device=device, autocast=autocast
        )
    return summarise(
        ours,
        hf,
        args=args,
        inputs=inputs,
        params=params,
        marks=marks,
        every=every,
        device=device,
        tokenizer_sha=str(tok_report.get("tokenizer_sha256", ""))[:16],
        seconds=time.perf_counter() - started,
    )


def summarise(
    ours: Trainee,
    hf: Trainee,
    *,
    args: argparse.Namespace,
    inputs: Any,
    params: Any,
    marks: list[int],
    every: int,
    device: Any,
    tokenizer_sha: str,
    seconds: float,
) -> dict[str, Any]:
    config, pre, entropy = inputs.config, params.pretrain, inputs.unigram_entropy
    return {
        "steps": inputs.max_steps,
        "tokens": inputs.max_steps * inputs.tokens_per_step,
        "eval_steps": marks,
        "eval_tokens": [step * inputs.tokens_per_step for step in marks],
        "ours_val_loss": [round(x, 4) for x in ours.val_loss],
        "hf_val_loss": [round(x, 4) for x in hf.val_loss],
        "ours_seconds": [round(x, 2) for x in ours.val_seconds],
        "hf_seconds": [round(x, 2) for x in hf.val_seconds],
        "unigram_entropy": round(entropy, 4),
        "ours_final_gap": round(entropy - ours.val_loss[-1], 4),
        "hf_final_gap": round(entropy - hf.val_loss[-1], 4),
        "ours_params": count_parameters(ours.model),
        "hf_params": count_parameters(hf.model),
        "alibi": bool(config.alibi),
        "preset": params.sizing.model_preset,
        "vocab_size": config.vocab_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "mlp_width": 4 * config.n_embd,
        "block_size": config.block_size,
        "dropout": config.dropout,
        "batch_size": params.sizing.batch_size,
        "grad_accum": pre.grad_accum,
        "tokens_per_step": inputs.tokens_per_step,
        "lr": pre.lr,
        "min_lr": pre.min_lr,
        "warmup_steps": pre.warmup_steps,
        "weight_decay": pre.weight_decay,
        "betas": [pre.beta1, pre.beta2],
        "grad_clip": pre.grad_clip,
        "mask_rate": pre.mask_rate,
        "val_mask_rate": pre.val_mask_rate,
        "masking": pre.masking,
        "val_batches": pre.val_batches,
        "eval_every": every,
        "seed": int(params.project.seed),
        "tokenizer_sha256": tokenizer_sha,
        "hf_attn_implementation": getattr(hf.model.config, "_attn_implementation", None),
        "device": device.type,
        "precision": inputs.precision,
        "torch_threads": __import__("torch").get_num_threads(),
        "seconds": round(seconds, 1),
        "quick": bool(args.quick),
        "set": list(args.set or []),
    }


def print_table(s: dict[str, Any]) -> None:
    log("")
    log(
        f"masked LM vs BertForMaskedLM: {s['n_layer']} x {s['n_embd']}, block {s['block_size']}, "
        f"ours alibi {s['alibi']}; params ours {s['ours_params']:,}, hf {s['hf_params']:,}; "
        f"val unigram entropy {s['unigram_entropy']:.4f} nats"
    )
    log(f"{'step':>6}{'tokens':>12}{'ours val':>10}{'hf val':>10}{'ours s':>9}{'hf s':>9}")
    for i, step in enumerate(s["eval_steps"]):
        log(
            f"{step:>6}{s['eval_tokens'][i]:>12,}{s['ours_val_loss'][i]:>10.4f}{s['hf_val_loss'][i]:>10.4f}"
            f"{s['ours_seconds'][i]:>9.1f}{s['hf_seconds'][i]:>9.1f}"
        )
    log(
        f"gap to unigram (entropy - final val loss): ours {s['ours_final_gap']:+.4f}, "
        f"hf {s['hf_final_gap']:+.4f}; wall {s['seconds']:.0f}s in all"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a CSV with a text column and a label column")
    parser.add_argument("--text-column", default="review")
    parser.add_argument("--label-column", default="sentiment", help="the prepare stage splits by it")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="default: pretrain.val_every_n_steps (3 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=None, help="project.seed (default: the params')")
    parser.add_argument("--quick", action="store_true", help="a few steps of small batches (smoke test)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="project folder to keep (default: a temp one)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="a params.yaml setting, e.g. model.alibi=false or profiles.batch_size=32 (the active "
        "profile); repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick and args.steps is None:
        args.steps = QUICK_STEPS
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: not a file")
    for name, value in (("--steps", args.steps), ("--eval-every", args.eval_every)):
        if value is not None and value < 1:
            raise SystemExit(f"{name} {value}: must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: quiet them after)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    summary = run(args)
    print_table(summary)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
