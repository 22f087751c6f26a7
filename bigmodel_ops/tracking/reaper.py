"""No run stays RUNNING forever: heartbeats of running stages, and the reaper of dead ones.

Every stage run is tagged with its ``bigmodel_ops.host``, ``bigmodel_ops.pid`` and the process's
start time (``bigmodel_ops.pid_start``, so a reused PID is not mistaken for the stage), and
:class:`Heartbeat` sets ``bigmodel_ops.heartbeat`` (ms since the epoch) every
``tracking.heartbeat_interval_s`` through the run's queue.

:func:`reap` ends FAILED, with the tag ``bigmodel_ops.reap_reason``, a RUNNING run that carries a
PID only when BOTH its heartbeat is older than ``stale_s`` AND its process is gone (no such PID,
a zombie, or another process under that PID). A run of another host cannot be checked from
here: it is reaped only with ``other_hosts=True`` (a lost node), on the heartbeat alone. With a
reaped run end its RUNNING child runs (tuning trials) and, when no other child still runs, its
pipeline parent. A stage run that is resumed later re-attaches and ends FINISHED as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import psutil
from mlflow.tracking import MlflowClient

HOST_TAG = "bigmodel_ops.host"
PID_TAG = "bigmodel_ops.pid"
PID_START_TAG = "bigmodel_ops.pid_start"
HEARTBEAT_TAG = "bigmodel_ops.heartbeat"
REAP_TAG = "bigmodel_ops.reap_reason"


def process_tags() -> dict[str, str]:
    """The host, PID, process start time and a first heartbeat of this process."""
    start = psutil.Process().create_time()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_START_TAG: f"{start:.2f}",
        HEARTBEAT_TAG: str(int(time.time() * 1000)),
    }


class Heartbeat:
    """Sets the heartbeat tag of ``run`` every ``interval_s`` on a daemon thread until ``stop()``."""

    def __init__(self, run: Any, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(run, interval_s), name="bigmodel_ops-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self, run: Any, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with contextlib.suppress(Exception):  # a lost heartbeat only makes the run look stale
                run.set_tags({HEARTBEAT_TAG: str(int(time.time() * 1000))})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def process_gone(pid: int, start: float | None) -> bool:
    """True when no live process ``pid`` started at ``start`` (seconds since the epoch) exists."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return start is not None and abs(process.create_time() - start) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the reaper decided about one RUNNING run (``reaped``: it was ended FAILED)."""

    run_id: str
    run_name: str
    reaped: bool
    reason: str


def judge(run: Any, *, stale_s: float, other_hosts: bool, now_ms: int) -> Verdict | None:
    """The verdict on a RUNNING run; None for a run without a PID (a pipeline parent, a trial)."""
    tags = run.data.tags
    if PID_TAG not in tags:
        return None
    verdict = functools.partial(Verdict, run.info.run_id, run.info.run_name)
    try:
        pid, beat = int(tags[PID_TAG]), int(tags.get(HEARTBEAT_TAG) or run.info.start_time or 0)
        start = float(tags[PID_START_TAG]) if tags.get(PID_START_TAG) else None
    except ValueError:
        return verdict(False, "unreadable pid/heartbeat tags: left alone")
    age_s = (now_ms - beat) / 1000
    host = tags.get(HOST_TAG, "?")
    where = f"process {pid} on {host}"
    if age_s <= stale_s:
        return verdict(False, f"{where}: heartbeat {age_s:.0f}s ago")
    if host != socket.gethostname() and not other_hosts:
        return verdict(False, f"{where}: heartbeat {age_s:.0f}s ago, another host (reap with --other-hosts)")
    if host == socket.gethostname() and not process_gone(pid, start):
        return verdict(False, f"{where} still alive (heartbeat {age_s:.0f}s ago): left alone")
    reason = f"{where} is gone and its last heartbeat was {age_s:.0f}s ago (stale after {stale_s:g}s)"
    return verdict(True, reason)


def reap(
    client: MlflowClient,
    experiment_ids: Iterable[str],
    *,
    stale_s: float,
    other_hosts: bool = False,
    dry_run: bool = False,
    skip: Iterable[str] = (),
) -> list[Verdict]:
    """Judge every RUNNING run with a PID in the experiments, but those in ``skip`` (a run being
    resumed), and end the dead ones (module docstring); returns the verdicts (``dry_run``: decided
    but nothing ended)."""
    now_ms = int(time.time() * 1000)
    running = client.search_runs(list(experiment_ids), "attributes.status = 'RUNNING'", max_results=1000)
    running = [run for run in running if run.info.run_id not in set(skip)]
    verdicts = [
        v for run in running if (v := judge(run, stale_s=stale_s, other_hosts=other_hosts, now_ms=now_ms))
    ]
    by_id = {run.info.run_id: run for run in running}
    for verdict in verdicts:
        if verdict.reaped and not dry_run:
            _end(client, by_id[verdict.run_id], verdict.reason)
            _end_family(client, by_id, verdict)
    return verdicts


def _end(client: MlflowClient, run: Any, reason: str) -> None:
    client.set_tag(run.info.run_id, REAP_TAG, reason[:1000])
    beat = run.data.tags.get(HEARTBEAT_TAG)
    end = int(beat) if beat and beat.isdigit() else None
    client.set_terminated(run.info.run_id, status="FAILED", end_time=end)


def _end_family(client: MlflowClient, running: dict[str, Any], verdict: Verdict) -> None:
    """End the RUNNING children of a reaped run, and its parent when none of its children runs."""
    reaped = f"{verdict.run_name} ({verdict.run_id}) was reaped: {verdict.reason}"
    for child in running.values():
        if child.data.tags.get("mlflow.parentRunId") == verdict.run_id:
            _end(client, child, f"its run {reaped}")
    parent_id = running[verdict.run_id].data.tags.get("mlflow.parentRunId")
    if parent_id is None or parent_id not in running:
        return
    siblings = client.search_runs(
        [running[parent_id].info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    if not [s for s in siblings if s.info.run_id != verdict.run_id]:
        _end(client, running[parent_id], f"stage run {reaped}")
