"""`dvc push` / `dvc pull` through the repo's default remote, then a fresh clone that needs no rerun.

One real run of the whole pipeline in a temp git + DVC project (tests/dvc_project.py), pushed
to the remote the repo's ``.dvc/config`` names by default: a local directory next to the checkout
(``<parent>/bigmodel-ops-dvc-storage``; the relative url is resolved against ``.dvc/``). A
``git clone`` elsewhere (another "machine": its default resolves to a folder that does not exist)
fails to pull with DVC's error, points the remote at the shared folder with
``dvc remote modify --local`` (the documented per-machine override) and pulls. Then every output
is byte-identical to the original's, ``dvc status`` is clean, ``dvc repro`` runs no stage, and
``bigmodel-ops predict`` works.

Predict loads ``models:/<name>@champion`` from the MLflow registry, which DVC does not move: the
clone uses the tracking store of the original (the team's shared tracking server in real use);
with an empty store of its own predict fails with a clear error. The registry's model gives the
same predictions as the pulled ``outputs/finetune/model`` folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import STAGES, Project, project_env

pytestmark = pytest.mark.slow

REMOTE_DIR = "bigmodel-ops-dvc-storage"  # .dvc/config: url = ../../bigmodel-ops-dvc-storage
# The cached outputs (data, tokenizer, shards, checkpoints, models, reports) must all travel.
MUST_TRAVEL = {
    "outputs/prepared",
    "outputs/tokenizer",
    "outputs/shards",
    "outputs/pretrain/checkpoints",
    "outputs/pretrain/model",
    "outputs/tune",
    "outputs/finetune/model",
    "outputs/finetune/control",
    "outputs/evaluate",
    "outputs/compress",
}
TEXTS = ["A wonderful, moving film with great acting.", "Dull plot and terrible dialogue; a waste of time."]


def _lock_outs(root: Path) -> list[str]:
    """Every output path dvc.lock records (outs, metrics and plots)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def _digest(path: Path) -> dict[str, str]:
    """{relative file: sha256} of a file or a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_push_clone_pull_then_repro_runs_nothing_and_predict_works(tmp_path: Path):
    origin = Project.create(tmp_path / "origin")
    remote = tmp_path / REMOTE_DIR
    listed = origin.run("dvc", "remote", "list").stdout
    # DVC wraps long lines at the terminal width: compare without the whitespace.
    assert str(remote) in "".join(listed.split()) and "(default)" in listed, listed

    assert origin.repro() == set(STAGES)
    origin.commit("repro: dvc.lock")
    pushed = origin.run("dvc", "push")
    assert remote.is_dir() and any(remote.rglob("*.dir")), pushed.stdout
    assert "in sync" in origin.run("dvc", "status", "--cloud").stdout

    outs = _lock_outs(origin.root)
    assert MUST_TRAVEL <= set(outs)

    # Another machine: a clone in another folder; its default remote resolves next to *it*,
    # where nothing was pushed, so the pull fails with DVC's own error.
    clone_root = tmp_path / "machine-b" / "project"
    clone_root.parent.mkdir()
    subprocess.run(["git", "clone", "-q", str(origin.root), str(clone_root)], check=True, env=origin.env)
    clone = Project(clone_root, project_env(clone_root))  # its own, empty MLflow store
    assert not (clone_root / "outputs").exists()
    missing = clone.run("dvc", "pull", check=False)
    assert missing.returncode != 0
    assert "failed to pull" in (missing.stdout + missing.stderr).lower(), missing.stderr

    clone.run("dvc", "remote", "modify", "--local", "storage", "url", str(remote))
    clone.run("dvc", "pull")
    for out in outs:
        assert (clone_root / out).exists(), f"{out} was not pulled"
        assert _digest(clone_root / out) == _digest(origin.root / out), f"{out} differs after pull"
    status = clone.run("dvc", "status").stdout
    assert "up to date" in status, status
    assert clone.repro() == set()
    assert "up to date" in clone.run("dvc", "status").stdout

    # Predict: the registry is MLflow's, not DVC's. With the clone's own empty store: a clear error.
    cli = ("python", "-m", "bigmodel_ops.cli", "predict", "--quiet", "--json", *TEXTS)
    alone = clone.run(*cli, check=False)
    assert alone.returncode == 2 and "cannot load model 'models:/" in alone.stderr, alone.stderr
    # With the shared tracking store, the champion loads and classifies.
    shared = Project(clone_root, {**clone.env, "MLFLOW_TRACKING_URI": origin.env["MLFLOW_TRACKING_URI"]})
    records = [json.loads(line) for line in shared.run(*cli).stdout.splitlines() if line.startswith("{")]
    labels = yaml.safe_load((clone_root / "params.yaml").read_text())["prepare"]["labels"]
    assert [r["text"] for r in records] == TEXTS
    assert all(r["label"] in labels and set(r["probabilities"]) == set(labels) for r in records)

    # ... and it is the pulled model: the folder gives the same labels and scores.
    from bigmodel_ops.classification.export import load_classifier

    pulled_labels, pulled_scores = load_classifier(clone_root / "outputs/finetune/model").predict(TEXTS)
    assert [r["label"] for r in records] == pulled_labels
    assert [r["score"] for r in records] == pytest.approx(pulled_scores, abs=1e-5)
    # With no tracking store at all: predict straight from the pulled classifier folder.
    local = clone.run(*cli[:4], "--model", "outputs/finetune/model", *cli[4:])
    from_folder = [json.loads(line) for line in local.stdout.splitlines() if line.startswith("{")]
    assert [r["label"] for r in from_folder] == [r["label"] for r in records]
    assert [r["score"] for r in from_folder] == pytest.approx([r["score"] for r in records], abs=1e-6)
