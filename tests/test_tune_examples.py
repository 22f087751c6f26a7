"""tune.report_every_n_examples: trials report on the training-examples axis.

The callback on real tiny fine-tuning runs (two batch sizes, real in-memory Optuna studies), the
schema's refusals, the pruners' resources in examples, and one tiny tune stage run whose trials'
intermediate values are keyed by examples while MLflow keeps the optimizer-step axis.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.errors import ConfigError
from bigmodel_ops.pipeline.tune import name_of_study
from bigmodel_ops.pipeline.tune import run as run_tune
from bigmodel_ops.tuning.pruning import StepPruningCallback, examples_report_steps
from bigmodel_ops.tuning.study import make_pruner
from tests.helpers_finetune import make_project, tiny_params

N_TRAIN = 48  # 6 optimizer steps an epoch at batch 8, 3 at batch 16: 48 examples either way


class _Sink:
    """The MetricSink protocol (the trial's MLflow run): what was logged, at which step."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, values: dict[str, float], *, step: int) -> None:
        self.logged.append((step, dict(values)))


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """(params, paths, splits) of a tiny project: 48 train / 16 val rows, a tiny pretrained model."""
    from bigmodel_ops.classification.inputs import load_splits

    root = tmp_path_factory.mktemp("examples-project")
    params, paths, _ = make_project(root, n_train=N_TRAIN, n_eval=16)
    splits = load_splits(
        prepared=paths.prepared, model_dir=paths.pretrained_model, labels=params.prepare.labels, max_length=24
    )
    return params, paths, splits


def _fit(project, callback: StepPruningCallback, *, batch_size: int, max_epochs: int = 2) -> str:
    """Fine-tune the tiny classifier with ``callback``; "completed" or "pruned"."""
    from bigmodel_ops.classification.training import fit_classifier
    from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams

    params, paths, splits = project
    try:
        fit_classifier(
            fit_config(params),
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hyperparams(params).override({"batch_size": batch_size}),
            max_epochs=max_epochs,
            callbacks=[callback],
            quiet=True,
            single_device=True,
        )
    except optuna.TrialPruned:
        return "pruned"
    return "completed"


def _callback(project, trial, *, every_n_examples: int, batch_size: int, sink=None) -> StepPruningCallback:
    from bigmodel_ops.tuning.pruning import val_subset

    _, _, splits = project
    return StepPruningCallback(
        trial,
        subset=val_subset(splits["val"], fraction=0.5, seed=0),
        every_n_examples=every_n_examples,
        train_batch_size=batch_size,
        metric="val_acc",
        num_labels=2,
        sink=sink,
    )


@pytest.mark.parametrize(
    ("batch_size", "every", "steps", "examples"),
    [
        (8, 32, [4, 8, 12], [32, 64, 96]),  # 12 steps of 8 examples
        (16, 32, [2, 4, 6], [32, 64, 96]),  # 6 steps of 16: the same report steps, half the steps
        (16, 24, [2, 3, 5, 6], [32, 48, 80, 96]),  # not a multiple of 16: the first step past each
    ],
)
def test_the_callback_reports_on_examples_at_the_first_step_past_each_multiple(
    project, one_thread, batch_size: int, every: int, steps: list[int], examples: list[int]
):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    sink = _Sink()
    callback = _callback(project, trial, every_n_examples=every, batch_size=batch_size, sink=sink)

    assert _fit(project, callback, batch_size=batch_size) == "completed"
    study.tell(trial, 0.5)

    assert callback.examples_per_step == batch_size  # one device, no accumulation
    assert callback.steps == 2 * N_TRAIN // batch_size and callback.pruned_at is None
    (frozen,) = study.trials
    assert sorted(frozen.intermediate_values) == examples  # keyed by examples, not optimizer steps
    assert callback.reports == frozen.intermediate_values
    assert examples_report_steps(
        every_n_examples=every, examples_per_step=batch_size, last_step=callback.steps
    ) == (steps)
    # MLflow keeps the optimizer-step axis, with the examples seen beside the subset metrics
    assert [step for step, _ in sink.logged] == steps
    assert [values["tune/examples_seen"] for _, values in sink.logged] == examples
    assert all({"tune/val_acc_subset", "tune/val_loss_subset"} <= set(values) for _, values in sink.logged)


def test_warmup_counts_examples_and_the_pruned_trial_stops_there(project, one_thread):
    # A threshold no accuracy reaches: every report after the warmup prunes. 48 examples of
    # warmup are step 3 at batch 16 (reports at 32 and 48 examples); as optimizer steps, the
    # 6-step trial would never leave the warmup.
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=48)
    )
    trial = study.ask()
    callback = _callback(project, trial, every_n_examples=24, batch_size=16)

    assert _fit(project, callback, batch_size=16) == "pruned"
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    assert callback.pruned_at == callback.steps == 3
    assert sorted(study.trials[0].intermediate_values) == [32, 48]


def test_the_callback_needs_one_cadence_and_the_batch_size_for_examples(project):
    from bigmodel_ops.tuning.pruning import val_subset

    subset = val_subset(project[2]["val"], fraction=0.5, seed=0)
    common = {"subset": subset, "metric": "val_acc", "num_labels": 2}
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_examples"):
        StepPruningCallback(None, every_n_steps=10, every_n_examples=320, train_batch_size=16, **common)
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_examples"):
        StepPruningCallback(None, **common)
    with pytest.raises(
        ValueError, match=r"every_n_examples needs the training batch size \(train_batch_size"
    ):
        StepPruningCallback(None, every_n_examples=320, **common)
    with pytest.raises(ValueError, match="every_n_examples must be at least 1, got 0"):
        StepPruningCallback(None, every_n_examples=0, train_batch_size=16, **common)


def test_examples_report_steps_edge_cases():
    assert examples_report_steps(every_n_examples=320, examples_per_step=32, last_step=35) == [10, 20, 30]
    # one step spanning several multiples reports once
    assert examples_report_steps(every_n_examples=10, examples_per_step=32, last_step=3) == [1, 2, 3]
    assert examples_report_steps(every_n_examples=640, examples_per_step=16, last_step=39) == []
    assert examples_report_steps(every_n_examples=640, examples_per_step=16, last_step=0) == []
    with pytest.raises(ValueError, match="must be positive"):
        examples_report_steps(every_n_examples=0, examples_per_step=16, last_step=10)


def _tune(**tune):
    raw = tiny_params()
    raw["tune"].update(tune)
    return parse_params(raw, source="params.yaml").tune


@pytest.mark.parametrize("value", [0, -320])
def test_schema_refuses_a_non_positive_examples_cadence(value: int):
    with pytest.raises(ConfigError) as error:
        _tune(report_every_n_steps=10, report_every_n_examples=value)
    assert f"tune.report_every_n_examples = {value}: Input should be greater than 0" in str(error.value)


def test_schema_refuses_both_cadences_and_a_max_resource_below_the_first_examples_rung():
    with pytest.raises(ConfigError) as both:
        _tune(report_every_n_steps=20, report_every_n_examples=320)
    assert (
        "tune.report_every_n_steps (20) and tune.report_every_n_examples (320) are two cadences of the "
        "same reports: set tune.report_every_n_examples to null, or tune.report_every_n_steps back to "
        "its default (10; unused when reporting on examples)"
    ) in str(both.value)

    with pytest.raises(ConfigError) as below:
        _tune(report_every_n_steps=10, report_every_n_examples=320, pruner="hyperband", max_resource=100)
    assert (
        "tune.max_resource (100, in training examples) is below the first rung, "
        "tune.report_every_n_examples (320; tune.min_resource is null)"
    ) in str(below.value)
    with pytest.raises(ConfigError) as explicit:
        _tune(report_every_n_steps=10, report_every_n_examples=320, min_resource=640, max_resource=320)
    assert (
        "tune.max_resource (320 training examples) is below tune.min_resource (640 training examples)"
    ) in str(explicit.value)


def test_schema_refuses_a_first_rung_below_the_first_report():
    # params.yaml's min_resource of 20 counts examples once report_every_n_examples is set.
    with pytest.raises(ConfigError) as examples:
        _tune(
            report_every_n_steps=10, report_every_n_examples=640, pruner="successive_halving", min_resource=20
        )
    assert (
        "tune.min_resource (20 training examples) is below the first report, at "
        "tune.report_every_n_examples (640): every rung up to that report would be judged on it at "
        "once. Set tune.min_resource to null (the first report) or to at least 640; with "
        "report_every_n_examples set it counts training examples"
    ) in str(examples.value)
    with pytest.raises(ConfigError) as steps:
        _tune(report_every_n_steps=10, pruner="hyperband", min_resource=5)
    assert (
        "tune.min_resource (5 optimizer steps) is below the first report, at tune.report_every_n_steps "
        "(10): every rung up to that report would be judged on it at once. Set tune.min_resource to "
        "null (the first report) or to at least 10"
    ) in str(steps.value)
    # At the cadence, above it, or with a pruner that has no rungs, min_resource is accepted.
    assert (
        _tune(
            report_every_n_steps=10,
            report_every_n_examples=640,
            pruner="successive_halving",
            min_resource=640,
        ).first_rung
        == 640
    )
    assert _tune(report_every_n_steps=10, pruner="hyperband", min_resource=20).first_rung == 20
    assert (
        _tune(
            report_every_n_steps=10, report_every_n_examples=640, pruner="median", min_resource=20
        ).min_resource
        == 20
    )


