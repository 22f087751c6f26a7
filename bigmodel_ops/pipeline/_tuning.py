"""The tune stage's study plumbing, shared by the stage process and its worker processes.

:func:`run_pool` runs the queued trials of a study: the stage process is worker 0 and
``n_workers - 1`` processes started with ``spawn`` (:func:`_worker_process`, importable by name)
open the same storage and study, each logging its trials under the stage's ``tune`` run. Before
any of them: :func:`check_inputs` (splits, vocabulary, labels, the models a trial can draw) and
:func:`storage_for` (the study storage, or a ConfigError naming the setting). The stage itself
(:mod:`bigmodel_ops.pipeline.tune`) creates the study, fills its queue and summarises it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from bigmodel_ops.config import Params, parse_params
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline._common import setup_logging
from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams, stage_splits
from bigmodel_ops.tuning.checks import check_classes, check_searchable_models, check_vocabulary
from bigmodel_ops.tuning.pruning import NonFiniteObjective
from bigmodel_ops.tuning.storage import open_storage
from bigmodel_ops.tuning.study import load_study, objective_factory
from bigmodel_ops.tuning.workers import (
    ClientRun,
    end_stale_trial_run,
    run_worker,
    spawn_workers,
    threads_per_worker,
)

_logger = logging.getLogger(__name__)

# A trial that runs out of memory or hits a numerical error fails alone; user errors
# (BigModelOpsError) stop the stage.
CATCH = (RuntimeError, FloatingPointError, NonFiniteObjective)

# How often an idle worker looks for a retry of another worker's trial.
POLL_S = 1.0


def storage_for(
    params: Params, paths: ProjectPaths, *, url: str | None = None, setting: str = "tune.storage"
):
    """The study storage of these params (``url`` overrides ``tune.storage``); ConfigError naming
    ``setting`` when it cannot be opened."""
    tune = params.tune
    return open_storage(
        url if url is not None else tune.storage,
        journal=paths.tune_journal,
        heartbeat_interval=tune.heartbeat_interval_s,
        grace_period=tune.grace_period_s,
        max_retry=tune.max_retry,
        setting=setting,
    )


def tracking_client(params: Params) -> Any:
    """An MlflowClient on the store the stage logs to (``MLFLOW_TRACKING_URI`` over ``tracking.uri``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri)


def check_inputs(params: Params, paths: ProjectPaths) -> tuple[dict, Any]:
    """(splits, base hyperparameters) after every check that needs no study."""
    splits = stage_splits(params, paths)
    check_vocabulary(paths.pretrained_model)
    check_classes(splits["train"], params.prepare.labels, source=paths.prepared / "train.parquet")
    base = hyperparams(params)
    check_searchable_models(
        paths.pretrained_model,
        num_labels=len(params.prepare.labels),
        base=base,
        space=params.tune.search_space,
    )
    return splits, base


def run_pool(
    params: Params,
    *,
    paths: ProjectPaths,
    splits: dict,
    base: Any,
    study: optuna.Study,
    run: Any,
    n_workers: int,
    storage: str | None,
    quiet: bool,
    on_stale: Callable[[optuna.trial.FrozenTrial], None],
    extra_callbacks: Callable[[optuna.Trial], Sequence[Any]] | None,
) -> None:
    """The queued trials, run by this process (worker 0) and ``n_workers - 1`` worker processes
    under the stage run ``run``, until the queue is empty or ``tune.timeout_s`` passes. Helpers are
    terminated when this process fails or is interrupted; a helper's non-zero exit only warns."""
    tune = params.tune
    deadline = time.time() + tune.timeout_s if tune.timeout_s else None
    threads = threads_per_worker(n_workers)
    spec = {
        "params": params.model_dump(mode="json"),
        "root": str(Path(paths.root).resolve()),
        "storage": storage,
        "study": study.study_name,
        "parent_run_id": run.run_id,
        "quiet": quiet,
        "deadline": deadline,
        "threads": threads,
    }
    helpers = spawn_workers(_worker_process, [{**spec, "worker": k} for k in range(1, n_workers)])
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _run_trials(
            params,
            paths=paths,
            splits=splits,
            base=base,
            study=study,
            run=run,
            quiet=quiet,
            deadline=deadline,
            on_stale=on_stale,
            extra_callbacks=extra_callbacks,
        )
    except BaseException:
        for helper in helpers:
            helper.terminate()
        raise
    finally:
        torch.set_num_threads(previous_threads)
        for helper in helpers:
            helper.join()
    for k, helper in enumerate(helpers, start=1):
        if helper.exitcode:
            _logger.warning("tune: worker %d exited with code %s", k, helper.exitcode)


def _worker_process(
    *,
    params: dict,
    root: str,
    storage: str | None,
    study: str,
    parent_run_id: str,
    quiet: bool,
    deadline: float | None,
    worker: int,
    threads: int | None = None,
) -> None:
    """A worker process of ``run``: the same study and objective, its trial runs logged under the
    stage's ``tune`` run through :class:`~bigmodel_ops.tuning.workers.ClientRun`."""
    setup_logging(quiet)
    if threads:
        torch.set_num_threads(threads)
    os.chdir(root)
    resolved = parse_params(params)
    paths = ProjectPaths()
    splits, base = check_inputs(resolved, paths)
    store = storage_for(resolved, paths, url=storage)
    loaded = load_study(resolved.tune, store, study, seed=resolved.project.seed, worker=worker)
    client = tracking_client(resolved)
    _run_trials(
        resolved,
        paths=paths,
        splits=splits,
        base=base,
        study=loaded,
        run=ClientRun(client, parent_run_id),
        quiet=quiet,
        deadline=deadline,
        on_stale=lambda trial: end_stale_trial_run(client, trial),
        worker=worker,
    )


def _run_trials(
    params: Params,
    *,
    paths: ProjectPaths,
    splits: dict,
    base: Any,
    study: optuna.Study,
    run: Any,
    quiet: bool,
    deadline: float | None,
    on_stale: Callable[[optuna.trial.FrozenTrial], None],
    worker: int = 0,
    extra_callbacks: Callable[[optuna.Trial], Sequence[Any]] | None = None,
) -> None:
    """One worker's share of the study (the stage process is worker 0): the trial objective,
    its runs nested under ``run``, then queued trials until none is left or ``deadline``."""
    objective = objective_factory(
        params.tune,
        fit=fit_config(params),
        base=base,
        model_dir=paths.pretrained_model,
        splits=splits,
        run=run,
        study=study.study_name,
        quiet=quiet,
        worker=worker,
        extra_callbacks=extra_callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        run_worker(study, objective, catch=CATCH, deadline=deadline, poll_s=POLL_S, on_stale=on_stale)
