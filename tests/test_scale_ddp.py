"""Scaling out (issue #14): the deploy scripts, the data each rank reads, and DDP runs that must
equal one process with the same global batch.

- the torchrun and SLURM scripts in deploy/ parse and call a real CLI stage, with the rank layout
  Lightning checks (SLURM ``--ntasks-per-node`` = ``devices``);
- ranks read disjoint rows, and their batches of one step together are one process's batch of
  the global size (windows and masks), for both samplings and both objectives;
- pretraining launched by ``torchrun --nproc_per_node 2`` (2 CPU processes, gloo) with batch B
  ends where one process with batch 2B ends (losses and weights), with one MLflow run and one
  set of checkpoints;
- fine-tuning under Lightning's DDP launcher (2 CPU processes) gives the validation metrics of
  one process with the global batch, over the whole val split (its size not a multiple of 2:
  the sampler's padding row is counted once), one MLflow run and one exported model.

The DDP stages run as subprocesses (``python -m bigmodel_ops.cli``, or under torchrun): Lightning's
DDP launcher re-runs the command for the other ranks, which must not be pytest. The
single-process references run in the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.paths import ProjectPaths
from bigmodel_ops.pretraining.data import DataSpec, TokenStream, TrainBatches, ValBatches
from bigmodel_ops.shards import ShardIndex
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _RANK_VARS
        and k != "BIGMODEL_OPS_RUN_ID"
        and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return env


def _run(root: Path, *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-6000:])
    return result


def _torchrun() -> list[str]:
    """torchrun of this interpreter's torch (``python -m torch.distributed.run`` is the same)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _cli(root: Path, stage: str) -> subprocess.CompletedProcess:
    return _run(root, sys.executable, "-m", "bigmodel_ops.cli", stage, "--params", "params.yaml", "--quiet")


def _in_process(root: Path, stage: str) -> None:
    """The single-process reference: the same stage, in this process (one interpreter start less)."""
    import importlib

    from bigmodel_ops.config import load_params

    module = importlib.import_module(f"bigmodel_ops.pipeline.{stage}")
    with contextlib.chdir(root):  # relative paths of the params (spool, tracking) as in the CLI
        module.run(load_params("params.yaml"), paths=ProjectPaths(), quiet=True)


def _runs(client: MlflowClient, stage: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`bigmodel_ops.stage` = '{stage}'")


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# -- deploy scripts -------------------------------------------------------------------------------


def test_deploy_scripts_parse_and_launch_a_real_stage():
    from bigmodel_ops.cli import _stages

    torchrun, slurm = DEPLOY / "torchrun.sh", DEPLOY / "slurm.sbatch"
    assert (DEPLOY / "README.md").is_file()
    for script in (torchrun, slurm):
        assert script.is_file(), script
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        stages = re.findall(r"-m bigmodel_ops\.cli (\w+)", script.read_text())
        assert stages and set(stages) <= set(_stages()), stages
    text = torchrun.read_text()
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE"):
        assert var in text, var
    assert re.search(r"torchrun\b.*--nproc[_-]per[_-]node", text, re.S)
    sbatch = slurm.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", sbatch, re.M))
    for key in ("nodes", "ntasks-per-node", "gpus-per-node"):
        assert key in directives, key
    # Lightning's SLURMEnvironment refuses ntasks-per-node != devices: one task per GPU.
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert re.search(r"^\s*srun\b.*python -m bigmodel_ops\.cli pretrain", sbatch, re.M)


# -- data sharding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "sampling"), [("masked", "random"), ("masked", "sequential"), ("causal", "random")]
)
def test_ranks_read_disjoint_rows_that_make_one_global_batch(tmp_path: Path, objective: str, sampling: str):
    from tests.helpers_pretrain import make_project

    _, paths, _ = make_project(tmp_path, train_docs=200)
    index = ShardIndex.load(paths.shards)
    stream = TokenStream.from_index(index, "train")
    B, W = 4, 2
    spec = DataSpec(
        objective=objective,
        block_size=16,
        batch_size=B,
        seed=3,
        sampling=sampling,
        mask_rate=0.3,
        mask_id=index.special_ids["mask"],
        vocab_size=index.vocab_size,
        special_ids=tuple(sorted(index.special_ids.values())),
        protected_ids=(index.special_ids["sep"],),
    )
    ranks = [TrainBatches(stream, spec, rank=r, world_size=W) for r in range(W)]
    single = TrainBatches(stream, DataSpec(**{**spec.__dict__, "batch_size": B * W}))
    assert len(single) == len(ranks[0]) == len(ranks[1]) >= 3  # same steps per epoch
    seen: set[int] = set()
    for epoch in (0, 1):
        for step in range(len(single)):
            rows = [set(b.rows(step).tolist()) for b in ranks]
            assert not rows[0] & rows[1]  # the ranks of one step share no row
            assert not (rows[0] | rows[1]) & seen if epoch == 0 else True  # nor two steps of an epoch
            seen |= rows[0] | rows[1] if epoch == 0 else set()
            parts = [b[(epoch, step)] for b in ranks]
            whole = single[(epoch, step)]
            for key, value in whole.items():
                torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=0, atol=0)
    assert seen == set(range(len(single) * B * W))  # an epoch: rows 0 .. steps x G - 1, once each
    if sampling == "sequential":  # row k is the window at k * block_size: disjoint, covering
        starts = np.asarray(sorted(seen)) * spec.block_size
        assert np.all(np.diff(starts) == spec.block_size)
    # Validation: the ranks score the rows of one process's val batches, split between them.
    val_ranks = [ValBatches(stream, spec, n_batches=3, rank=r, world_size=W) for r in range(W)]
    val_single = ValBatches(stream, DataSpec(**{**spec.__dict__, "batch_size": B * W}), n_batches=3)
    assert len(val_single) == len(val_ranks[0]) == 3
    for i in range(3):
        parts = [v[i] for v in val_ranks]
        for key, value in val_single[i].items():
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=0, atol=0)
    # Epochs differ (new windows and masks).
    key = "tokens" if objective == "causal" else "input_ids"
    assert not torch.equal(ranks[0][(0, 0)][key], ranks[0][(1, 0)][key]) or sampling == "sequential"


