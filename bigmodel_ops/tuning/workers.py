"""Several worker processes on one study: exactly ``n_trials`` trials, none lost, none run twice.

The budget is a queue in the study itself. :func:`fill_queue` (under the storage lock) enqueues
empty WAITING trials until COMPLETE + PRUNED + RUNNING + WAITING trials number ``n_trials``;
workers (:func:`run_worker`) only ever pop WAITING trials (the storage hands each to exactly one
worker) and never create trials, so the total is exact however many workers run, on however many
machines. A trial whose worker dies is failed by the next worker that notices its stale heartbeat
(:func:`~bigmodel_ops.tuning.storage.reap_stale_trials`) and its retry (same parameters) goes back
into the queue, keeping its slot. A trial that fails by itself (an exception, a NaN) uses up its
slot in this run; the next run's :func:`fill_queue` gives the slot back.

A worker ends when the queue is empty and no trial is RUNNING (it waits for the other workers'
running trials, whose retry it may have to run), or at the deadline (queued trials stay WAITING
for the next run).

Worker processes started by :func:`spawn_workers` die with their parent (Linux
``PR_SET_PDEATHSIG``), so killing a ``tune`` command kills its workers; their trials are then
retried by the next run; :func:`threads_per_worker` splits a CPU-only machine's cores between
them. :class:`ClientRun` is how a worker process other than the stage's own logs its trials under
the stage's MLflow run.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from bigmodel_ops.tuning.storage import reap_stale_trials, storage_lock

_logger = logging.getLogger(__name__)

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
SLOT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def fill_queue(
    study: optuna.Study,
    *,
    n_trials: int,
    on_stale: Callable[[FrozenTrial], None] | None = None,
    first: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Reap dead workers' trials, then enqueue empty trials up to ``n_trials`` slots; returns
    ``{"done", "running", "waiting", "enqueued"}`` (running / waiting counted before enqueueing).

    ``first``: the fixed params of the first trial of a study that holds no trial yet (the
    baseline; user attribute ``baseline`` = True); the sampler draws any setting it leaves out.

    Edge cases: a study that already holds ``n_trials`` finished trials enqueues nothing; a
    RUNNING trial of a live worker keeps its slot (its worker finishes it); FAIL trials hold no
    slot, so each run replaces the failures of earlier runs; ``first`` is enqueued only into an
    empty study, so a continued study never gets a second baseline (a failed baseline is
    replaced by a drawn trial).
    """
    reap_stale_trials(study, on_failed=on_stale)
    with storage_lock(study._storage):
        fresh = not study.get_trials(deepcopy=False)
        trials = study.get_trials(deepcopy=False, states=SLOT_STATES)
        counts = {
            "done": sum(t.state in DONE for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
        }
        counts["enqueued"] = max(0, n_trials - len(trials))
        for k in range(counts["enqueued"]):
            if k == 0 and fresh and first is not None:
                study.enqueue_trial(dict(first), user_attrs={"baseline": True})
            else:
                study.enqueue_trial({})
    return counts


def _pop_waiting(study: optuna.Study) -> optuna.Trial | None:
    """The next WAITING trial, now RUNNING and owned by this process; None when the queue is
    empty. What :meth:`optuna.Study.ask` does first, without its fallback of creating a trial."""
    study._thread_local.cached_all_trials = None  # the sampler must see the other workers' trials
    with storage_lock(study._storage):
        trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    catch: tuple[type[BaseException], ...] = (),
    deadline: float | None = None,
    poll_s: float = 1.0,
    on_stale: Callable[[FrozenTrial], None] | None = None,
) -> list[int]:
    """Run queued trials until the queue is empty and nothing is RUNNING, or ``deadline``
    (``time.time()``) passes; return the numbers of the trials this worker ran.

    While a trial runs, Optuna's heartbeat thread records its liveness (every storage of
    :func:`~bigmodel_ops.tuning.storage.open_storage` has one). The objective's value is told as
    COMPLETE (a NaN or inf makes Optuna record FAIL), ``optuna.TrialPruned`` as PRUNED, an
    exception in ``catch`` as FAIL (the worker goes on); any other exception is recorded FAIL and
    re-raised (the worker stops).
    """
    ran: list[int] = []
    storage = study._storage
    while True:
        reap_stale_trials(study, on_failed=on_stale)
        if deadline is not None and time.time() >= deadline:
            _logger.info("tune: worker stops at the timeout; queued trials stay for the next run")
            break
        trial = _pop_waiting(study)
        if trial is None:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(poll_s)  # another worker's trial may still fail and come back as a retry
            continue
        ran.append(trial.number)
        state, value, error = None, None, None
        with get_heartbeat_thread(trial._trial_id, storage):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised unless caught
                state, error = TrialState.FAIL, exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Trial N failed because of the value nan"
            frozen = study.tell(trial, value if state is None else None, state=state)
        if frozen.state == TrialState.FAIL:
            reason = frozen.user_attrs.get("fail_reason") or (repr(error) if error else f"value {value}")
            _logger.warning("tune: trial %d failed: %s", trial.number, reason)
        if error is not None and not isinstance(error, catch):
            raise error
    return ran


def threads_per_worker(workers: int) -> int | None:
    """CPU threads for each worker's torch when several share a CPU-only machine (None: torch's
    default). Without this every worker would start one thread per core and they would fight."""
    import torch

    if workers <= 1 or torch.cuda.is_available():
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphaned workers)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_main(target: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    _die_with_parent()
    target(**kwargs)


def spawn_workers(
    target: Callable[..., Any], specs: list[Mapping[str, Any]]
) -> list[multiprocessing.process.BaseProcess]:
    """Start one fresh interpreter (spawn) per spec running ``target(**spec)``; ``target`` must be
    importable by module path. Each dies with this process."""
    context = multiprocessing.get_context("spawn")
    processes = []
    for spec in specs:
        process = context.Process(target=_child_main, args=(target, dict(spec)), daemon=False)
        process.start()
        processes.append(process)
    return processes


class ClientRun:
    """A run logged straight through :class:`mlflow.tracking.MlflowClient`: what a worker
    process logs its trial runs with (``child_run`` nests them under ``run_id``, the stage's
    ``tune`` run, which the stage process owns and ends). Same methods as the stage run's
    handle that the objective uses: ``run_id``, ``child_run``, ``log_params``, ``log_metrics``,
    ``set_tags``.

    Metrics and tags are buffered and written in one ``log_batch`` at most every ``flush_every_s``
    seconds and when the run ends, so a short trial costs a handful of store writes, not one per
    report; a long trial still shows its reports while it runs. A worker killed with SIGKILL loses
    at most the last ``flush_every_s`` seconds of them (its trial is failed and retried anyway).
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        run_name: str = "tune",
        tags: Mapping[str, Any] = (),
        flush_every_s: float = 10.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.run_name = run_name
        self.flush_every_s = flush_every_s
        self._tags = dict(tags)
        self._experiment_id: str | None = None
        self._metrics: list[Any] = []
        self._pending_tags: dict[str, str] = {}
        self._flushed = time.monotonic()

    def log_params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(str(k), str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, values: Mapping[str, Any], *, step: int, epoch: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(str(k), float(v), now, int(step)) for k, v in values.items())
        self._flush_if_due()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._pending_tags.update({str(k): str(v)[:5000] for k, v in tags.items()})
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics and tags (MLflow takes at most 1000 metrics and 100 tags
        per batch)."""
        from mlflow.entities import RunTag

        metrics, self._metrics = self._metrics, []
        tags = [RunTag(k, v) for k, v in self._pending_tags.items()]
        self._pending_tags = {}
        self._flushed = time.monotonic()
        while metrics or tags:
            self.client.log_batch(self.run_id, metrics=metrics[:1000], tags=tags[:100])
            metrics, tags = metrics[1000:], tags[100:]

    @contextlib.contextmanager
    def child_run(
        self,
        name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        finished_on: tuple[type[BaseException], ...] = (),
    ) -> Iterator[ClientRun]:
        """A nested run ``<run_name>/<name>``; FINISHED, or FAILED / KILLED on an exception
        (re-raised), or FINISHED with ``bigmodel_ops.outcome`` for an exception in ``finished_on``.
        Its buffered metrics and tags are written before it ends, whatever the outcome."""
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        run_name = f"{self.run_name}/{name}"
        child_tags = {
            **self._tags,
            **(tags or {}),
            "mlflow.parentRunId": self.run_id,
            "mlflow.runName": run_name,
        }
        created = self.client.create_run(
            self._experiment_id, run_name=run_name, tags={k: str(v) for k, v in child_tags.items()}
        )
        child = ClientRun(
            self.client, created.info.run_id, run_name=run_name, flush_every_s=self.flush_every_s
        )
        try:
            yield child
        except BaseException as error:
            if isinstance(error, finished_on):
                child.set_tags({"bigmodel_ops.outcome": type(error).__name__})
                status = "FINISHED"
            else:
                child.set_tags({"bigmodel_ops.error": f"{type(error).__name__}: {error}"[:1000]})
                status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
            child.flush()
            self.client.set_terminated(child.run_id, status=status)
            raise
        child.flush()
        self.client.set_terminated(child.run_id, status="FINISHED")


def end_stale_trial_run(client: Any, trial: FrozenTrial) -> None:
    """End the MLflow run of a trial whose worker died (it was left RUNNING): KILLED, tagged
    ``optuna.state = FAIL`` with the reason. A trial without a run, or a store error, is
    skipped (logged)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        from mlflow.entities import RunTag

        reason = str(trial.user_attrs.get("fail_reason", "worker stopped"))
        client.log_batch(run_id, tags=[RunTag("optuna.state", "FAIL"), RunTag("optuna.reason", reason[:500])])
        client.set_terminated(run_id, status="KILLED")
    except Exception as error:  # noqa: BLE001 - the study matters more than the run's status
        _logger.warning("tune: could not end MLflow run %s of trial %d: %s", run_id, trial.number, error)
