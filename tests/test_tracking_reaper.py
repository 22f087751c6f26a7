"""No run RUNNING forever: heartbeats, and the reaper of runs whose process died (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.tracking import reaper
from tests.helpers_tracking import REPO, clear_run_env, make_project, raw_params, tracked_run

HEARTBEAT = {"heartbeat_interval_s": 0.2, "heartbeat_stale_s": 2.0}

# A stage process: opens its run (and a trial under it), says its run ids, then waits for a stop file.
STAGE = """
import sys, time
from pathlib import Path
from bigmodel_ops.config import load_params
from tests.helpers_tracking import tracked_run
out = Path(sys.argv[2])
with tracked_run(load_params("params.yaml"), stage=sys.argv[1]) as run:
    with run.child_run("trial-0") as trial:
        out.write_text(run.run_id + " " + trial.run_id)
        while not Path(str(out) + ".stop").exists():
            time.sleep(0.05)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    clear_run_env(monkeypatch)
    raw = raw_params(tmp_path, **HEARTBEAT)
    root = make_project(tmp_path / "repo", raw)
    monkeypatch.chdir(root)
    return root


def _start_stage(root: Path, stage: str, mlflow_store: str) -> tuple[subprocess.Popen, Path]:
    out = root.parent / f"{stage}.ids"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", STAGE, stage, str(out)], cwd=root, env=env)
    return process, out


def _wait_ids(process: subprocess.Popen, out: Path) -> tuple[str, str]:
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_text().split()) < 2:
        assert process.poll() is None, f"stage process exited with {process.returncode}"
        assert time.monotonic() < deadline, "stage process did not open its run"
        time.sleep(0.1)
    run_id, trial_id = out.read_text().split()
    return run_id, trial_id


def _reap_cli(root: Path, mlflow_store: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bigmodel_ops.cli", "runs", "reap"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sigkilled_stage_is_reaped_and_a_live_one_is_left_alone(project: Path, mlflow_store: str) -> None:
    client = MlflowClient(mlflow_store)
    killed, killed_out = _start_stage(project, "tokenize", mlflow_store)
    alive, alive_out = _start_stage(project, "pretrain", mlflow_store)
    try:
        dead_id, dead_trial = _wait_ids(killed, killed_out)
        live_id, live_trial = _wait_ids(alive, alive_out)
        assert client.get_run(live_id).data.tags[reaper.PID_TAG] == str(alive.pid)

        # A heartbeat younger than stale_s: nothing is reaped, even though one process is dead.
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        experiment = client.get_run(dead_id).info.experiment_id
        verdicts = reaper.reap(client, [experiment], stale_s=600)
        assert {v.run_id for v in verdicts} == {dead_id, live_id} and not any(v.reaped for v in verdicts)
        assert client.get_run(dead_id).info.status == "RUNNING"

        # The live process stops sending heartbeats too (SIGSTOP), so both heartbeats go stale:
        # only the run whose process is gone is reaped.
        alive.send_signal(signal.SIGSTOP)
        time.sleep(HEARTBEAT["heartbeat_stale_s"] + 1.0)
        report = _reap_cli(project, mlflow_store)
        alive.send_signal(signal.SIGCONT)
        assert f"reaped     tokenize {dead_id}" in report and f"left       pretrain {live_id}" in report
        assert "still alive" in report

        dead = client.get_run(dead_id)
        assert dead.info.status == "FAILED"
        assert f"process {killed.pid}" in dead.data.tags[reaper.REAP_TAG]
        assert "is gone" in dead.data.tags[reaper.REAP_TAG]
        trial = client.get_run(dead_trial)
        assert trial.info.status == "FAILED" and "was reaped" in trial.data.tags[reaper.REAP_TAG]
        assert client.get_run(live_id).info.status == "RUNNING"
        assert client.get_run(live_trial).info.status == "RUNNING"
        parent_id = dead.data.tags["mlflow.parentRunId"]
        assert client.get_run(parent_id).info.status == "RUNNING"  # a stage of it still runs

        # The live stage ends normally, untouched by the reaper.
        Path(str(alive_out) + ".stop").write_text("")
        assert alive.wait(timeout=120) == 0
        live = client.get_run(live_id)
        assert live.info.status == "FINISHED" and reaper.REAP_TAG not in live.data.tags
        assert int(live.data.tags[reaper.HEARTBEAT_TAG]) > int(dead.data.tags[reaper.HEARTBEAT_TAG])
    finally:
        for process in (killed, alive):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()


def test_the_next_stage_reaps_a_dead_run_which_a_resume_brings_back(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    killed, out = _start_stage(project, "pretrain", mlflow_store)
    try:
        dead_id, _ = _wait_ids(killed, out)
    finally:
        killed.kill()
        killed.wait()
    time.sleep(HEARTBEAT["heartbeat_stale_s"] + 0.5)
    params = raw_params(tmp_path, **HEARTBEAT)
    from bigmodel_ops.config import parse_params

    with tracked_run(parse_params(params), stage="tokenize"):
        reaped = client.get_run(dead_id)
        assert reaped.info.status == "FAILED" and "is gone" in reaped.data.tags[reaper.REAP_TAG]
    # A killed pretraining resumes into its own run: RUNNING again, then FINISHED, reason removed.
    with tracked_run(parse_params(params), stage="pretrain", resume_run_id=dead_id) as resumed:
        assert resumed.run_id == dead_id
        run = client.get_run(dead_id)
        assert run.info.status == "RUNNING" and run.data.tags[reaper.PID_TAG] == str(os.getpid())
    run = client.get_run(dead_id)
    assert run.info.status == "FINISHED" and reaper.REAP_TAG not in run.data.tags


def test_process_gone_checks_the_pid_and_its_start_time() -> None:
    me = psutil.Process()
    assert not reaper.process_gone(os.getpid(), me.create_time())
    assert reaper.process_gone(os.getpid(), me.create_time() - 3600)  # the PID was reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert reaper.process_gone(child.pid, None)


def test_heartbeat_settings_are_checked(tmp_path: Path) -> None:
    from bigmodel_ops.config import parse_params
    from bigmodel_ops.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"tracking.heartbeat_stale_s \(1\) must exceed tracking.heartbeat_interval_s \(5\)"
    ):
        parse_params(raw_params(tmp_path, heartbeat_interval_s=5, heartbeat_stale_s=1))


def test_a_run_of_another_host_is_reaped_only_when_asked(mlflow_store: str) -> None:
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("elsewhere")
    stale = str(int(time.time() * 1000) - 3_600_000)
    tags = {reaper.HOST_TAG: "lost-node.invalid", reaper.PID_TAG: "4242", reaper.HEARTBEAT_TAG: stale}
    run = client.create_run(experiment, tags=tags, run_name="pretrain").info.run_id
    (left,) = reaper.reap(client, [experiment], stale_s=60)
    assert not left.reaped and "another host (reap with --other-hosts)" in left.reason
    assert client.get_run(run).info.status == "RUNNING"
    (would,) = reaper.reap(client, [experiment], stale_s=60, other_hosts=True, dry_run=True)
    assert would.reaped and client.get_run(run).info.status == "RUNNING"  # a dry run changes nothing
    (reaped,) = reaper.reap(client, [experiment], stale_s=60, other_hosts=True)
    assert reaped.reaped and client.get_run(run).info.status == "FAILED"
    assert client.get_run(run).info.end_time == int(stale)  # ended at its last heartbeat
