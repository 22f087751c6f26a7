"""The `bigmodel-ops` command line.

One subcommand per pipeline stage (its help is the first line of the stage's ``run`` docstring),
plus ``validate``, ``ui``, ``predict`` (bigmodel_ops/predict.py), ``export-hf``
(bigmodel_ops/export_hf.py), ``compare`` and ``runs reap`` (bigmodel_ops/compare.py). Every subcommand validates the whole params file before doing any
work, prints a user error without a traceback and exits 2, and leaves no partial outputs behind
(each stage publishes its outputs atomically when it has finished).

DVC runs each stage through ``stages/<stage>.py``, which calls
:func:`bigmodel_ops.pipeline._common.run_stage` with that stage's module only, so a stage does
not import the others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from bigmodel_ops import compare
from bigmodel_ops.config import load_params
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import add_common_args, guarded, run_stage, setup_logging, stage_help


def _stages() -> dict[str, ModuleType]:
    from bigmodel_ops.pipeline import compress, evaluate, finetune, prepare, pretrain, tokenize, tune

    modules = (prepare, tokenize, pretrain, tune, finetune, evaluate, compress)
    return {module.__name__.rsplit(".", 1)[-1]: module for module in modules}


def build_parser(stages: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel-ops",
        description="Pretrain, tune, fine-tune, evaluate and register transformer LMs. "
        "Each stage subcommand is one stage of dvc.yaml and reads ./params.yaml by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in stages.items():
        help_text = stage_help(module)
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_common_args(stage_parser)
        if hasattr(module, "add_arguments"):  # stage options beyond --params / --quiet (tune)
            module.add_arguments(stage_parser)
    add_common_args(
        sub.add_parser("validate", help="Validate the params file and print the resolved config.")
    )
    ui = sub.add_parser("ui", help="Start the MLflow UI on the project's tracking store.")
    add_common_args(ui)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument(
        "--auth",
        action="store_true",
        help="MLflow's basic-auth app: admin credentials from MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_AUTH_ADMIN_*) in the environment",
    )
    _add_predict_parser(sub)
    _add_export_hf_parser(sub)
    compare.add_parsers(sub, add_common_args)  # compare, runs reap
    dashboard = sub.add_parser("dashboard", help="Start optuna-dashboard on the tune stage's study storage.")
    add_common_args(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument(
        "--storage", default=None, metavar="URL", help="default: tune.storage, else the journal"
    )
    return parser


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0]


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    from bigmodel_ops import predict

    help_text = _first_line(predict.predict.__doc__)
    parser = sub.add_parser("predict", help=help_text, description=help_text)
    add_common_args(parser)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    parser.add_argument("--file", type=Path, help="a file of texts, one per line ('-': stdin)")
    parser.add_argument(
        "--model",
        metavar="URI",
        help="MLflow model URI, or an exported classifier folder such as outputs/finetune/model "
        "(default: models:/<evaluate.registered_model>@<evaluate.promote_alias>)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_export_hf_parser(sub: argparse._SubParsersAction) -> None:
    from bigmodel_ops import export_hf

    help_text = _first_line(export_hf.export_hf.__doc__)
    parser = sub.add_parser("export-hf", help=help_text, description=help_text)
    add_common_args(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: outputs/hf); gets classifier/ and backbone/",
    )


def main(argv: Sequence[str] | None = None) -> int:
    stages = _stages()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(stages).parse_args(argv)
    if args.command in stages:
        module = stages[args.command]
        if hasattr(module, "command"):  # a stage with its own options (tune --workers / --storage)
            return module.command(argv[1:])
        return run_stage(module, argv[1:])
    setup_logging(args.quiet)

    def action() -> int:
        params = load_params(args.params)
        if args.command == "validate":
            import yaml

            print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
            return 0
        if args.command == "predict":
            from bigmodel_ops.predict import predict

            return predict(params, texts=args.texts, file=args.file, model_uri=args.model, as_json=args.json)
        if args.command in ("compare", "runs"):
            return compare.run_command(params, args)
        if args.command == "export-hf":
            from bigmodel_ops.export_hf import export_hf

            export_hf(ProjectPaths(), out=args.out)
            return 0
        if args.command == "dashboard":
            from bigmodel_ops.tuning.dashboard import run_dashboard

            return run_dashboard(
                url=args.storage if args.storage is not None else params.tune.storage,
                journal=ProjectPaths().tune_journal,
                host=args.host,
                port=args.port,
                setting="--storage" if args.storage is not None else "tune.storage",
            )
        from bigmodel_ops.ui import run_ui

        return run_ui(
            params.tracking, experiment=params.experiment_name, host=args.host, port=args.port, auth=args.auth
        )

    return guarded(args.command, action)


if __name__ == "__main__":
    sys.exit(main())
