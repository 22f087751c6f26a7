"""Planted pickle payloads: in place of a pretraining checkpoint, of exported model weights and of
a registered model's artifact. Each is refused with an error naming the file (checkpoints are
read with ``torch.load(weights_only=True)``, weights only from safetensors), and the payload never
runs: it would create a marker file, which must not exist afterwards.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import CheckpointError
from bigmodel_ops.model import load_pretrained
from bigmodel_ops.pipeline.finetune import run as run_finetune
from bigmodel_ops.pipeline.pretrain import run as run_pretrain
from tests import helpers_finetune, helpers_pretrain
from tests.faults import run_stage_process
from tests.helpers_evaluate import MODEL_NAME
from tests.helpers_serving import CHAMPION_URI, make_registered_model

pytestmark = pytest.mark.fault


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_file(path: Path, marker: Path) -> None:
    """A bare pickle stream, the classic `model.pkl` attack."""
    path.write_bytes(pickle.dumps({"state_dict": {}, "global_step": 99, "x": _Payload(marker)}))


def _torch_pickle_file(path: Path, marker: Path) -> None:
    """A real torch.save zip whose data.pkl holds the payload beside plausible content."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 99, "x": _Payload(marker)}, path)


def _assert_payload_can_run(tmp_path: Path) -> None:
    """The payload is live: plain pickle.load runs it (so the refusals below are meaningful)."""
    marker = tmp_path / "control-marker"
    probe = tmp_path / "probe.pkl"
    _pickle_file(probe, marker)
    pickle.loads(probe.read_bytes())  # noqa: S301 - on purpose: proves the payload works
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("plant", [_pickle_file, _torch_pickle_file], ids=["pickle", "torch-zip"])
def test_planted_pickle_checkpoint_is_refused_and_never_runs(
    plant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _assert_payload_can_run(tmp_path)
    marker = tmp_path / "PWNED-checkpoint"
    root = tmp_path / "project"
    setup = dict(profiles={"max_steps": 4}, pretrain={"register_model": False})
    params, paths, _ = helpers_pretrain.make_project(root, **setup)
    monkeypatch.chdir(root)
    run_pretrain(params, paths=paths, quiet=True)
    folder = helpers_pretrain.ckpt_dir(paths)
    for name in ("step-00000004.ckpt", "last.ckpt"):
        (folder / name).unlink()
        (folder / f"{name}.sha256").unlink()  # the attacker leaves no checksum to trip over
        plant(folder / name, marker)
    shutil.rmtree(paths.pretrained_model)

    helpers_pretrain.write_params(root, **{**setup, "profiles": {"max_steps": 6}})
    result = run_stage_process(root, "pretrain")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no valid checkpoint to resume from" in result.stderr
    assert "last.ckpt" in result.stderr and "step-00000004.ckpt" in result.stderr
    if plant is _torch_pickle_file:
        assert "refused: not a weights-only checkpoint" in result.stderr
    assert not marker.exists()
    assert not paths.pretrained_model.exists()

    # Named explicitly with pretrain.resume_from: refused the same way, in this process too.
    named = parse_params(
        helpers_pretrain.raw_params(
            **{**setup, "pretrain": {"register_model": False, "resume_from": str(folder / "last.ckpt")}}
        )
    )
    with pytest.raises(
        CheckpointError, match=r"last.ckpt: checkpoint named by pretrain.resume_from cannot be used"
    ):
        run_pretrain(named, paths=paths, quiet=True)
    assert not marker.exists()


def test_planted_pickle_in_place_of_model_weights_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "PWNED-weights"
    params, paths, _ = helpers_finetune.make_project(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    weights = paths.pretrained_model / "model.safetensors"
    weights.unlink()
    _torch_pickle_file(weights, marker)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: not a valid safetensors file .* never unpickled"
    ):
        load_pretrained(paths.pretrained_model)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file"):
        run_finetune(params, paths=paths, quiet=True)
    assert not marker.exists()
    assert not paths.classifier.exists()


def test_planted_pickle_in_a_registered_models_artifact_is_refused(
    tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch
):
    marker = tmp_path / "PWNED-registry"
    (tmp_path / "served").mkdir()
    registered = make_registered_model(tmp_path / "served", _migrated_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    mlflow.set_tracking_uri(registered.uri)
    try:
        # The registered version's stored artifact (not the local outputs/ copy) is tampered with.
        source = MlflowClient(registered.uri).get_model_version_by_alias(MODEL_NAME, "champion").source
        local = Path(mlflow.artifacts.download_artifacts(source, tracking_uri=registered.uri))
        assert local.is_relative_to(registered.root / "mlartifacts")  # the store itself, not a copy
        stored = sorted(local.rglob("model.safetensors"))
        assert stored, "the registered model's weights were not found in the artifact store"
        for path in stored:
            path.unlink()
            _torch_pickle_file(path, marker)
        with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file"):
            mlflow.pyfunc.load_model(CHAMPION_URI)
    finally:
        mlflow.set_tracking_uri(None)
    assert not marker.exists()


def _stored_champion(registered, tmp_path: Path) -> Path:
    """The champion's folder in the artifact store itself (what a tamperer with write access to
    the artifact store, but not to the tracking database, can change)."""
    source = MlflowClient(registered.uri).get_model_version_by_alias(MODEL_NAME, "champion").source
    local = Path(mlflow.artifacts.download_artifacts(source, tracking_uri=registered.uri))
    assert local.is_relative_to(registered.root / "mlartifacts")  # the store itself, not a copy
    return local


def _predict_cli(registered, capsys) -> tuple[int, str]:
    from bigmodel_ops.cli import main

    code = main(["predict", "--params", str(registered.params_file), "a great film"])
    return code, capsys.readouterr().err


def test_a_registered_model_whose_mlmodel_was_rewritten_to_load_a_pickle_is_refused(
    tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """The MLmodel of the stored champion is rewritten into a cloudpickle pyfunc whose
    python_model.pkl carries the payload: `bigmodel-ops predict` refuses it, naming the MLmodel,
    before anything is unpickled; plain mlflow.pyfunc.load_model would have run it."""
    import yaml

    _assert_payload_can_run(tmp_path)
    marker = tmp_path / "PWNED-mlmodel"
    (tmp_path / "served").mkdir()
    registered = make_registered_model(tmp_path / "served", _migrated_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.chdir(registered.root)
    stored = _stored_champion(registered, tmp_path)
    assert _predict_cli(registered, capsys)[0] == 0  # untampered, verified: it loads and predicts

    spec = yaml.safe_load((stored / "MLmodel").read_text())
    flavor = spec["flavors"]["python_function"]
    flavor.pop("model_code_path")
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (stored / "MLmodel").write_text(yaml.safe_dump(spec))
    _pickle_file(stored / "python_model.pkl", marker)

    code, err = _predict_cli(registered, capsys)
    assert code != 0
    assert "MLmodel: refused: not a bigmodel_ops models-from-code pyfunc" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("target", ["code", "weights"])
def test_a_registered_model_whose_files_changed_after_logging_is_refused(
    target: str, tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Code that would run at load (the shipped bigmodel_ops package) or the weights, changed in
    the artifact store: the digest recorded at logging no longer matches, predict refuses and the
    changed code never runs."""
    marker = tmp_path / f"PWNED-{target}"
    (tmp_path / "served").mkdir()
    registered = make_registered_model(tmp_path / "served", _migrated_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.chdir(registered.root)
    stored = _stored_champion(registered, tmp_path)
    if target == "code":
        (victim,) = stored.glob("code/bigmodel_ops/pyfunc_model.py")
        victim.write_text(f"open({str(marker)!r}, 'w').close()\n" + victim.read_text())
    else:
        (victim,) = stored.rglob("model.safetensors")
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in the last tensor: still a valid safetensors file
        victim.write_bytes(bytes(data))
    code, err = _predict_cli(registered, capsys)
    assert code != 0
    assert "refused: its files changed after it was logged" in err and "bigmodel_ops.model_sha256" in err, err
    assert not marker.exists()
