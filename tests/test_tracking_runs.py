"""Stage runs: pipeline tree, resume, crash/signal status, ranks, params, child runs, batching."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bigmodel_ops.config import parse_params
from bigmodel_ops.tracking.pipeline import read_registry
from bigmodel_ops.tracking.spool import Spool
from bigmodel_ops.tracking.store import chunk_batch
from bigmodel_ops.tracking.transport import LogSender
from tests.helpers_tracking import clear_run_env, make_params, make_project, raw_params, tracked_run


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_run_env(monkeypatch)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "repo")
    monkeypatch.chdir(root)
    return root


def _runs(client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("trk-test")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_stage_runs_are_children_of_one_pipeline_run_and_record_their_outputs(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    params = make_params(tmp_path)
    with tracked_run(params, stage="prepare") as prep:
        prep.log_metrics({"rows": 10}, step=0)
    with tracked_run(params, stage="tokenize") as tok:
        pass
    runs = _runs(client)
    parents = [name for name in runs if name.startswith("pipeline-")]
    assert len(parents) == 1  # one pipeline version -> one parent, found again by tag search
    parent = runs[parents[0]]
    assert parent.data.tags["bigmodel_ops.role"] == "pipeline"
    assert runs["prepare"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["tokenize"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["bigmodel_ops.stage_run.prepare"] == prep.run_id
    assert parent.data.params["prepare.split.train"] == "0.8"  # the whole params file, flattened
    # the stage run gets the sections its dvc.yaml entry lists (prepare: project, tracking, prepare)
    assert runs["prepare"].data.params["prepare.split.train"] == "0.8"
    assert "tokenizer.vocab_size" not in runs["prepare"].data.params
    assert read_registry(project)["tokenize"]["run_id"] == tok.run_id

    # New params -> new pipeline id -> new parent, which points at the earlier runs of the
    # stages that DVC would skip (here: all of them, until they run again).
    raw = raw_params(tmp_path)
    raw["tokenizer"]["vocab_size"] = 500
    (project / "params.yaml").write_text(json.dumps(raw))
    with tracked_run(parse_params(raw), stage="tokenize") as tok2:
        pass
    runs = _runs(client)
    parents = sorted(
        (r for n, r in runs.items() if n.startswith("pipeline-")), key=lambda r: r.info.start_time
    )
    assert len(parents) == 2
    new = client.get_run(parents[1].info.run_id)
    assert new.data.tags["bigmodel_ops.stage_run.prepare"] == prep.run_id  # skipped stage: earlier run
    assert new.data.tags["bigmodel_ops.stage_run.tokenize"] == tok2.run_id
    assert new.info.status == "FINISHED"


def test_resume_reattaches_to_the_same_run(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    client = MlflowClient(mlflow_store)
    params = make_params(tmp_path)
    with pytest.raises(RuntimeError), tracked_run(params, stage="pretrain") as first:
        for step in range(5):
            first.log_metrics({"train/loss": 5.0 - step}, step=step)
        raise RuntimeError("preempted")
    assert client.get_run(first.run_id).info.status == "FAILED"
    with tracked_run(params, stage="pretrain", resume_run_id=first.run_id) as second:
        assert second.run_id == first.run_id
        assert client.get_run(first.run_id).info.status == "RUNNING"
        for step in range(5, 8):
            second.log_metrics({"train/loss": 5.0 - step}, step=step)
    history = client.get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(8))
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len([n for n in _runs(client) if n == "pretrain"]) == 1


def test_unknown_resume_id_starts_a_new_run_with_a_warning(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    with pytest.warns(RuntimeWarning, match="cannot resume"):
        with tracked_run(make_params(tmp_path), stage="pretrain", resume_run_id="0" * 32) as run:
            pass
    assert MlflowClient(mlflow_store).get_run(run.run_id).info.status == "FINISHED"


def test_exception_marks_failed_and_logs_the_traceback(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    with pytest.raises(ValueError, match="boom"), tracked_run(make_params(tmp_path), stage="finetune") as run:
        run.log_metrics({"loss": 1.0}, step=3)
        raise ValueError("boom")
    info = client.get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.metrics["loss"] == 1.0  # flushed on the crash
    local = client.download_artifacts(run.run_id, "error/traceback.txt", str(tmp_path))
    assert "ValueError: boom" in Path(local).read_text()
    parent = client.get_run(info.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert "bigmodel_ops.stage_run.finetune" not in parent.data.tags  # failed runs produced nothing


def test_a_run_whose_system_metrics_fail_to_start_ends_failed_not_running(
    tmp_path: Path, project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigmodel_ops.tracking import runs

    def broken(*args: object) -> None:
        raise RuntimeError("no sampler here")

    monkeypatch.setattr(runs, "start_system_metrics", broken)
    params = make_params(tmp_path, system_metrics=True)
    with pytest.raises(RuntimeError, match="no sampler here"):
        with tracked_run(params, stage="pretrain", system_metrics=True):
            pytest.fail("the stage body must not run")
    client = MlflowClient(mlflow_store)
    (stage,) = [r for name, r in _runs(client).items() if name == "pretrain"]
    assert stage.info.status == "FAILED"  # not left RUNNING with its sender open
    local = client.download_artifacts(stage.info.run_id, "error/traceback.txt", str(tmp_path))
    assert "RuntimeError: no sampler here" in Path(local).read_text()


class _EarlyStop(Exception):
    pass


def test_finished_on_exceptions_end_the_stage_run_normally(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    with (
        pytest.raises(_EarlyStop),
        tracked_run(make_params(tmp_path), stage="tune", finished_on=(_EarlyStop,)) as run,
    ):
        raise _EarlyStop()
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.tags["bigmodel_ops.outcome"] == "_EarlyStop"
    assert not client.list_artifacts(run.run_id, "error")
    assert read_registry(project)["tune"]["run_id"] == run.run_id  # a normal finish produced outputs


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys, time
    from pathlib import Path
    from bigmodel_ops.config import parse_params
    from bigmodel_ops.tracking import stage_run

    before = signal.getsignal(signal.SIGTERM)
    params = parse_params(json.loads(Path(sys.argv[1]).read_text()))
    tracking = dict(experiment=params.experiment_name, params=params.model_dump(mode="json"))
    with stage_run(params.tracking, stage="pretrain", **tracking) as run:
        step = 0
        while True:
            run.log_metrics({"train/loss": 1.0}, step=step)
            if step == 3:
                Path("run_id.txt").write_text(run.run_id)
            step += 1
            time.sleep(0.05)
    """
)


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    (project / "params.json").write_text(json.dumps(raw_params(tmp_path)))
    (project / "train.py").write_text(SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, "train.py", "params.json"], cwd=project)
    deadline = time.monotonic() + 120
    while not (project / "run_id.txt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    client = MlflowClient(mlflow_store)
    run = client.get_run((project / "run_id.txt").read_text())
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 4
    local = client.download_artifacts(run.info.run_id, "error/traceback.txt", str(tmp_path))
    assert "TerminatedBySignal" in Path(local).read_text()


def test_signal_handlers_are_restored(tmp_path: Path, project: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with tracked_run(make_params(tmp_path), stage="prepare"):
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_keyboard_interrupt_marks_killed(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    # A runner started in the background (CI, `cmd &`) inherits SIGINT as ignored, and Python
    # then installs no KeyboardInterrupt handler; restore Python's normal one for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), tracked_run(make_params(tmp_path), stage="pretrain") as run:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert MlflowClient(mlflow_store).get_run(run.run_id).info.status == "KILLED"


def test_non_zero_ranks_log_nothing_and_share_the_run_id(
    tmp_path: Path, project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = make_params(tmp_path)
    client = MlflowClient(mlflow_store)
    with tracked_run(params, stage="pretrain") as rank0:
        exported = os.environ["BIGMODEL_OPS_RUN_ID"]
        assert exported == rank0.run_id
        # What a process started by Lightning's launcher sees: LOCAL_RANK=1, the inherited id.
        monkeypatch.setenv("LOCAL_RANK", "1")
        note = tmp_path / "note.txt"
        note.write_text("rank 1")
        with tracked_run(params, stage="pretrain") as rank1:
            assert rank1.sender_stats().mode == "none"  # a transport that sends nothing
            assert rank1.run_id == rank0.run_id
            rank1.log_metrics({"loss": 1.0}, step=1)
            rank1.log_params({"a": 1, "long": "x" * 7000})
            rank1.set_tags({"t": 1})
            rank1.log_artifact(note)
            rank1.log_artifacts(tmp_path / "repo", "repo")
            rank1.log_dict({"a": 1}, "a.json")
            rank1.log_input(name="d", source=str(note), digest="0" * 40)
            assert rank1.log_model_dir(tmp_path, registered_model_name="m") is None
            rank1.flush()
            with rank1.child_run("trial-0") as child:
                assert child.run_id == rank0.run_id
                child.log_metrics({"x": 1.0}, step=0)
        monkeypatch.delenv("LOCAL_RANK")
        monkeypatch.setenv("RANK", "3")
        with tracked_run(params, stage="pretrain") as rank3:
            assert rank3.sender_stats().mode == "none"
        monkeypatch.delenv("RANK")
    assert "BIGMODEL_OPS_RUN_ID" not in os.environ
    names = sorted(
        r.info.run_name for r in client.search_runs([client.get_run(rank0.run_id).info.experiment_id])
    )
    assert names.count("pretrain") == 1 and not [n for n in names if "trial" in n]
    rank0_data = client.get_run(rank0.run_id).data
    assert "loss" not in rank0_data.metrics and "a" not in rank0_data.params and "t" not in rank0_data.tags
    assert not client.list_artifacts(rank0.run_id) and not client.search_registered_models()


def test_params_are_flattened_and_long_values_become_artifacts(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    with tracked_run(make_params(tmp_path), stage="tune", log_stage_params=False) as run:
        run.log_params({"optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "prompt": "x" * 7000})
    data = client.get_run(run.run_id).data.params
    assert data["optim.lr"] == "0.001"
    assert data["optim.betas"] == "[0.9, 0.95]"
    assert "params/prompt.txt" in data["prompt"]
    local = client.download_artifacts(run.run_id, "params/prompt.txt", str(tmp_path))
    assert Path(local).read_text() == "x" * 7000


def test_datasets_are_logged_as_inputs(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    schema = {"mlflow_colspec": [{"type": "string", "name": "text", "required": True}]}
    with tracked_run(make_params(tmp_path), stage="prepare", log_stage_params=False) as run:
        run.log_input(
            name="trk-train",
            source="data/train.parquet",
            digest="d" * 40,
            profile={"num_rows": 3},
            schema=schema,
        )
    (entry,) = MlflowClient(mlflow_store).get_run(run.run_id).inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == ("trk-train", "d" * 36)
    assert json.loads(entry.dataset.profile) == {"num_rows": 3} and json.loads(entry.dataset.schema) == schema
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "train")]


def test_child_runs_for_trials(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    import optuna

    client = MlflowClient(mlflow_store)
    with tracked_run(make_params(tmp_path), stage="tune") as run:
        with run.child_run("trial-0", tags={"optuna.trial": 0}) as t0:
            t0.log_metrics({"val/acc": 0.7}, step=10, epoch=1)
        with (
            pytest.raises(optuna.TrialPruned),
            run.child_run("trial-1", finished_on=(optuna.TrialPruned,)) as t1,
        ):
            raise optuna.TrialPruned()
        with pytest.raises(ZeroDivisionError), run.child_run("trial-2") as t2:
            1 / 0  # noqa: B018
    r0, r1, r2 = (client.get_run(t.run_id) for t in (t0, t1, t2))
    assert r0.info.run_name == "tune/trial-0"
    assert r0.data.tags["mlflow.parentRunId"] == run.run_id
    assert r0.data.tags["optuna.trial"] == "0"
    assert r0.data.metrics == {"val/acc": 0.7, "epoch": 1.0}
    assert client.get_metric_history(t0.run_id, "val/acc")[0].step == 10
    assert (r0.info.status, r1.info.status, r2.info.status) == ("FINISHED", "FINISHED", "FAILED")
    assert r1.data.tags["bigmodel_ops.outcome"] == "TrialPruned"
    assert r2.data.tags["bigmodel_ops.error"].startswith("ZeroDivisionError")
    assert (
        r0.data.tags["bigmodel_ops.git_commit"]
        == client.get_run(run.run_id).data.tags["bigmodel_ops.git_commit"]
    )


def test_system_metrics_arrive_complete_up_to_the_end_of_the_run(
    tmp_path: Path, project: Path, mlflow_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    params = make_params(tmp_path, system_metrics_interval_s=0.2)
    client = MlflowClient(mlflow_store)
    mlflow_logger = logging.getLogger("mlflow")  # it does not propagate to caplog's root handler
    mlflow_logger.addHandler(caplog.handler)
    try:
        with tracked_run(params, stage="pretrain", system_metrics=True) as run:
            time.sleep(1.5)
            ending_ms = int(time.time() * 1000)
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    # MLflow's own loop read BatchMetricsLogger.total_training_time after its first sample and
    # stopped with "Failed to log system metrics"; the partial sample at finish() was dropped.
    assert not [
        r for r in caplog.records if "system metrics" in r.getMessage() and r.levelno >= logging.WARNING
    ]
    history = client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert steps == list(range(len(steps))) and len(steps) >= 4  # one sample per 0.2 s, none lost
    assert max(m.timestamp for m in history) >= ending_ms  # the last sample was taken at the end
    names = set(client.get_run(run.run_id).data.metrics)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= names
    assert all(len(client.get_metric_history(run.run_id, name)) == len(steps) for name in names)

    off = make_params(tmp_path, system_metrics=False, system_metrics_interval_s=0.2)
    with tracked_run(off, stage="pretrain", run_name="pretrain-off", system_metrics=True) as quiet:
        time.sleep(0.6)
    assert not [k for k in client.get_run(quiet.run_id).data.metrics if k.startswith("system/")]

    # A resumed run continues the step count where the first part stopped.
    with tracked_run(params, stage="pretrain", resume_run_id=run.run_id, system_metrics=True):
        time.sleep(0.5)
    resumed = sorted(
        m.step for m in client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    )
    assert resumed == list(range(len(resumed))) and len(resumed) > len(steps)


def test_batches_respect_server_limits() -> None:
    from mlflow.entities import Metric, Param, RunTag

    metrics = [Metric(f"m{i}", 1.0, 0, i) for i in range(2500)]
    params = [Param(f"p{i}", "v") for i in range(250)]
    tags = [RunTag(f"t{i}", "v") for i in range(120)]
    chunks = chunk_batch(metrics, params, tags)
    assert all(
        len(m) <= 1000 and len(p) <= 100 and len(t) <= 100 and len(m) + len(p) + len(t) <= 1000
        for m, p, t in chunks
    )
    assert sum(len(m) for m, _, _ in chunks) == 2500
    assert sum(len(p) for _, p, _ in chunks) == 250 and sum(len(t) for _, _, t in chunks) == 120


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_full_queue_spills_to_the_spool_and_loses_nothing(
    tmp_path: Path, mlflow_store: str, mode: str
) -> None:
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("spill", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    spool = Spool(tmp_path / "spool", uri=mlflow_store)
    sender = LogSender(client, spool, max_queue=5, flush_interval_s=10.0, mode=mode, handoff_items=1)  # type: ignore[arg-type]
    assert sender.mode == mode
    for step in range(100):
        sender.enqueue(("m", run_id, {"a": float(step), "b": 1.0}, step, 1000 + step))
    assert sender.stats().spilled > 0  # the queue overflowed: the caller wrote to the spool, did not block
    assert sender.close(timeout=None) is True
    assert len(client.get_metric_history(run_id, "a")) == 100
    assert len(client.get_metric_history(run_id, "b")) == 100
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_conflicting_param_is_reported_not_fatal(tmp_path: Path, project: Path, mlflow_store: str) -> None:
    with pytest.warns(RuntimeWarning, match="refused 1 item"):
        with tracked_run(make_params(tmp_path), stage="finetune", log_stage_params=False) as run:
            run.log_params({"lr": 0.1, "other": 1})
            run.flush()
            run.log_params({"lr": 0.2})
            run.log_metrics({"acc": 0.5}, step=1)
    data = MlflowClient(mlflow_store).get_run(run.run_id).data
    assert data.params["lr"] == "0.1" and data.metrics["acc"] == 0.5


def test_stage_runs_send_from_a_niced_process_that_ends_with_the_run(
    tmp_path: Path, project: Path, mlflow_store: str
) -> None:
    with tracked_run(make_params(tmp_path), stage="pretrain", log_stage_params=False) as run:
        stats = run.sender_stats()
        assert stats.mode == "process"  # the default on Linux
        pid = stats.pid
        # The child lowers its own priority right after the fork.
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # tracking.sender_sched_idle
        for step in range(50):
            run.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    assert not _pid_running(pid)
    history = MlflowClient(mlflow_store).get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(50))


def test_a_sender_process_delivers_what_a_sigkilled_caller_had_queued(
    tmp_path: Path, mlflow_store: str
) -> None:
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("killed", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from mlflow.tracking import MlflowClient
        from bigmodel_ops.tracking.transport import LogSender
        from bigmodel_ops.tracking.spool import Spool
        client = MlflowClient({mlflow_store!r})
        sender = LogSender(client, Spool({str(tmp_path / "spool")!r}, uri={mlflow_store!r}),
                           flush_interval_s=60.0, mode="process")
        for step in range(300):
            sender.enqueue(("m", {run_id!r}, {{"loss": float(step)}}, step, 1000 + step))
        print(sender.stats().pid, flush=True)
        # Records reach the pipe in groups at least every 0.25 s; a group not yet handed over
        # when SIGKILL lands is lost, so give the hand-off that long.
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no atexit
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    sender_pid = int(killed.stdout.split()[0])
    # The orphaned sender sees EOF on its liveness pipe, sends the queue, and exits by itself.
    deadline = time.monotonic() + 60
    while _pid_running(sender_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_running(sender_pid)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(300))


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