def test_row_keyed_masks_keep_bert_80_10_10_and_the_separator():
    """The per-row masking the train batches use (mask_tokens_from_uniforms) is BERT's masking."""
    from bigmodel_ops.pretraining.masking import mask_tokens_from_uniforms, mask_uniforms

    rng = np.random.default_rng(0)
    T, rate, sep, mask_id = 64, 0.25, 3, 4
    tokens = rng.integers(10, 200, size=(4000, T))
    tokens[:, ::8] = sep
    uniforms = rng.random((len(tokens), mask_uniforms(T, rate)))
    inputs, positions, labels = mask_tokens_from_uniforms(
        tokens,
        uniforms,
        mask_rate=rate,
        mask_id=mask_id,
        protected_ids=np.asarray([sep]),
        random_ids=np.arange(10, 200),
    )
    assert positions.shape == labels.shape == (len(tokens), 16)
    original = np.take_along_axis(tokens, positions, axis=1)
    assert np.all(original != sep) and np.array_equal(labels, original)
    chosen = np.take_along_axis(inputs, positions, axis=1)
    masked, kept = (chosen == mask_id).mean(), (chosen == original).mean()
    replaced = 1 - masked - kept  # random ids (a random id equal to the original counts as kept)
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    untouched = np.ones_like(tokens, dtype=bool)
    np.put_along_axis(untouched, positions, False, axis=1)
    assert np.array_equal(inputs[untouched], tokens[untouched])


# -- pretraining: torchrun x 2 ranks == one process with the global batch --------------------------

_PRETRAIN = dict(
    model={"objective": "masked", "dropout": 0.0},
    tracking={"log_every_n_steps": 2},
    pretrain={
        "checkpoint_every_n_steps": 3,
        "val_every_n_steps": 3,
        "sampling": "random",
        "mask_rate": 0.3,
        "register_model": False,
    },
)
_STEPS = 6


