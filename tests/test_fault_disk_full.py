"""A full disk while the pretrain stage writes a checkpoint and while the prepare stage publishes
its outputs, on a real size-limited file system (a tmpfs mounted with ``size=``; skipped, with
the reason, where this machine cannot mount one).

Each time: a non-zero exit with one line naming what could not be written, the previous
checkpoint / outputs byte-for-byte intact, no partial file under a final name, no staged file
left behind; and once space is freed, the next run continues from what was kept.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.paths import ProjectPaths
from tests.faults import run_stage_process
from tests.helpers_pretrain import ckpt_dir, make_project, write_params
from tests.test_prepare import labeled_rows, params_dict, write_csv

pytestmark = pytest.mark.fault


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_fs("16m")``: a fresh tmpfs of that size mounted under tmp_path (unmounted after)."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"small-{len(mounts)}"
        where.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no `mount` command on this machine: cannot make a size-limited file system")
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a size-limited tmpfs ({result.stderr.strip() or 'mount failed'}): "
                "needs root with CAP_SYS_ADMIN"
            )
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path, *, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on folder's file system."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    assert free > leave, (free, leave)
    filler = folder / "filler.bin"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * (free - leave))
    return filler


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(
    small_fs: Callable[[str], Path], mlflow_store: str
):
    root = small_fs("24m")
    setup = dict(profiles={"max_steps": 4}, pretrain={"checkpoint_every_n_steps": 4, "register_model": False})
    _, paths, _ = make_project(root, **setup)
    first = run_stage_process(root, "pretrain")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = ckpt_dir(paths)
    checkpoints_before = _tree(folder)
    assert sorted(checkpoints_before) == [
        "last.ckpt",
        "last.ckpt.sha256",
        "step-00000004.ckpt",
        "step-00000004.ckpt.sha256",
    ]
    model_before = _tree(paths.pretrained_model)
    report_before = paths.pretrain_report.read_bytes()

    size = (folder / "step-00000004.ckpt").stat().st_size
    filler = _fill(root, leave=size // 2)  # room for half a checkpoint
    write_params(root, **{**setup, "profiles": {"max_steps": 8}})
    full = run_stage_process(root, "pretrain")
    assert full.returncode == 2, full.stderr[-3000:]
    assert "step-00000008.ckpt: cannot write the checkpoint (No space left on device)" in full.stderr, (
        full.stderr[-3000:]
    )
    assert "Traceback" not in full.stderr
    assert _tree(folder) == checkpoints_before  # nothing new, nothing torn, nothing staged
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert (
        _tree(paths.pretrained_model) == model_before and paths.pretrain_report.read_bytes() == report_before
    )
    client = MlflowClient(mlflow_store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string="tags.`bigmodel_ops.stage` = 'pretrain'")
    assert run.info.status == "FAILED"

    # Space freed: the next run resumes from the kept checkpoint.
    filler.unlink()
    again = run_stage_process(root, "pretrain")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(paths.pretrain_report.read_text())
    assert report["resumed_from_step"] == 4 and report["global_step"] == 8


def test_disk_full_while_publishing_prepared_data_keeps_the_previous_outputs(
    small_fs: Callable[[str], Path], tmp_path: Path, mlflow_store: str
):
    root = small_fs("8m")
    source = tmp_path / "data" / "reviews.csv"  # the raw data lives elsewhere; outputs go to root
    write_csv(source, labeled_rows(200))
    raw = params_dict(source={"kind": "csv", "path": str(source)}, pretrain_pool="all")
    raw["tracking"]["artifact_location"] = (tmp_path / "artifacts").as_uri()
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    first = run_stage_process(root, "prepare")
    assert first.returncode == 0, first.stderr[-3000:]
    paths = ProjectPaths(root=root)
    outputs_before = _tree(root / "outputs")
    assert "prepared/train.parquet" in outputs_before and "metrics/prepare.json" in outputs_before

    # New data, about 3 MB of text that does not compress away, with ~1 MB free.
    rows = [(f"{text} {os.urandom(1500).hex()}", label) for text, label in labeled_rows(1000)]
    write_csv(source, rows)
    filler = _fill(root, leave=1 << 20)
    full = run_stage_process(root, "prepare")
    assert full.returncode == 2, full.stderr[-3000:]
    assert full.stderr.startswith("bigmodel-ops prepare: error: no space left on the device while writing")
    assert "outputs/prepared" in full.stderr and "the previous outputs are intact" in full.stderr
    assert _tree(root / "outputs") == outputs_before
    leftovers = [p for p in (root / "outputs").rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    assert paths.prepare_report.is_file()

    filler.unlink()
    again = run_stage_process(root, "prepare")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(paths.prepare_report.read_text())["rows"]["train"] > 500