def test_examples_resources_reach_the_pruners():
    steps = _tune(report_every_n_steps=4, pruner="successive_halving")
    assert steps.report_every_n_examples is None and steps.report_unit == "optimizer steps"
    assert make_pruner(steps)._min_resource == 4  # as before: the step cadence

    tune = _tune(report_every_n_steps=10, report_every_n_examples=320, pruner="successive_halving")
    assert tune.report_unit == "training examples"
    assert make_pruner(tune)._min_resource == 320  # the first rung is the first report, in examples
    assert make_pruner(tune.model_copy(update={"min_resource": 960}))._min_resource == 960
    hyperband = make_pruner(tune.model_copy(update={"pruner": "hyperband"}))
    assert hyperband._min_resource == 320 and hyperband._max_resource == "auto"
    median = make_pruner(tune.model_copy(update={"pruner": "median", "pruner_warmup_steps": 640}))
    assert median._n_warmup_steps == 640


def _journal(paths):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(paths.tune_journal)))


def test_tune_stage_records_intermediate_values_keyed_by_examples(
    tmp_path: Path, monkeypatch, mlflow_store: str
):
    monkeypatch.chdir(tmp_path)
    space = {
        "lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [8, 16]},
    }
    params, paths, _ = make_project(
        tmp_path,
        n_train=N_TRAIN,
        n_eval=16,
        tune={
            "report_every_n_steps": 10,
            "report_every_n_examples": 16,
            "max_epochs": 1,
            "search_space": space,
        },
    )
    name = name_of_study(params, paths)
    steps_axis = params.model_copy(
        update={"tune": params.tune.model_copy(update={"report_every_n_examples": None})}
    )
    assert name_of_study(steps_axis, paths) != name  # examples and steps reports never share a study
    other_cadence = params.model_copy(
        update={"tune": params.tune.model_copy(update={"report_every_n_examples": 32})}
    )
    assert name_of_study(other_cadence, paths) == name  # like report_every_n_steps: the same study
    paths.tune_dir.mkdir(parents=True)
    study = optuna.create_study(storage=_journal(paths), study_name=name, direction="maximize")
    study.enqueue_trial({"lr": 2e-3, "batch_size": 8})
    study.enqueue_trial({"lr": 2e-3, "batch_size": 16})

    report = run_tune(params, paths=paths, quiet=True)

    small, large = optuna.load_study(study_name=name, storage=_journal(paths)).trials
    assert (small.params["batch_size"], large.params["batch_size"]) == (8, 16)
    # the same examples axis for both batch sizes: reports at 16, 32 and 48 examples
    assert sorted(small.intermediate_values) == sorted(large.intermediate_values) == [16, 32, 48]
    assert small.user_attrs["report_axis"] == large.user_attrs["report_axis"] == "examples"
    # cost stays in optimizer steps
    assert small.user_attrs["optimizer_steps"] == small.user_attrs["budget_steps"] == 6
    assert large.user_attrs["optimizer_steps"] == large.user_attrs["budget_steps"] == 3
    assert report["total_optimizer_steps"] == 9

    client = MlflowClient(mlflow_store)
    for trial, steps in ((small, [2, 4, 6]), (large, [1, 2, 3])):
        run_id = trial.user_attrs["mlflow_run_id"]
        subset = client.get_metric_history(run_id, "tune/val_acc_subset")
        seen = client.get_metric_history(run_id, "tune/examples_seen")
        assert sorted(m.step for m in subset) == steps  # MLflow: the optimizer-step axis
        assert sorted((m.step, m.value) for m in seen) == list(zip(steps, [16.0, 32.0, 48.0], strict=True))
