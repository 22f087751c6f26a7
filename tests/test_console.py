"""What a user sees on the console of a command: our lines and every warning, not libraries' chatter."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from bigmodel_ops.trainer import quiet_lightning
from tests.conftest import REPO_ROOT

# A stage's process: MLflow imported (it installs its own handler), then the command's logging set up.
_STAGE = """
import logging, sys
import mlflow
from bigmodel_ops.pipeline._common import setup_logging
setup_logging(quiet=sys.argv[1] == "quiet")
logging.getLogger("onnx_ir.passes.common.unused_removal").info("CHATTER onnx pass")
logging.getLogger("matplotlib.font_manager").info("CHATTER font cache")
logging.getLogger("mlflow.store.db.utils").info("CHATTER creating tables")
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").info("CHATTER skip GPU metrics")
logging.getLogger("bigmodel_ops.pipeline.prepare").info("OURS prepare: 10 rows")
logging.getLogger("onnx_ir.passes.common.unused_removal").warning("LIBRARY WARNING kept")
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").warning("MLFLOW WARNING kept")
"""


@pytest.mark.parametrize("mode", ["normal", "quiet"])
def test_the_console_keeps_our_lines_and_warnings_and_drops_library_info(mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STAGE, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "CHATTER" not in console, console
    assert "LIBRARY WARNING kept" in console and "MLFLOW WARNING kept" in console, console
    assert ("OURS prepare: 10 rows" in console) == (mode == "normal"), console


def test_lightning_lines_that_say_nothing_about_the_run_are_dropped() -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_lightning()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        rank_zero_info("Loading `train_dataloader` to estimate number of stepping batches.")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels")
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=8` reached.")
    finally:
        logger.removeHandler(handler)
    assert seen == ["`Trainer.fit` stopped: `max_steps=8` reached."]
