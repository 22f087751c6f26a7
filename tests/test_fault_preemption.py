"""Preemption: SIGTERM to the pretrain stage's process checkpoints the current step and stops.

Through the real command (``python -m stages.pretrain``, what dvc.yaml runs) in its own
process, with a real signal: once sent by the process to itself while a known optimizer step
runs (``python -m tests.faults --sigterm-during-step N``, the same command with a test callback),
once sent by the test from outside at whatever step training has reached. Each time: exit
status 143, a checkpoint of the step that was running, the MLflow run KILLED, no model exported,
and the next run resumes from that step in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.model import load_pretrained
from bigmodel_ops.paths import ProjectPaths
from tests.faults import run_stage_process, stage_command
from tests.helpers_pretrain import ckpt_dir, make_project, write_params

pytestmark = pytest.mark.fault


def _cli(root: Path, *faults: str) -> subprocess.CompletedProcess:
    return run_stage_process(root, "pretrain", *faults)


def _pretrain_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


_SETUP = dict(
    train_docs=80,
    model={"dropout": 0.1},
    tracking={"log_every_n_steps": 4},
    pretrain={"checkpoint_every_n_steps": 4, "val_every_n_steps": 4, "register_model": False},
)


@pytest.mark.slow
def test_sigterm_mid_step_checkpoints_that_step_exits_143_and_resumes_exactly(
    tmp_path: Path, mlflow_store: str
):
    straight_root, stopped_root = tmp_path / "straight", tmp_path / "stopped"
    make_project(straight_root, **_SETUP)
    make_project(stopped_root, **_SETUP)
    straight = _cli(straight_root)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # SIGTERM lands while step 6 is computed: between the periodic checkpoints of steps 4 and 8.
    stopped = _cli(stopped_root, "--sigterm-during-step", "6")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM" in stopped.stderr and "step-00000006.ckpt" in stopped.stderr, stopped.stderr[-3000:]
    paths = ProjectPaths(root=stopped_root)
    folder = ckpt_dir(paths)
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step-00000006.ckpt"]
    assert os.path.samefile(folder / "last.ckpt", folder / "step-00000006.ckpt")
    assert _step_of(folder / "last.ckpt") == 6
    assert not list(folder.glob("*.tmp*")) and not list(folder.glob(".*"))
    assert not paths.pretrained_model.exists() and not paths.pretrain_report.exists()
    client = MlflowClient(mlflow_store)
    statuses = sorted(r.info.status for r in _pretrain_runs(client))
    assert statuses == ["FINISHED", "KILLED"], statuses  # the uninterrupted project's, and this one
    (killed,) = [r for r in _pretrain_runs(client) if r.info.status == "KILLED"]
    # What was logged before the signal is in the store (flushed with the checkpoint).
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")] == [4]

    resumed = _cli(stopped_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    assert report["resumed_from_step"] == 6 and report["global_step"] == 12
    assert report["run_id"] == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    # Stopping at a step boundary loses nothing: the result equals the uninterrupted run.
    a = load_pretrained(ProjectPaths(root=straight_root).pretrained_model).state_dict()
    b = load_pretrained(paths.pretrained_model).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_sigterm_from_outside_to_the_real_cli_checkpoints_and_the_next_run_resumes(
    tmp_path: Path, mlflow_store: str
):
    root = tmp_path / "project"
    # A budget the test cannot miss: it signals as soon as the first periodic checkpoint exists.
    setup = dict(
        train_docs=80,
        profiles={"max_steps": 5000},
        tracking={"log_every_n_steps": 10},
        pretrain={"checkpoint_every_n_steps": 20, "val_every_n_steps": 7, "register_model": False},
    )
    _, paths, _ = make_project(root, **setup)
    command, env = stage_command("pretrain")
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list(paths.pretrain_checkpoints.glob("config-*/step-00000020.ckpt")):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 20 within 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    folder = ckpt_dir(paths)
    stopped_at = _step_of(folder / "last.ckpt")
    assert 20 <= stopped_at < 5000
    assert (folder / f"step-{stopped_at:08d}.ckpt").is_file()
    assert f"after step {stopped_at};" in stderr
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)
    assert run.info.status == "KILLED"

    # The next run (a budget just past the stop) resumes from that step in the same run.
    write_params(
        root,
        **{k: v for k, v in setup.items() if k != "train_docs"} | {"profiles": {"max_steps": stopped_at + 2}},
    )
    resumed = _cli(root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    assert report["resumed_from_step"] == stopped_at and report["global_step"] == stopped_at + 2
    assert report["run_id"] == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank0", "group"])
def test_sigterm_under_ddp_checkpoints_on_every_rank_at_one_step_and_the_next_run_resumes(
    target: str, tmp_path: Path, mlflow_store: str
):
    """2 CPU processes (DDP, gloo). SIGTERM to rank 0 only (`kill PID`, a timeout) or to the whole
    process group (what SLURM sends every task at preemption): the ranks agree on one step, rank 0
    writes its checkpoint, both processes exit, the stage exits 143 with its one run KILLED, and
    the next run (2 processes again) resumes from that step in the same run."""
    import psutil

    root = tmp_path / "project"
    setup = dict(
        train_docs=80,
        profiles={"max_steps": 5000, "devices": 2, "strategy": "ddp"},
        tracking={"log_every_n_steps": 10},
        pretrain={"checkpoint_every_n_steps": 10, "val_every_n_steps": 1000, "register_model": False},
    )
    _, paths, _ = make_project(root, **setup)
    command, env = stage_command("pretrain")
    process = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(paths.pretrain_checkpoints.glob("config-*/step-00000010.ckpt")):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 10 within 300 s"
            time.sleep(0.02)
        ranks = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        assert len(ranks) >= 2, ranks  # Lightning started rank 1 as a child process
        if target == "group":
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in ranks[1:]):
        assert time.monotonic() < deadline, "a rank outlived the stage"
        time.sleep(0.2)
    folder = ckpt_dir(paths)
    stopped_at = _step_of(folder / "last.ckpt")
    assert 10 <= stopped_at < 5000 and (folder / f"step-{stopped_at:08d}.ckpt").is_file()
    assert not list(folder.glob(".*"))  # nothing half-written by either rank
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)  # rank 1 opened no run
    assert run.info.status == "KILLED"

    write_params(
        root,
        **{k: v for k, v in setup.items() if k != "train_docs"}
        | {"profiles": {**setup["profiles"], "max_steps": stopped_at + 2}},
    )
    resumed = _cli(root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    assert report["world_size"] == 2
    assert report["resumed_from_step"] == stopped_at and report["global_step"] == stopped_at + 2
    assert report["run_id"] == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
