"""The `bigmodel-ops` command line.

One subcommand per pipeline stage. Every subcommand validates the whole params
file before doing any work, prints a user error without a traceback and exits 2,
and leaves no partial outputs behind (each stage writes to a temporary folder
and moves it into place only when it has finished).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bigmodel_ops.config import DEFAULT_PARAMS_PATH, load_params
from bigmodel_ops.errors import BigModelOpsError
from bigmodel_ops.paths import ProjectPaths

# subcommand -> (module, function, help). Imported lazily so `--help` stays fast.
STAGES: dict[str, tuple[str, str, str]] = {
    "prepare": (
        "bigmodel_ops.data.prepare",
        "run_prepare",
        "Read the raw source, normalise, deduplicate, split (seeded, stratified) and write Parquet "
        "splits plus the unlabeled pretraining pool and a data report.",
    ),
    "tokenize": (
        "bigmodel_ops.tokenizer",
        "run_tokenize",
        "Train a WordPiece or byte-level BPE tokenizer on the pretraining pool and pack the pool "
        "into memory-mapped token shards.",
    ),
    "pretrain": (
        "bigmodel_ops.training.pretrain",
        "run_pretrain",
        "Pretrain the transformer LM (masked or causal) with Lightning on the token shards; "
        "resumes from the last checkpoint; exports safetensors and registers `<project>-base`.",
    ),
    "tune": (
        "bigmodel_ops.tuning",
        "run_tune",
        "Search fine-tuning hyperparameters with Optuna (pruned trials, nested MLflow runs).",
    ),
    "finetune": (
        "bigmodel_ops.finetune",
        "run_finetune",
        "Fine-tune a sequence classifier on the labeled splits from the pretrained backbone.",
    ),
    "evaluate": (
        "bigmodel_ops.evaluation",
        "run_evaluate",
        "Evaluate the classifier on the test split, register it and promote it past the gate.",
    ),
}


def _load_callable(module: str, function: str) -> Callable[..., object]:
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel-ops",
        description="Pretrain, tune, fine-tune, evaluate and register transformer LMs. "
        "Each subcommand is one stage of dvc.yaml and reads ./params.yaml by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: ./params.yaml)"
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")

    for name, (_, _, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_common(stage_parser)

    validate = sub.add_parser("validate", help="Validate the params file and print the resolved config.")
    add_common(validate)

    ui = sub.add_parser("ui", help="Start the MLflow UI on the project's tracking store.")
    add_common(ui)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params)
        if args.command == "validate":
            import yaml

            print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
            return 0
        if args.command == "ui":
            run_ui = _load_callable("bigmodel_ops.tracking.ui", "run_ui")
            return int(run_ui(params, host=args.host, port=args.port) or 0)
        module, function, _ = STAGES[args.command]
        stage = _load_callable(module, function)
        stage(params, paths=ProjectPaths(), quiet=args.quiet)
        return 0
    except BigModelOpsError as error:
        print(f"bigmodel-ops {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"bigmodel-ops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
