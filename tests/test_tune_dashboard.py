"""`bigmodel-ops dashboard`: optuna-dashboard on the project's study journal, bound to 127.0.0.1,
opened in headless Chromium (as tests/test_ui.py does for the MLflow UI)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.tuning.storage import open_storage
from tests.helpers_tracking import free_port, wait_http
from tests.tiny import tiny_params

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
STUDY = "tiny-test-tune-0123456789ab"


def _make_study(journal: Path) -> None:
    storage = open_storage(None, journal=journal, heartbeat_interval=1, grace_period=3, max_retry=0)
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.report(0.5, step=10)
        if trial.number == 2:
            raise optuna.TrialPruned()
        return 0.6 + trial.number / 100

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=3)


def _visible_text(dom: str) -> str:
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_dashboard_serves_the_study_and_its_trials(tmp_path: Path):
    pytest.importorskip("optuna_dashboard")
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    _make_study(ProjectPaths(root=root).tune_journal)
    port = free_port()
    log_path = tmp_path / "dashboard.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bigmodel_ops.cli", "dashboard", "--port", str(port)],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}/dashboard"
        wait_http(f"{base}/", process=process, timeout=120)
        deadline = time.monotonic() + 30
        while f"study: {base}/studies/0  {STUDY}" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        printed = log_path.read_text()
        assert f"optuna-dashboard: {base}/" in printed and f"study: {base}/studies/0  {STUDY}" in printed
        page = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=30000", "--dump-dom", f"{base}/studies/0/trials",
            ],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert page.returncode == 0, page.stderr[-2000:]
        text = _visible_text(page.stdout)
        assert STUDY in text and "3 Trials" in text
        assert "Trial 0 Complete" in text and "Trial 1 Complete" in text and "Trial 2 Pruned" in text
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_dashboard_without_a_study_says_so(tmp_path: Path, monkeypatch, capsys):
    from bigmodel_ops.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    assert main(["dashboard"]) == 2
    assert (
        "outputs/tune/study.journal: no study yet (run `bigmodel-ops tune` first" in capsys.readouterr().err
    )
