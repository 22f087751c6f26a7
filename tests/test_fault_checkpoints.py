"""Corrupt, truncated and torn checkpoints of the pretrain stage.

A damaged checkpoint is named in a clear message. The stage falls back to the newest valid
checkpoint only when one exists, and says so; when none is valid it stops with an error (exit
status 2, no new MLflow run, nothing exported, the damaged files left as they are for
inspection) and never restarts from scratch on its own. Damage that loading alone cannot see
(flipped bytes inside a tensor) is caught by the sha256 written beside every checkpoint.

The failing runs go through the stage's real process (``python -m stages.pretrain``, as DVC
runs it); the checkpoints it meets are made by real training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pipeline.pretrain import run as run_pretrain
from bigmodel_ops.pretraining.checkpoints import find_resume_point
from tests.faults import run_stage_process
from tests.helpers_pretrain import ckpt_dir, make_project, raw_params, write_params

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("one_thread")]

_SETUP = dict(profiles={"max_steps": 4}, pretrain={"register_model": False, "checkpoint_every_n_steps": 4})


def _trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int = 4) -> ProjectPaths:
    _, paths, _ = make_project(tmp_path, **_SETUP)
    monkeypatch.chdir(tmp_path)
    params = parse_params(raw_params(**{**_SETUP, "profiles": {"max_steps": max_steps}}))
    run_pretrain(params, paths=paths, quiet=True)
    return paths


def _continue_to(root: Path, max_steps: int) -> None:
    write_params(root, **{**_SETUP, "profiles": {"max_steps": max_steps}})


def _truncate(path: Path) -> None:
    """Tear the file in place (every hard link to it sees the torn bytes)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _runs(store: str):
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")


