"""The GPU fast paths, run on CPU through the pretrain stage: ``compile: true`` and ``bf16-mixed``.

Both work on CPU (inductor generates C++, autocast has a CPU bf16 path), so a GPU run does not
meet them for the first time. Each case trains the tiny preset for a few steps, resumes nothing,
validates, checkpoints and exports; the checks are that the fast path really ran (graphs
compiled / matmuls in bfloat16), the loss is finite and drops, and the export is exactly the
final checkpoint's weights under the plain (uncompiled) names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.model import load_pretrained
from bigmodel_ops.pipeline.pretrain import run as run_pretrain
from tests.helpers_pretrain import ckpt_dir, make_project

pytestmark = pytest.mark.usefixtures("no_rank_env")


class _Probe(pl.Callback):
    """Records what the training step really ran with: the dtype of the LM head's output
    (bfloat16 under bf16 autocast) and whether the model's forward is compiled."""

    def __init__(self) -> None:
        self.head_dtypes: set[torch.dtype] = set()
        self.compiled: bool | None = None
        self._handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.compiled = getattr(pl_module.model, "_compiled_call_impl", None) is not None
        if not self.compiled:  # a hook inside a compiled region would be traced, not called
            self._handle = pl_module.model.lm_head.register_forward_hook(
                lambda _m, _i, out: self.head_dtypes.add(out.dtype)
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("objective", ["causal", "masked"])
@pytest.mark.parametrize(
    "fast_path",
    [
        pytest.param("compile", marks=pytest.mark.slow),  # inductor's C++ compile: 20-50 s on 2 cores
        "bf16-mixed",  # a few seconds
    ],
)
def test_fast_path_trains_checkpoints_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str, fast_path: str, objective: str
):
    profile: dict[str, Any] = {"max_steps": 6}
    if fast_path == "compile":
        profile["compile"] = True
    else:
        profile["precision"] = "bf16-mixed"
    params, paths, _ = make_project(
        tmp_path,
        model={"objective": objective},
        profiles=profile,
        tracking={"log_every_n_steps": 3},
        pretrain={"lr": 5e-3, "val_every_n_steps": 3, "checkpoint_every_n_steps": 3, "register_model": False},
    )
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    probe = _Probe()

    report = run_pretrain(params, paths=paths, quiet=True, callbacks=[probe])

    if fast_path == "compile":
        assert probe.compiled
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    else:
        assert not probe.compiled and probe.head_dtypes == {torch.bfloat16}
    assert report["global_step"] == 6 and math.isfinite(report["val_loss"])
    client = MlflowClient(mlflow_store)
    losses = _history(client, report["run_id"], "train/loss")
    assert [s for s, _ in losses] == [3, 6] and all(math.isfinite(v) for _, v in losses)
    assert losses[-1][1] < losses[0][1], losses
    assert [s for s, _ in _history(client, report["run_id"], "val/loss")] == [3, 6]

    # The export is the final checkpoint's weights, under the plain names (no "_orig_mod.").
    ckpt = torch.load(ckpt_dir(paths) / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values())  # mixed: fp32 master weights
    model = load_pretrained(paths.pretrained_model)
    assert model.config.objective == objective
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["state_dict"][f"model.{name}"]), name
