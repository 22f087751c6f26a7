"""What pruning saves: the same search with and without the pruner, on the bundled data.

Builds a temporary project from the repo's params.yaml (the bundled IMDb reviews), runs the
prepare, tokenize and pretrain stages once through the library with a small pretraining budget
(``--pretrain-steps``), then runs the ``tune`` stage twice on the same pretrained model: with the
params' pruner (``tune.pruner``, or ``--pruner``) and with ``pruner: none``. Both studies have
the same search space, sampler and seed and the same trial count; each has its own Optuna storage
(a sqlite file), and MLflow logs to a temporary sqlite store.

Prints both studies (trials by state, optimizer steps, seconds, best value), then, last, one
JSON line with at least:

- ``steps_fraction``: optimizer steps of the pruned search over those of the unpruned one;
- ``best_gap_points``: unpruned best minus pruned best, in accuracy points (negative: the
  pruned search found better);
- ``n_trials`` and, per study, the trial counts, steps, seconds and best value.

Targets (issue 11): steps_fraction <= 0.5 and best_gap_points <= 0.5.

Usage::

    python benchmarks/hpo_pruning.py [--quick] [--n-trials 20] [--pruner median] [--set KEY=VALUE] [--keep DIR]

``--quick``: a few pretraining steps and a tiny model, 3 trials, to check the code path (the
numbers mean nothing). ``--keep DIR`` keeps (and reuses) the project folder: the prepare, tokenize
and pretrain stages are skipped when DIR already holds a pretrained model. ``--keep`` also writes
``DIR/study-names.json``: the names of this setup's study on the steps and examples report axes
(for ``hpo_replay.py --examples-study-name``). ``--reuse-unpruned``
(with ``--keep``): the unpruned study's report is saved in DIR, keyed by everything that shapes
that study (the params with the pruner-only settings left out, the torch threads), and a later run
with the same key reuses it instead of running the unpruned study again (the search without a
pruner does not depend on the pruner's settings), so comparing pruner settings costs only the
pruned study. Its seconds were measured in the earlier run, under that run's machine load.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks._project import log, project_dir, repo_params  # noqa: E402

QUICK = {
    # A few steps of a small model: enough to run every code path, not to learn anything.
    "profiles": {"max_steps": 8, "batch_size": 8, "model_preset": "tiny"},
    "model": {"block_size": 64},
    "pretrain": {"warmup_steps": 2, "val_every_n_steps": 4, "val_batches": 2, "checkpoint_every_n_steps": 4},
    "tune": {"train_fraction": 0.25, "report_every_n_steps": 4, "pruner_warmup_steps": 4},
    "finetune": {"max_length": 64},
}


def build_params(args: argparse.Namespace, *, tracking_uri: str) -> dict[str, Any]:
    """The repo's params.yaml (raw mapping) with the benchmark's data path, budget and tracking."""
    raw = repo_params()
    if args.seed is not None:
        raw["project"]["seed"] = args.seed
    raw["tracking"].update({"uri": tracking_uri, "system_metrics": False})
    raw["pretrain"]["register_model"] = False  # registry bookkeeping is not what is measured
    raw["profiles"][raw["profile"]]["max_steps"] = args.pretrain_steps
    if args.pretrain_steps < raw["pretrain"]["warmup_steps"] * 2:
        raw["pretrain"]["warmup_steps"] = max(1, args.pretrain_steps // 5)
    raw["pretrain"]["val_every_n_steps"] = min(raw["pretrain"]["val_every_n_steps"], args.pretrain_steps)
    raw["pretrain"]["checkpoint_every_n_steps"] = raw["pretrain"]["val_every_n_steps"]
    if args.quick:
        for section, values in copy.deepcopy(QUICK).items():
            target = raw["profiles"][raw["profile"]] if section == "profiles" else raw[section]
            target.update(values)
    tune = raw["tune"]
    tune["n_trials"] = args.n_trials
    if args.pruner:
        tune["pruner"] = args.pruner
    for item in args.set or ():
        key, _, value = item.partition("=")
        tune[key] = yaml.safe_load(value)
    return raw


# tune.* settings only the pruner reads: the study without a pruner is the same whatever they are.
# The report axis too: reports measure a val subset without gradients, so the axis changes what an
# unpruned study records (and its seconds a little), not what its trials train or their values.
PRUNER_ONLY = (
    "pruner",
    "report_every_n_examples",
    "pruner_startup_trials",
    "pruner_warmup_steps",
    "min_resource",
    "max_resource",
    "reduction_factor",
    "prune_threshold",
    "storage",
)


def unpruned_key(raw: dict[str, Any], *, threads: int | None) -> str:
    """What the unpruned study depends on: the params less the pruner-only tune settings (and the
    throwaway tracking/storage locations), and the torch threads (they change its seconds)."""
    shaped = copy.deepcopy(raw)
    shaped["tracking"].pop("uri", None)
    for key in PRUNER_ONLY:
        shaped["tune"].pop(key, None)
    text = json.dumps({"params": shaped, "threads": threads}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


STUDY_NAMES = "study-names.json"


def write_study_names(target: Path, raw: dict[str, Any], *, paths: Any) -> None:
    """The names the tune stage gives this setup's study on either report axis (``{"steps": ...,
    "examples": ...}``): the examples axis gets its own study, and Hyperband hashes the name into
    its brackets, so ``hpo_replay.py --examples-study-name`` needs it to replay Hyperband exactly."""
    from bigmodel_ops.config import parse_params
    from bigmodel_ops.pipeline.tune import name_of_study

    names = {}
    for axis, every in (("steps", None), ("examples", 1)):  # the name holds the axis, not N
        variant = copy.deepcopy(raw)
        variant["tune"]["report_every_n_examples"] = every
        if every is not None:
            variant["tune"].pop("report_every_n_steps", None)  # unused on the examples axis
        names[axis] = name_of_study(parse_params(variant, source="params.yaml (study names)"), paths)
    target.write_text(json.dumps(names, indent=1) + "\n")


def study_line(name: str, report: dict[str, Any]) -> str:
    return (
        f"{name:>9}: {report['n_trials']} trials ({report['n_complete']} complete, {report['n_pruned']} "
        f"pruned, {report['n_failed']} failed), {report['total_optimizer_steps']} optimizer steps, "
        f"{report['total_trial_seconds']:.1f} s in trials, best val_acc {report['best_value']:.4f} "
        f"(trial {report['best_trial']})"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bigmodel_ops.config import parse_params
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline import prepare, pretrain, tokenize, tune

    t_start = time.perf_counter()
    with project_dir(args.keep, prefix="hpo-pruning-") as root:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        raw = build_params(args, tracking_uri=uri)
        params = parse_params(raw, source="params.yaml (benchmark overrides)")
        paths = ProjectPaths(root)
        t = params.tune
        log(
            f"hpo-pruning: {params.prepare.source.path}, preset {params.sizing.model_preset}, "
            f"{args.pretrain_steps if not args.quick else QUICK['profiles']['max_steps']} pretraining steps; "
            f"{t.n_trials} trials, sampler {t.sampler} (seed {params.project.seed}), pruner {t.pruner}, "
            f"report every {t.report_every_n_examples or t.report_every_n_steps} "
            f"{'examples' if t.report_every_n_examples else 'steps'} on {t.report_val_fraction:.0%} of val, "
            f"{t.max_epochs} epoch(s) x {t.train_fraction:.0%} of train per trial, "
            f"torch threads {__import__('torch').get_num_threads()}"
            f"{' [QUICK]' if args.quick else ''}"
        )
        if not (paths.pretrained_model / "model.safetensors").is_file():
            started = time.perf_counter()
            rows = prepare.run(params, paths=paths, quiet=True)["rows"]
            tokenize.run(params, paths=paths, quiet=True)
            pre = pretrain.run(params, paths=paths, quiet=True)
            log(
                f"setup: {rows['train']} train / {rows['val']} val rows; pretrained {pre['global_step']} "
                f"steps, val loss {float(pre['val_loss']):.3f} ({time.perf_counter() - started:.0f} s)"
            )
        else:
            log(f"setup: reusing {paths.pretrained_model}")
        if args.keep is not None:
            write_study_names(root / STUDY_NAMES, raw, paths=paths)

        reports: dict[str, dict[str, Any]] = {}
        cached = root / f"unpruned-{unpruned_key(raw, threads=args.threads)}.json"
        # The unpruned study first: with --keep it is saved before the pruned one starts.
        for name, pruner in (("unpruned", "none"), ("pruned", t.pruner)):
            if name == "unpruned" and args.reuse_unpruned and cached.is_file():
                reports[name] = json.loads(cached.read_text())
                log(
                    study_line(name, reports[name])
                    + f"; reused from {cached.name} ({reports[name]['saved_at']})"
                )
                continue
            variant = copy.deepcopy(raw)
            variant["tune"]["pruner"] = pruner
            storage = root / f"study-{name}.db"
            storage.unlink(missing_ok=True)  # a fresh study each time (--keep reuses only the model)
            variant["tune"]["storage"] = f"sqlite:///{storage}"
            started = time.perf_counter()
            reports[name] = tune.run(parse_params(variant), paths=paths, quiet=True)
            reports[name]["stage_seconds"] = round(time.perf_counter() - started, 1)
            log(study_line(name, reports[name]) + f"; stage {reports[name]['stage_seconds']:.0f} s")
            if name == "unpruned" and args.keep is not None:
                saved = {**reports[name], "saved_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                cached.write_text(json.dumps(saved, indent=1, default=str))

    pruned, unpruned = reports["pruned"], reports["unpruned"]
    steps_fraction = pruned["total_optimizer_steps"] / max(unpruned["total_optimizer_steps"], 1)
    seconds_fraction = pruned["total_trial_seconds"] / max(unpruned["total_trial_seconds"], 1e-9)
    gap = 100.0 * (unpruned["best_value"] - pruned["best_value"])
    log(
        f"pruning spent {steps_fraction:.0%} of the optimizer steps and {seconds_fraction:.0%} of the trial "
        f"seconds; best val_acc gap {gap:+.2f} points (unpruned minus pruned); targets: <= 50% and <= 0.5"
    )
    keys = (
        "n_trials",
        "n_complete",
        "n_pruned",
        "n_failed",
        "total_optimizer_steps",
        "total_trial_seconds",
        "best_value",
        "best_trial",
        "stage_seconds",
    )
    return {
        "benchmark": "hpo_pruning",
        "quick": bool(args.quick),
        "pruner": t.pruner,
        "sampler": t.sampler,
        "seed": params.project.seed,
        "n_trials": t.n_trials,
        "steps_fraction": round(steps_fraction, 4),
        "seconds_fraction": round(seconds_fraction, 4),
        "best_gap_points": round(gap, 2),
        "pruned": {k: pruned[k] for k in keys},
        "unpruned": {k: unpruned[k] for k in keys},
        "steps_saved_by_pruning": pruned["steps_saved_by_pruning"],
        "meets_targets": steps_fraction <= 0.5 and gap <= 0.5,
        "unpruned_reused": "saved_at" in unpruned,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the code path only")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per study (default 20; quick 3)")
    parser.add_argument("--pruner", default=None, help="the pruned study's pruner (default: tune.pruner)")
    parser.add_argument("--seed", type=int, default=None, help="project.seed (sampler, data, init)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a tune.* setting for both studies, e.g. reduction_factor=4",
    )
    parser.add_argument("--pretrain-steps", type=int, default=300, help="pretraining steps (default 300)")
    parser.add_argument("--keep", type=Path, default=None, help="project folder to keep and reuse")
    parser.add_argument(
        "--reuse-unpruned",
        action="store_true",
        help="with --keep: reuse the unpruned study's saved report when nothing it depends on changed",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a shared machine)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reuse_unpruned and args.keep is None:
        build_parser().error("--reuse-unpruned needs --keep (the folder that holds the saved report)")
    if args.n_trials is None:
        args.n_trials = 3 if args.quick else 20
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run(args)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
