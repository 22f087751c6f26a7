"""Running a benchmark script as a user would: a fresh interpreter, its output captured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_benchmark(script: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in ``cwd``; stdout and stderr captured as text."""
    command = [sys.executable, str(script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def json_summary(result: subprocess.CompletedProcess) -> tuple[dict[str, Any], list[str]]:
    """The JSON line a benchmark prints last, and all its stdout lines; the run must have exited 0
    (on failure the assertion shows the tails of its stdout and stderr)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines
