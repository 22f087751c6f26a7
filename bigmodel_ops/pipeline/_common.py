"""What every stage module shares: running as a command, and its MLflow run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bigmodel_ops.config import DEFAULT_PARAMS_PATH, Params, load_params
from bigmodel_ops.errors import BigModelOpsError
from bigmodel_ops.paths import ProjectPaths


def stage_run(params: Params, stage: str, **kwargs: Any) -> Any:
    """The stage's MLflow run (:func:`bigmodel_ops.tracking.stage_run`) for these params.

    The validated params are what lineage hashes and the pipeline run logs, so
    ``--params other.yaml`` is tracked as what ran, not as the params.yaml on disk.
    """
    from bigmodel_ops.tracking import stage_run as _stage_run

    return _stage_run(
        params.tracking,
        experiment=params.experiment_name,
        stage=stage,
        params=params.model_dump(mode="json"),
        **kwargs,
    )


def stage_help(stage: ModuleType) -> str:
    """The first line of the stage's ``run`` docstring (its CLI help)."""
    return (stage.run.__doc__ or "").strip().splitlines()[0]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: ./params.yaml)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")


# Libraries whose INFO lines say nothing a user acts on: MLflow creating its tables, skipping
# GPU metrics on a CPU machine, validating an input example. Their warnings still show.
_CHATTY_MLFLOW = ("mlflow.store.db.utils", "mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models")


def setup_logging(quiet: bool) -> None:
    """The console of a command: bigmodel_ops' INFO lines (none with ``quiet``) and every library's
    warnings; libraries' INFO lines (ONNX's optimizer passes, matplotlib's font cache, MLflow's
    housekeeping) stay out. Lightning and Optuna print through their own handlers (see trainer.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bigmodel_ops").setLevel(logging.WARNING if quiet else logging.INFO)
    for name in _CHATTY_MLFLOW:
        logging.getLogger(name).setLevel(logging.WARNING)


def guarded(command: str, action: Callable[[], int | None]) -> int:
    """Run action; a user error prints one line without a traceback and gives its exit code (2)."""
    try:
        return int(action() or 0)
    except BigModelOpsError as error:
        print(f"bigmodel-ops {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"bigmodel-ops {command}: interrupted", file=sys.stderr)
        return 130


def run_stage(stage: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Run one stage module as a command: ``--params`` / ``--quiet``, validation, exit codes.

    Imports nothing but the given stage, so ``stages/<stage>.py`` (what DVC runs) loads only
    the code that stage depends on.
    """
    name = stage.__name__.rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(prog=f"bigmodel-ops {name}", description=stage_help(stage))
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.quiet)

    def action() -> None:
        stage.run(load_params(args.params), paths=ProjectPaths(), quiet=args.quiet)

    return guarded(name, action)