@pytest.mark.slow
def test_torchrun_ddp_pretraining_equals_one_process_with_the_global_batch(tmp_path: Path, mlflow_store: str):
    from bigmodel_ops.model import load_pretrained
    from tests.helpers_pretrain import ckpt_dir, make_project
    from tests.helpers_tracking import free_port

    B = 4
    ddp_root, one_root = tmp_path / "ddp", tmp_path / "one"
    make_project(
        ddp_root,
        profiles={"devices": 2, "strategy": "ddp", "batch_size": B, "max_steps": _STEPS},
        **_PRETRAIN,
    )
    make_project(one_root, profiles={"devices": 1, "batch_size": 2 * B, "max_steps": _STEPS}, **_PRETRAIN)
    _run(
        ddp_root,
        *_torchrun(),
        "--nnodes=1",
        "--nproc_per_node=2",
        "--node_rank=0",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "bigmodel_ops.cli",
        "pretrain",
        "--params",
        "params.yaml",
        "--quiet",
    )
    _in_process(one_root, "pretrain")

    ddp_paths, one_paths = ProjectPaths(root=ddp_root), ProjectPaths(root=one_root)
    ddp = json.loads(ddp_paths.pretrain_report.read_text())
    one = json.loads(one_paths.pretrain_report.read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["global_step"] == one["global_step"] == _STEPS
    assert ddp["tokens"] == one["tokens"] == _STEPS * 2 * B * 32
    # Same data step for step (tests above), gradients averaged over the ranks: same training.
    # Measured on a 2-core VM: differences ~1e-7 relative (float sums in another order).
    for key in ("train_loss", "val_loss"):
        assert _close(ddp[key], one[key], 1e-4), (key, ddp[key], one[key])
    a = load_pretrained(ddp_paths.pretrained_model).state_dict()
    b = load_pretrained(one_paths.pretrained_model).state_dict()
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert weight_diff <= 1e-4, weight_diff
    print(
        f"pretrain ddp vs one: train_loss {ddp['train_loss']} vs {one['train_loss']}, "
        f"val_loss {ddp['val_loss']} vs {one['val_loss']}, max weight diff {weight_diff:.2e}"
    )

    # One MLflow run per project (rank 1 created none), the curves logged once, equal.
    client = MlflowClient(mlflow_store)
    runs = {r.info.run_id: r for r in _runs(client, "pretrain")}
    assert set(runs) == {ddp["run_id"], one["run_id"]}
    assert runs[ddp["run_id"]].info.status == "FINISHED"
    for key in ("train/loss", "val/loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(ddp["run_id"], key))
        ref = sorted((m.step, m.value) for m in client.get_metric_history(one["run_id"], key))
        assert [s for s, _ in got] == [s for s, _ in ref] and got, key
        assert all(_close(x, y, 1e-4) for (_, x), (_, y) in zip(got, ref, strict=True)), (key, got, ref)
    # One set of checkpoints, written by rank 0 only (same files as the single process).
    names = sorted(p.name for p in ckpt_dir(ddp_paths).iterdir())
    assert names == sorted(p.name for p in ckpt_dir(one_paths).iterdir()), names
    assert f"step-{_STEPS:08d}.ckpt" in names and "last.ckpt" in names


# -- fine-tuning: Lightning's DDP launcher x 2 ranks == one process with the global batch ---------


@pytest.mark.slow
def test_ddp_finetune_equals_one_process_with_the_global_batch(tmp_path: Path, mlflow_store: str):
    from tests.helpers_finetune import make_project, tiny_params

    B = 8
    ddp_root, one_root = tmp_path / "ddp", tmp_path / "one"
    # 64 train rows: a multiple of the global batch 16; 25 val rows: rank 1's shard gets a
    # padding repeat of row 0, which must be counted once.
    setup = dict(n_train=64, n_eval=25, tracking={"log_every_n_steps": 2})
    make_project(
        ddp_root,
        profiles={"devices": 2, "strategy": "ddp"},
        finetune={"batch_size": B, "dropout": 0.0, "max_epochs": 2},
        **setup,
    )
    # The same inputs (a second make_project would train another tokenizer: WordPiece ids are
    # not reproducible across trainings), with the single-process params.
    shutil.copytree(ddp_root, one_root)
    raw = tiny_params(
        finetune={"batch_size": 2 * B, "dropout": 0.0, "max_epochs": 2}, tracking=setup["tracking"]
    )
    (one_root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _cli(ddp_root, "finetune")
    _in_process(one_root, "finetune")

    ddp_paths, one_paths = ProjectPaths(root=ddp_root), ProjectPaths(root=one_root)
    ddp = json.loads(ddp_paths.finetune_report.read_text())
    one = json.loads(one_paths.finetune_report.read_text())
    assert ddp["global_step"] == one["global_step"] == 2 * 64 // (2 * B)
    assert ddp["best_epoch"] == one["best_epoch"]
    assert ddp["val_acc"] == one["val_acc"] and ddp["val_f1"] == one["val_f1"]
    assert _close(ddp["val_loss"], one["val_loss"], 1e-4), (ddp["val_loss"], one["val_loss"])
    print(f"finetune ddp vs one: val_loss {ddp['val_loss']} vs {one['val_loss']}, val_acc {ddp['val_acc']}")

    client = MlflowClient(mlflow_store)
    runs = _runs(client, "finetune")
    assert len(runs) == 2  # one per project: rank 1 opened none
    by_id = {r.info.run_id: r for r in runs}
    exported = json.loads((ddp_paths.classifier / "config.json").read_text())
    run = by_id[exported["mlflow_run_id"]]
    assert run.info.status == "FINISHED"
    # Validation metrics over the whole split, per epoch, equal to the single process's.
    one_id = json.loads((one_paths.classifier / "config.json").read_text())["mlflow_run_id"]
    for key in ("val_loss", "val_acc", "train_loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        ref = sorted((m.step, m.value) for m in client.get_metric_history(one_id, key))
        assert [s for s, _ in got] == [s for s, _ in ref] and got, key
        assert all(_close(x, y, 1e-4) for (_, x), (_, y) in zip(got, ref, strict=True)), (key, got, ref)
    # One exported model, written by rank 0 (no stray staging folders of another rank).
    assert (ddp_paths.classifier / "model.safetensors").is_file()
    siblings = sorted(p.name for p in ddp_paths.classifier.parent.iterdir())
    assert siblings == sorted(p.name for p in one_paths.classifier.parent.iterdir()), siblings
