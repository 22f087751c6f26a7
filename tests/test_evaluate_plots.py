"""What the evaluate stage writes is what DVC renders: `dvc plots show` and `dvc metrics show` in a
real git + DVC repository (the repo's dvc.yaml) on the outputs of a real evaluate run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigmodel_ops.pipeline.evaluate import run as run_evaluate
from tests.conftest import REPO_ROOT
from tests.helpers_evaluate import make_evaluate_project

pytestmark = pytest.mark.skipif(
    shutil.which("dvc") is None and not Path(sys.executable).with_name("dvc").exists(),
    reason="dvc not installed",
)


def _declared_plots() -> dict[str, dict]:
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    return {next(iter(entry)): next(iter(entry.values())) for entry in stage["plots"]}


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}\n{result.stderr}"
    assert "No plots were loaded" not in result.stdout + result.stderr
    return result


def test_dvc_renders_every_declared_plot_and_the_metrics(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    _dvc(tmp_path, "init", "-q")
    params, paths, _, _ = make_evaluate_project(tmp_path, gate={"min": 0.0, "max": {}})
    report = run_evaluate(params, paths=paths, quiet=True)

    declared = _declared_plots()
    assert set(declared) == {
        p.relative_to(tmp_path).as_posix()
        for p in (paths.roc_curve, paths.pr_curve, paths.reliability_curve, paths.confusion_rows)
    }
    # Cached like every output (outputs/ is not in git): `dvc push` / `dvc pull` carry them.
    assert all("cache" not in spec for spec in declared.values())
    assert declared["outputs/plots/confusion.json"]["template"] == "confusion"

    shown = json.loads(_dvc(tmp_path, "plots", "show", "--json").stdout)["data"]
    assert set(shown) == set(declared)
    for path, spec in declared.items():
        content = shown[path][0]["content"]
        assert content["title"]["text"] == spec["title"], path
        values = content["data"]["values"]
        rows = json.loads((tmp_path / path).read_text())
        assert values and len(values) == len(rows), path
        assert spec["x"] in values[0] and spec["y"] in values[0], path
    assert len(shown["outputs/plots/confusion.json"][0]["content"]["data"]["values"]) == 24  # one per example

    _dvc(tmp_path, "plots", "show", "-o", "rendered")
    html = (tmp_path / "rendered" / "index.html").read_text()
    for spec in declared.values():
        assert spec["title"] in html
    assert html.count("vegaEmbed") >= len(declared)

    metrics = json.loads(_dvc(tmp_path, "metrics", "show", "--json").stdout)
    flat = json.dumps(metrics)
    for key in ("test_acc", "baseline_test_acc", "test_acc_minus_baseline", "test_ece", "latency_b32_p95_ms"):
        assert f'"{key}"' in flat, key
    assert report["test_acc"] == json.loads(paths.evaluate_report.read_text())["test_acc"]

    # plots diff against the committed revision renders both revisions
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "first evaluation"], cwd=tmp_path, check=True)
    diff = json.loads(_dvc(tmp_path, "plots", "diff", "HEAD", "--json").stdout)["data"]
    assert set(diff) == set(declared)