def _assert_refused_without_restart(result, paths: ProjectPaths, store: str, damaged: list[Path]) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no valid checkpoint to resume from" in result.stderr
    assert "does not restart from scratch" in result.stderr
    for path in damaged:  # the stage names paths as it sees them: relative to the project
        assert str(path.relative_to(paths.root)) in result.stderr, (path, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    # Nothing trained, nothing exported, no run opened: the one run is the first, FINISHED one.
    assert [r.info.status for r in _runs(store)] == ["FINISHED"]
    assert not paths.pretrained_model.exists() and not paths.pretrain_report.exists()
    assert sorted(p.name for p in ckpt_dir(paths).glob("*.ckpt")) == sorted(p.name for p in damaged)


def test_truncated_only_checkpoint_stops_with_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    paths = _trained(tmp_path, monkeypatch)
    shutil.rmtree(paths.pretrained_model)
    paths.pretrain_report.unlink()
    folder = ckpt_dir(paths)
    step, last = folder / "step-00000004.ckpt", folder / "last.ckpt"
    _truncate(step)  # last.ckpt is a hard link of it: both are torn
    torn = step.read_bytes()
    _continue_to(tmp_path, 6)
    result = run_stage_process(tmp_path, "pretrain")
    _assert_refused_without_restart(result, paths, mlflow_store, [last, step])
    assert "corrupt or truncated checkpoint" in result.stderr
    assert step.read_bytes() == torn  # the evidence is kept as it was


def test_garbage_checkpoints_and_a_planted_foreign_file_are_not_a_reason_to_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    paths = _trained(tmp_path, monkeypatch)
    shutil.rmtree(paths.pretrained_model)
    paths.pretrain_report.unlink()
    folder = ckpt_dir(paths)
    for path in folder.glob("*.ckpt"):
        path.unlink()
        path.write_bytes(b"\x00" * 4096)  # a zero-filled file, as a crash of some file systems leaves
    _continue_to(tmp_path, 6)
    result = run_stage_process(tmp_path, "pretrain")
    _assert_refused_without_restart(
        result, paths, mlflow_store, [folder / "last.ckpt", folder / "step-00000004.ckpt"]
    )


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    paths = _trained(tmp_path, monkeypatch)
    folder = ckpt_dir(paths)
    step = folder / "step-00000004.ckpt"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still a loadable zip: torch.load alone would not notice
    step.unlink()
    (folder / "last.ckpt").unlink()
    step.write_bytes(bytes(data))
    torch.load(step, map_location="cpu", weights_only=True)  # loads fine
    with pytest.raises(
        CheckpointError,
        match=r"step-00000004\.ckpt: corrupt or truncated checkpoint: its sha256 .* does not match",
    ):
        find_resume_point(folder)


def test_a_torn_newest_checkpoint_falls_back_to_an_older_valid_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    paths = _trained(tmp_path, monkeypatch)
    folder = ckpt_dir(paths)
    keep = tmp_path / "kept"
    keep.mkdir()
    for name in ("step-00000004.ckpt", "step-00000004.ckpt.sha256"):
        shutil.copy2(folder / name, keep / name)
    _continue_to(tmp_path, 8)
    assert run_stage_process(tmp_path, "pretrain").returncode == 0
    # An operator kept the step-4 checkpoint; then step 8 (and last.ckpt, its hard link) is torn.
    for name in ("step-00000004.ckpt", "step-00000004.ckpt.sha256"):
        shutil.copy2(keep / name, folder / name)
    newest = folder / "step-00000008.ckpt"
    rel = folder.relative_to(tmp_path)
    _truncate(newest)
    _continue_to(tmp_path, 10)
    result = run_stage_process(tmp_path, "pretrain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"{rel / newest.name}: corrupt" in result.stderr and f"{rel / 'last.ckpt'}: corrupt" in result.stderr
    )
    assert (
        f"falling back to {rel / 'step-00000004.ckpt'} (step 4), the newest valid checkpoint" in result.stderr
    )
    report = json.loads(paths.pretrain_report.read_text())
    assert report["resumed_from_step"] == 4 and report["global_step"] == 10


def test_resume_from_a_truncated_named_checkpoint_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    paths = _trained(tmp_path, monkeypatch)
    named = tmp_path / "saved.ckpt"
    shutil.copy(ckpt_dir(paths) / "last.ckpt", named)
    _truncate(named)
    params = parse_params(
        raw_params(**{**_SETUP, "pretrain": {**_SETUP["pretrain"], "resume_from": str(named)}})
    )
    with pytest.raises(
        CheckpointError,
        match=rf"{named}: checkpoint named by pretrain.resume_from cannot be used: corrupt or truncated",
    ):
        run_pretrain(params, paths=paths, quiet=True)


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from bigmodel_ops.fsutil import publish

folder, size = Path(sys.argv[1]), int(sys.argv[2])
target = folder / "step-00000008.ckpt"
with publish(target) as pub:
    with open(pub.staged(target), "wb") as handle:
        handle.write(os.urandom(size // 2))  # half a checkpoint written...
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # ...when the process is killed
"""

_KILLED_SWAP = """
import os, signal, sys
from pathlib import Path

# Killed inside fsutil._swap, between moving last.ckpt aside and moving its successor in.
folder, suffix = Path(sys.argv[1]), f"{os.getpid()}-0123abcd"
os.replace(folder / "last.ckpt", folder / f".last.ckpt.old-{suffix}")
(folder / f".last.ckpt.tmp-{suffix}").write_bytes(b"a newer, unpublished last.ckpt")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_sigkill_mid_checkpoint_write_are_cleaned_and_nothing_finished_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
):
    """Two real processes SIGKILLed inside our atomic writer: one halfway through staging a
    checkpoint, one between moving last.ckpt aside and moving its successor in (so last.ckpt is
    missing). The next pretrain run resumes from the newest complete checkpoint (step 4), moves the
    old last.ckpt back rather than losing it, removes the dead writers' temporary files, and
    never exposes a partial file under a final name."""
    import os
    import subprocess
    import sys

    from bigmodel_ops.fsutil import LEFTOVER_MIN_AGE_S, sweep_leftovers
    from tests.conftest import REPO_ROOT

    paths = _trained(tmp_path, monkeypatch)
    folder = ckpt_dir(paths)
    step4 = (folder / "step-00000004.ckpt").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for script, args in ((_KILLED_WRITER, [str(len(step4))]), (_KILLED_SWAP, [])):
        done = subprocess.run([sys.executable, "-c", script, str(folder), *args], env=env, timeout=120)
        assert done.returncode == -9
    staged = sorted(folder.glob(".step-00000008.ckpt.tmp-*"))
    moved = sorted(folder.glob(".last.ckpt.old-*"))
    assert len(staged) == 1 and len(moved) == 1 and not (folder / "last.ckpt").exists()
    assert not (folder / "step-00000008.ckpt").exists()  # nothing partial under a final name
    # A fresh staging file may belong to a live writer on another machine: kept until it is old.
    assert sweep_leftovers(folder) == moved and (folder / "last.ckpt").read_bytes() == step4
    assert staged[0].exists()
    old = staged[0].stat().st_mtime - LEFTOVER_MIN_AGE_S - 1
    for path in folder.glob(".*.tmp-*"):
        os.utime(path, (old, old))

    _continue_to(tmp_path, 8)
    result = run_stage_process(tmp_path, "pretrain")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    assert report["resumed_from_step"] == 4 and report["global_step"] == 8
    assert not list(folder.glob(".*.tmp-*")) and not list(folder.glob(".*.old-*")), sorted(
        p.name for p in folder.iterdir()
    )
    assert find_resume_point(folder).global_step == 8


def test_the_sweep_leaves_a_live_writers_files_alone(tmp_path: Path):
    import os
    import subprocess

    from bigmodel_ops.fsutil import sweep_leftovers

    writer = subprocess.Popen(["sleep", "60"])
    try:
        staged = tmp_path / f".model.tmp-{writer.pid}-0123abcd"
        staged.write_bytes(b"being written")
        os.utime(staged, (0, 0))  # old, but its writer is alive
        assert sweep_leftovers(tmp_path) == [] and staged.exists()
    finally:
        writer.kill()
        writer.wait()
    assert sweep_leftovers(tmp_path) == [staged] and not staged.exists()
