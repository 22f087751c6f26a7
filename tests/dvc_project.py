"""A copy of this repository as a real git + DVC project in a temp dir, with tiny params.

``Project.create`` copies what a fresh clone would hold, shrinks ``params.yaml`` so the whole
pipeline takes about a minute on 2 cores, gives the project its own sqlite MLflow store (or the
``tracking_uri`` given), runs ``git init`` + ``dvc init`` and commits. Tests that drive
``dvc repro`` / ``dvc push`` / kills under DVC all start here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import RANK_VARS, REPO_ROOT

STAGES = ["prepare", "tokenize", "pretrain", "tune", "finetune", "evaluate", "compress"]

# How far two runs that must end with the same weights (a resumed run and an uninterrupted one; a
# stage rerun and the reference) may differ, element by element. Float noise: in full-suite runs,
# two such CPU runs have differed by up to 3.8e-6 (never when the test ran alone), while a resume
# that restores the wrong RNG state, or zeroed AdamW moments, ends 1.6e-2 and 1.7e-2 away from the
# uninterrupted run (the tiny pretrain of tests/test_fault_dvc_kill.py, killed at step 20 of 40).
SAME_WEIGHTS_ATOL = 5e-5


def project_files() -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a fresh clone would hold."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (REPO_ROOT / line).is_file()]


def tiny(params: dict[str, Any]) -> dict[str, Any]:
    """The repo's params, shrunk so the whole pipeline takes about a minute on 2 cores."""
    params["tracking"]["system_metrics"] = False
    params["tokenizer"]["vocab_size"] = 1000
    cpu = params["profiles"]["cpu"]
    cpu.update(model_preset="tiny", max_steps=12, batch_size=8)
    params["model"]["block_size"] = 64
    params["pretrain"].update(val_every_n_steps=6, val_batches=2, checkpoint_every_n_steps=6, warmup_steps=2)
    params["tune"].update(n_trials=2, max_epochs=1)
    params["tune"]["search_space"]["batch_size"] = {"type": "categorical", "choices": [32]}
    params["finetune"].update(max_epochs=1, max_length=64)
    params["evaluate"]["min_accuracy"] = 0.0
    return params


def project_env(root: Path, *, tracking_uri: str | None = None) -> dict[str, str]:
    """This process's environment, minus MLflow/DVC/pytest/launcher variables, for ``root``;
    stages run on one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    for name in RANK_VARS:
        env.pop(name, None)
    env.update(
        # The copy's own package, so that what DVC hashes is what runs.
        PYTHONPATH=str(root),
        MLFLOW_TRACKING_URI=tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        COLUMNS="500",  # DVC wraps its messages at the terminal width; keep each on one line
        OMP_NUM_THREADS="1",  # one torch thread per stage: no reduction order that varies with threads
    )
    return env


class Project:
    """A git + DVC project at ``root``; ``run`` executes commands there with ``env``."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        edit: Callable[[dict[str, Any]], None] | None = None,
        tracking_uri: str | None = None,
    ) -> Project:
        """Copy the repo to ``root`` with ``tiny`` params (then ``edit(params)``), init and commit.

        ``dvc.lock`` and ``outputs/`` of the working copy are not carried: nothing has run yet.
        """
        for name in project_files():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target)
        (root / "dvc.lock").unlink(missing_ok=True)
        shutil.rmtree(root / "outputs", ignore_errors=True)
        params = tiny(yaml.safe_load((root / "params.yaml").read_text()))
        if edit is not None:
            edit(params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        project = cls(root, project_env(root, tracking_uri=tracking_uri))
        project.run("git", "init", "-q")
        if not (root / ".dvc").exists():
            project.run("dvc", "init", "-q", "-f")
        project.commit("init")
        return project

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                f"stderr:\n{result.stderr[-6000:]}"
            )
        return result

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        """Start a command in its own process group (to be killed whole, dvc and its stage),
        its stdout and stderr going to ``log``."""
        with log.open("w") as handle:
            return subprocess.Popen(
                list(args),
                cwd=self.root,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message, "--allow-empty")

    def repro(self, *targets: str, timeout: float = 900) -> set[str]:
        """Run `dvc repro [targets]`; return the names of the stages that actually ran."""
        out = self.run("dvc", "repro", *targets, timeout=timeout).stdout
        return {stage for stage in STAGES if f"Running stage '{stage}'" in out}

    def set_param(self, dotted: str, value: Any) -> None:
        path = self.root / "params.yaml"
        data = yaml.safe_load(path.read_text())
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
