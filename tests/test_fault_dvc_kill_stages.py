"""Issue #13, scenario 16: `dvc repro` SIGKILLed during each stage in turn.

Two copies of the tiny project: one reproduces the whole pipeline uninterrupted (the reference);
in the other, each stage in turn runs under ``dvc repro <stage>`` until its MLflow run is RUNNING
(the stage is past start-up and working), then the whole process group (dvc and the stage) is
SIGKILLed, as a lost terminal or the OOM killer would. After each kill:

- ``dvc.lock`` is byte-for-byte what it was before that ``dvc repro`` (nothing recorded for the
  killed stage), and none of the stage's outputs exists under its final name (no partial output);
- the next ``dvc repro <stage>`` runs it again and ends equal to the reference: the same data,
  tokenizer and shard hashes, the same fine-tuned weights (within ``SAME_WEIGHTS_ATOL``), the
  same evaluation and compression quality figures (latencies differ from run to run and are not
  compared);
- the killed MLflow run does not stay RUNNING: the next stage start reaps it FAILED (its heartbeat
  is stale and its process is gone), with the reason on the run.

Pretraining (resume to equal weights, tests/test_fault_dvc_kill.py) and tuning (the study
continues, tests/test_tune_dvc_resume.py) keep their own, stronger tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.dvc_project import SAME_WEIGHTS_ATOL, STAGES, Project, project_env

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KILLED = ["prepare", "tokenize", "finetune", "evaluate", "compress"]
# Seconds to let a stage work after its run shows RUNNING (fine-tuning: into its first epoch).
WORK_BEFORE_KILL = {"finetune": 1.5}
# Not compared: figures that measure this machine's speed, and those of the ONNX export, which is
# not byte-reproducible (its file size differs by ~0.1% from one export to the next, and with it
# the export check's max |diff|); the variants' accuracy and agreement are compared.
TIMING = ("latency", "_ms", "per_s", "speedup", "seconds", "time", "throughput", "size_mb", "size_ratio")
TIMING += ("max_abs_diff",)


def _edit(params: dict) -> None:
    params["tracking"].update(heartbeat_interval_s=1, heartbeat_stale_s=2)
    params["evaluate"]["latency_repeats"] = 2


def _running(db: Path, stage: str) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT run_uuid FROM runs WHERE name = ? AND status = 'RUNNING'", (stage,))
            return [row[0] for row in rows]
    except sqlite3.Error:  # being migrated or written: look again
        return []


def _kill_during(project: Project, stage: str) -> str:
    """Run `dvc repro <stage>` until the stage's run is RUNNING, SIGKILL the group; the run id."""
    db = project.root / "mlflow.db"
    before = set(_running(db, stage))
    log_path = project.root.parent / f"kill-{stage}.log"
    victim = project.start("dvc", "repro", stage, log=log_path)
    run_id = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            new = set(_running(db, stage)) - before
            if new:
                (run_id,) = new
                time.sleep(WORK_BEFORE_KILL.get(stage, 0.0))
                break
            time.sleep(0.02)
        alive = victim.poll() is None
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    assert run_id is not None and alive, f"{stage} ended before the kill:\n{log_path.read_text()[-4000:]}"
    return run_id


def _cached_outs(lock: dict, stage: str) -> dict[str, str]:
    """The stage's data outputs and their md5 (metrics and plots hold timings: compared apart)."""
    return {
        out["path"]: out["md5"]
        for out in lock["stages"][stage]["outs"]
        if not out["path"].startswith(("outputs/metrics/", "outputs/plots/"))
    }


def _metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "outputs" / "metrics" / f"{stage}.json").read_text())


def _flat(data: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture
def projects(tmp_path: Path) -> tuple[Project, Project]:
    """(to be killed stage by stage, reference) with identical files; the reference reproduced."""
    killed = Project.create(tmp_path / "killed", edit=_edit)
    reference_root = tmp_path / "reference"
    shutil.copytree(killed.root, reference_root, symlinks=True)
    reference = Project(reference_root, project_env(reference_root))
    assert reference.repro() == set(STAGES)
    return killed, reference


def test_sigkill_of_each_stage_under_dvc_repro_changes_no_lock_and_reruns_to_equal_results(projects):
    killed, reference = projects
    root = killed.root
    reference_lock = yaml.safe_load((reference.root / "dvc.lock").read_text())
    client = MlflowClient(killed.env["MLFLOW_TRACKING_URI"])
    victims: dict[str, str] = {}
    for stage in STAGES:
        if stage not in KILLED:
            assert killed.repro(stage) == {stage}
            continue
        lock_path = root / "dvc.lock"
        lock_before = lock_path.read_bytes() if lock_path.exists() else None
        victims[stage] = _kill_during(killed, stage)
        assert (lock_path.read_bytes() if lock_path.exists() else None) == lock_before, stage
        for out in (o["path"] for o in reference_lock["stages"][stage]["outs"]):
            assert not (root / out).exists(), f"{stage}: {out} exists after the kill"
        assert not (root / "outputs" / "metrics" / f"{stage}.json").exists(), stage

        assert killed.repro(stage) == {stage}
        lock = yaml.safe_load(lock_path.read_text())
        if stage in ("prepare", "tokenize"):
            assert _cached_outs(lock, stage) == _cached_outs(reference_lock, stage), stage
        if stage == "finetune":
            got = load_file(root / "outputs/finetune/model/model.safetensors")
            want = load_file(reference.root / "outputs/finetune/model/model.safetensors")
            assert got.keys() == want.keys()
            worst = max(float((got[k] - want[k]).abs().max()) for k in got)
            assert worst <= SAME_WEIGHTS_ATOL, worst
        got, want = _flat(_metrics(root, stage)), _flat(_metrics(reference.root, stage))
        quality = {k: v for k, v in want.items() if not any(t in k for t in TIMING)}
        assert quality and set(quality) <= set(got), (stage, sorted(want), sorted(got))
        for key, value in quality.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (stage, key)

    assert "up to date" in killed.run("dvc", "status").stdout.lower()
    # Every killed run was reaped by a later stage's start: FAILED, with the reason on it.
    for stage, run_id in victims.items():
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":  # the last stage's victim: no stage started after it
            assert stage == KILLED[-1]
            continue
        assert run.info.status == "FAILED", (stage, run.info.status)
        assert "bigmodel_ops.reap_reason" in run.data.tags, stage
