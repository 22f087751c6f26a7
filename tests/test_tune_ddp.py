"""DDP-safe pruning: a trial trained by 2 CPU processes (gloo) reports and prunes on every rank
together. Rank 0 holds the Optuna trial (a real journal study) and decides; rank 1 follows the
broadcast decision; both stop at the same step and exit (a hang fails the test by its timeout).
On the examples axis (every_n_examples) an optimizer step counts the examples of both ranks.

Run as a script, this module is one rank of that trial (the test starts both ranks with the
torch.distributed environment, as torchrun or SLURM would)::

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=... \\
        python -m tests.test_tune_ddp PROJECT_ROOT OUT_DIR [steps|examples]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

STUDY = "ddp"
WARMUP = 3  # the threshold pruner prunes at the first report from this step on
# Examples axis: batch 8 on each of 2 ranks = 16 examples a step; a report every 32 examples
# (steps 2, 4, ...), pruned at the first from 64 on (step 4). Counting one rank's examples would
# report at steps 4, 8 and prune at step 8.
EVERY_EXAMPLES, WARMUP_EXAMPLES = 32, 64


def _study(root: Path, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(root / "study.journal")))
    return optuna.load_study(study_name=STUDY, storage=storage, pruner=pruner)


def _rank_main(root: Path, out: Path, axis: str = "steps") -> None:
    """One rank: fine-tune the tiny classifier on 2 processes with a StepPruningCallback
    reporting on ``axis`` (steps or examples)."""
    from bigmodel_ops.classification.inputs import load_splits
    from bigmodel_ops.classification.training import fit_classifier
    from bigmodel_ops.config import load_params
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams
    from bigmodel_ops.tuning.pruning import StepPruningCallback, val_subset

    rank = int(os.environ["RANK"])
    os.chdir(root)
    params = load_params(root / "params.yaml")
    paths = ProjectPaths()
    splits = load_splits(
        prepared=paths.prepared, model_dir=paths.pretrained_model, labels=params.prepare.labels, max_length=32
    )
    fit = fit_config(params)
    assert fit.devices == 2 and fit.strategy == "ddp"
    examples = axis == "examples"
    study = trial = None
    if rank == 0:  # only rank 0 talks to the storage
        warmup = WARMUP_EXAMPLES if examples else WARMUP
        study = _study(root, optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=warmup))
        trial = study.ask()
    cadence = (
        {"every_n_examples": EVERY_EXAMPLES, "train_batch_size": 8} if examples else {"every_n_steps": 1}
    )
    callback = StepPruningCallback(
        trial,
        subset=val_subset(splits["val"], fraction=0.5, seed=0),
        metric="val_acc",
        num_labels=2,
        **cadence,
    )
    outcome = "completed"
    try:
        fit_classifier(
            fit,
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hyperparams(params).override({"batch_size": 8}),
            max_epochs=2,
            callbacks=[callback],
            quiet=True,
        )
    except optuna.TrialPruned:
        outcome = "pruned"
    if study is not None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if outcome == "pruned" else None)
    result = {
        "outcome": outcome,
        "pruned_at": callback.pruned_at,
        "steps": callback.steps,
        "reports": callback.reports,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("axis", ["steps", "examples"])
def test_ddp_trial_prunes_on_every_rank_together(tmp_path: Path, axis: str):
    from tests.helpers_finetune import make_project
    from tests.helpers_tracking import free_port

    root = tmp_path / "project"
    make_project(root, n_train=64, n_eval=16, profiles={"devices": 2, "strategy": "ddp"})
    optuna.create_study(
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(root / "study.journal"))
        ),
        study_name=STUDY,
        direction="maximize",
    )
    out = tmp_path / "out"
    out.mkdir()
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(REPO_ROOT),
        )  # fmt: skip
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_tune_ddp", str(root), str(out), axis],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for process in ranks:
            logs.append(process.communicate(timeout=600)[0])  # a hung rank fails here
    finally:
        for process in ranks:
            process.kill()
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, logs[rank][-4000:]

    zero, one = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # 64 rows / (batch 8 x 2 ranks) = 4 steps an epoch, 8 in all: both stopped at the warmup step
    # (steps: reports at every step from 1; examples: at 32 and 64 examples, steps 2 and 4)
    stop, reported = (WARMUP, list(range(1, WARMUP + 1))) if axis == "steps" else (4, [32, 64])
    assert zero["outcome"] == one["outcome"] == "pruned"
    assert zero["pruned_at"] == one["pruned_at"] == zero["steps"] == one["steps"] == stop
    assert sorted(int(s) for s in zero["reports"]) == reported
    assert one["reports"] == {}  # rank 1 never reported to the study
    (trial,) = _study(root).trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == reported


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
