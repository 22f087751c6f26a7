"""params.yaml validation: every bad value is named with its dotted path and the rule."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from bigmodel_ops.cli import main
from bigmodel_ops.config import Params, flatten, load_params, parse_params
from bigmodel_ops.errors import ConfigError
from tests.conftest import REPO_ROOT, write_params


def test_repo_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.sizing.model_preset == params.profiles[params.profile].model_preset
    assert params.experiment_name == params.project.name


def test_gpu_profile_switch(repo_params):
    repo_params["profile"] = "gpu"
    params = parse_params(repo_params)
    assert params.sizing.accelerator == "gpu"
    assert params.sizing.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["pretrain"].update(lr=-1), "pretrain.lr = -1: Input should be greater than 0"),
        (lambda p: p["pretrain"].update(learning_rate=0.1), "pretrain.learning_rate = 0.1: unknown key"),
        (lambda p: p["tokenizer"].update(kind="sentencepiece"), 'tokenizer.kind = "sentencepiece"'),
        (lambda p: p["prepare"]["split"].update(train=0.5), "split fractions must sum to 1.0, got 0.7"),
        (lambda p: p.update(profile="tpu"), "profile 'tpu' is not defined; defined profiles: ['cpu', 'gpu']"),
        (lambda p: p["pretrain"].update(min_lr=1.0, lr=0.1), "min_lr (1.0) must not exceed lr (0.1)"),
        (lambda p: p["prepare"].update(labels=["a", "a"]), "labels must be unique"),
        (lambda p: p.pop("project"), "project: required field is missing"),
        (lambda p: p["profiles"]["cpu"].update(max_steps=None), "set max_steps or max_tokens"),
        (lambda p: p["tune"]["search_space"]["lr"].update(low=0.0), "a log-scaled range needs low > 0"),
        (
            lambda p: p["tracking"].update(spool_dir="../outside/spool"),
            "tracking.spool_dir = \"../outside/spool\": Value error, '../outside/spool' leaves the project through '..'",
        ),
        (
            lambda p: p["tracking"].update(artifact_location="art/%2e%2e/%2E%2E/x"),
            "'art/%2e%2e/%2E%2E/x' leaves the project through '..'",
        ),
        (
            lambda p: p["profiles"]["cpu"].update(accelerator="cpu", strategy="fsdp"),
            "Value error, strategy 'fsdp' needs CUDA GPUs",
        ),
        (
            lambda p: (p["pretrain"].update(task="electra"), p["model"].update(objective="causal")),
            "pretrain.task: electra needs model.objective: masked (replaced-token detection trains a "
            "bidirectional backbone); got model.objective: causal",
        ),
    ],
)
def test_bad_params_name_the_field(repo_params, mutate, expected):
    mutate(repo_params)
    with pytest.raises(ConfigError) as info:
        parse_params(repo_params, source="params.yaml")
    assert expected in str(info.value)


def test_cli_refuses_bad_params_before_any_work(tmp_path, repo_params, monkeypatch, capsys, mlflow_store):
    monkeypatch.chdir(tmp_path)
    repo_params["model"]["objective"] = "denoising"
    path = write_params(tmp_path, repo_params)
    for stage in ("prepare", "tokenize", "pretrain", "tune", "finetune", "evaluate"):
        assert main([stage, "--params", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"bigmodel-ops {stage}: error: {path}: invalid parameters" in err
        assert 'model.objective = "denoising"' in err
    assert not (tmp_path / "outputs").exists()
    # Nothing was tracked: the store the stages log to (conftest's, through MLFLOW_TRACKING_URI)
    # still holds only MLflow's Default experiment and no run, and no other store, spool or
    # artifact folder appeared next to the params file.
    client = MlflowClient(mlflow_store)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not client.search_runs(["0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow-store", "params.yaml"]


def test_missing_and_non_yaml_params(tmp_path, capsys):
    assert main(["validate", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: params file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: [unclosed\n")
    assert main(["validate", "--params", str(bad)]) == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err


def test_flatten_uses_dotted_names():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_section_hash_changes_only_with_its_section(repo_params):
    base = parse_params(repo_params)
    repo_params["pretrain"]["lr"] = 0.002
    changed = parse_params(repo_params)
    assert base.section_hash("prepare") == changed.section_hash("prepare")
    assert base.section_hash("pretrain") != changed.section_hash("pretrain")


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "tokenize", "pretrain", "tune", "finetune", "evaluate", "ui", "validate"):
        assert stage in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fsdp_on_auto_accelerator_without_cuda_is_refused_before_training(tmp_path):
    from bigmodel_ops.trainer import build_trainer

    with pytest.raises(
        ConfigError, match="accelerator 'auto' resolved to cpu: strategy 'fsdp' needs CUDA GPUs"
    ):
        build_trainer(
            accelerator="auto",
            devices=1,
            num_nodes=1,
            strategy="fsdp",
            precision="auto",
            max_steps=1,
            accumulate_grad_batches=1,
            gradient_clip_val=1.0,
            validate=None,
            callbacks=[],
            quiet=True,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )


_MALFORMED = {
    "bad YAML": (None, r"params.yaml: not valid YAML"),
    "unknown key": (
        lambda p: p["pretrain"].update(learning_rate=0.1),
        r"pretrain.learning_rate = 0.1: unknown key",
    ),
    "wrong type": (
        lambda p: p["pretrain"].update(lr="fast"),
        r'pretrain.lr = "fast": Input should be a valid number',
    ),
    "out of range": (lambda p: p["prepare"]["split"].update(train=1.5), r"prepare.split.train = 1.5"),
    "conflicting fields": (
        lambda p: p["pretrain"].update(min_lr=1.0, lr=0.1),
        r"- pretrain = .*min_lr \(1.0\) must not exceed lr \(0.1\)",
    ),
}


@pytest.mark.parametrize("stage", ["prepare", "pretrain"])
@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_params_stop_the_stage_process_before_any_work(
    tmp_path, repo_params, mlflow_store, case, stage
):
    """Through the stage's own process (``python -m stages.<stage>``, what dvc.yaml runs): exit 2,
    the error names the field, nothing written, no run in the store the stage would log to."""
    import re

    from tests.faults import run_stage_process

    mutate, expected = _MALFORMED[case]
    if mutate is None:
        (tmp_path / "params.yaml").write_text("pretrain:\n  lr: [0.1\nproject: {name: x}\n")
    else:
        mutate(repo_params)
        write_params(tmp_path, repo_params)
    result = run_stage_process(tmp_path, stage, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"bigmodel-ops {stage}: error: params.yaml: "), result.stderr[-2000:]
    assert re.search(expected, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow-store", "params.yaml"]
    client = MlflowClient(mlflow_store)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not client.search_runs(["0"])


def test_tracking_folders_elsewhere_are_explicit_choices(repo_params, tmp_path):
    """Absolute folders and artifact URIs are accepted; only '..' out of the project is refused."""
    repo_params["tracking"].update(
        spool_dir=str(tmp_path / "spool"), artifact_location="s3://bucket/artifacts"
    )
    params = parse_params(repo_params, source="params.yaml")
    assert params.tracking.spool_dir == str(tmp_path / "spool")
    repo_params["tracking"].update(spool_dir="spool/..x", artifact_location="file:///srv/artifacts")
    assert parse_params(repo_params, source="params.yaml").tracking.spool_dir == "spool/..x"
