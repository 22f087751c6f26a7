"""Exact resume after SIGKILL, and a 2-process DDP run, through the real CLI in subprocesses.

The stage runs as `python -m bigmodel_ops.cli pretrain`, like DVC runs it. The run to be killed
goes through `python -m tests.faults`, the same command with a test callback injected that
SIGKILLs the process right after the checkpoint of a step has been written; the rerun (the real
CLI again) must continue the same MLflow run and end bit-for-bit (within 1e-6) where an
uninterrupted run ends, loss curve included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.model import load_pretrained
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pretraining.data import DataSpec, TokenStream, TrainBatches
from bigmodel_ops.shards import ShardIndex
from tests.conftest import RANK_VARS
from tests.helpers_pretrain import ckpt_dir, make_project


def _cli(root: Path, *faults: str) -> subprocess.CompletedProcess:
    """The pretrain stage's command in root; with fault options, through tests/faults.py."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = ["-m", "tests.faults", *faults] if faults else ["-m", "bigmodel_ops.cli", "pretrain"]
    return subprocess.run(
        [sys.executable, *command, "--params", "params.yaml", "--quiet"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _pretrain_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")


# Tiny train split (a few batches per epoch) so 12 steps cross two epoch boundaries;
# dropout on, so the restored RNG state matters; the kill at step 6 is mid-epoch and in
# the middle of a logging window (log every 4).
_SETUP = dict(
    train_docs=80,
    model={"dropout": 0.1},
    tracking={"log_every_n_steps": 4},
    pretrain={"checkpoint_every_n_steps": 3, "val_every_n_steps": 4, "register_model": False},
)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal", "electra"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, mlflow_store: str, task: str):
    # electra: the generator, the RTD head and the generator's samples (torch's RNG) resume too.
    objective = "causal" if task == "causal" else "masked"
    setup = {**_SETUP, "model": {**_SETUP["model"], "objective": objective}}
    if task == "electra":
        setup["pretrain"] = {**_SETUP["pretrain"], "task": "electra"}
    straight_root, killed_root = tmp_path / "straight", tmp_path / "killed"
    make_project(straight_root, **setup)
    make_project(killed_root, **setup)

    straight = _cli(straight_root)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _cli(killed_root, "--kill-after-checkpoint-step", "6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    paths = ProjectPaths(root=killed_root)
    assert not paths.pretrained_model.exists()
    assert (ckpt_dir(paths) / "step-00000006.ckpt").is_file()

    resumed = _cli(killed_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    reference = json.loads(ProjectPaths(root=straight_root).pretrain_report.read_text())
    assert report["resumed_from_step"] == 6 and report["global_step"] == 12

    # Same weights.
    a = load_pretrained(ProjectPaths(root=straight_root).pretrained_model).state_dict()
    b = load_pretrained(paths.pretrained_model).state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff

    # One MLflow run per project: the resume re-attached to the killed run and finished it.
    client = MlflowClient(mlflow_store)
    runs = {r.info.run_id: r for r in _pretrain_runs(client)}
    assert set(runs) == {report["run_id"], reference["run_id"]}
    assert runs[report["run_id"]].info.status == "FINISHED"
    ckpt = torch.load(ckpt_dir(paths) / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["bigmodel_ops"]["meta"]["run_id"] == report["run_id"]
    assert runs[report["run_id"]].data.tags["bigmodel_ops.resumed_from_step"] == "6"

    # Same loss curves (train loss windows straddle the kill; validation on both sides).
    for key, steps in (("train/loss", [4, 8, 12]), ("val/loss", [4, 8, 12]), ("train/epoch", [4, 8, 12])):
        expected = _history(client, reference["run_id"], key)
        got = _history(client, report["run_id"], key)
        assert [s for s, _ in got] == steps == [s for s, _ in expected], key
        assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(got, expected, strict=True)), (
            key,
            got,
            expected,
        )
    # The setup really crossed epochs and was killed mid-epoch.
    index = ShardIndex.load(paths.shards)
    spec = DataSpec(objective=objective, block_size=32, batch_size=4, seed=7)
    per_epoch = len(TrainBatches(TokenStream.from_index(index, "train"), spec))
    assert 6 % per_epoch != 0 and 12 > 2 * per_epoch, per_epoch
    assert _history(client, report["run_id"], "train/epoch")[-1][1] == (12 - 1) // per_epoch


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_log_one_run(tmp_path: Path, mlflow_store: str):
    root = tmp_path / "ddp"
    make_project(
        root,
        profiles={"devices": 2, "strategy": "ddp", "max_steps": 6},
        pretrain={"checkpoint_every_n_steps": 3, "val_every_n_steps": 3},
    )
    result = _cli(root)
    assert result.returncode == 0, result.stderr[-4000:]
    paths = ProjectPaths(root=root)
    report = json.loads(paths.pretrain_report.read_text())
    assert report["world_size"] == 2 and report["global_step"] == 6
    assert report["tokens"] == 6 * 4 * 32 * 2  # batch x block x ranks per step
    client = MlflowClient(mlflow_store)
    (run,) = _pretrain_runs(client)  # rank 1 logged nothing and created no run
    assert run.info.run_id == report["run_id"] and run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [2, 4, 6]
    assert [s for s, _ in _history(client, run.info.run_id, "val/loss")] == [3, 6]
    assert client.get_model_version_by_alias("pt-test-base", "latest-pretrain").run_id == run.info.run_id
    assert load_pretrained(paths.pretrained_model).config.n_layer == 2
