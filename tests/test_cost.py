"""The cost of training runs: the meter on a real fit, RAPL and NVML readers, stage runs, the
pipeline parent's sums and the model card's Cost section.

The NVML path cannot run on this CPU machine: it is checked against a fake ``pynvml`` module only.
"""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops import cost
from bigmodel_ops.config import parse_params
from bigmodel_ops.cost_callback import CostCallback, cost_of
from bigmodel_ops.evaluation import card
from bigmodel_ops.tracking import frontpage
from bigmodel_ops.trainer import MetricsCallback, build_trainer
from tests.helpers_tracking import clear_run_env, make_project, raw_params, tracked_run

METRICS = {f"cost/{k}" for k in cost.KEYS}


def _rapl_readable() -> bool:
    try:
        cost.RaplReader()
    except (OSError, ValueError):
        return False
    return True


# ---- the meter on a real Lightning fit -----------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict[str, float], int]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, values, *, step: int) -> None:
        self.metrics.append((dict(values), step))

    def set_tags(self, tags) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})


def _tiny_module():
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
            self._loss = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self._loss = float(loss.detach())
            return loss

        def take_train_loss(self):
            return self._loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny()


def _loader(n: int = 4096):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=128)


def test_meter_on_a_real_fit_logs_plausible_cost_through_the_metrics_sink() -> None:
    sink = _Sink()
    metrics = MetricsCallback(sink, log_every_n_steps=10)
    trainer = build_trainer(
        accelerator="cpu", precision="32-true", max_steps=60, validate=None, callbacks=[metrics], quiet=True
    )
    assert sum(isinstance(c, CostCallback) for c in trainer.callbacks) == 1
    started = time.perf_counter()
    trainer.fit(_tiny_module(), train_dataloaders=_loader())
    wall_h = (time.perf_counter() - started) / 3600

    logged = [(values, step) for values, step in sink.metrics if METRICS & set(values)]
    assert len(logged) == 1
    values, step = logged[0]
    assert step == trainer.global_step == 60 and set(values) == METRICS
    assert 0 < values["cost/device_hours"] <= wall_h  # one CPU process: wall hours x 1
    assert values["cost/device_hours"] > 0.3 * wall_h  # the fit is most of the time around it
    assert 0 < values["cost/cpu_hours"] <= wall_h * (os.cpu_count() or 1) * 1.5
    assert values["cost/energy_kwh"] > 0
    source = "rapl" if _rapl_readable() else "estimate"
    assert sink.tags == {cost.SOURCE_TAG: source}
    if source == "estimate":  # this VM: CPU-hours x the documented watts per core
        expected = values["cost/cpu_hours"] * cost.ESTIMATE_WATTS_PER_CORE / 1000
        assert values["cost/energy_kwh"] == pytest.approx(expected)
    total = cost_of(trainer)
    assert total is not None and total.metrics() == values and total.energy_source == source
    assert {k: metrics.last[k] for k in METRICS} == values
    # the totals are checkpoint state: a resumed fit continues them
    resumed = CostCallback(sink=_Sink())
    resumed.load_state_dict(next(c for c in trainer.callbacks if isinstance(c, CostCallback)).state_dict())
    assert resumed.prior.as_dict() == total.as_dict()


def test_a_fit_stopped_by_an_exception_still_logs_its_cost() -> None:
    import lightning.pytorch as pl

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    sink = _Sink()
    trainer = build_trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=50,
        validate=None,
        callbacks=[Boom(), MetricsCallback(sink, log_every_n_steps=100)],
        quiet=True,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(_tiny_module(), train_dataloaders=_loader(1024))
    [(values, step)] = [(v, s) for v, s in sink.metrics if METRICS & set(v)]
    assert step == 3 and values["cost/cpu_hours"] > 0 and values["cost/device_hours"] > 0


# ---- energy readers --------------------------------------------------------------------------------


def _zone(root: Path, name: str, label: str, energy: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def _write(path: Path, value: int) -> None:
    """As the kernel updates a counter: readers never see a half-written value."""
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(f"{value}\n")
    staged.replace(path)


def test_rapl_reader_sums_package_zones_and_handles_wraparound(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    package0 = _zone(root, "intel-rapl:0", "package-0", 1_000_000, 10_000_000)
    package1 = _zone(root, "intel-rapl:1", "package-1", 9_000_000, 10_000_000)
    dram = _zone(root, "intel-rapl:0:0", "dram", 5, 10_000_000)  # a sub-zone: part of package-0
    psys = _zone(root, "intel-rapl:2", "psys", 0, 10_000_000)  # contains the packages
    _zone(root, "intel-rapl-mmio:0", "package-0", 0, 10_000_000)  # the same package over MMIO
    reader = cost.RaplReader(root)
    assert [z.name for z in reader.zones] == ["intel-rapl:0", "intel-rapl:1"]

    _write(package0 / "energy_uj", 3000000)  # +2 J
    _write(package1 / "energy_uj", 1000000)  # wrapped: 10 - 9 + 1 = +2 J
    for zone in (dram, psys):
        _write(zone / "energy_uj", 9999999)  # not counted
    assert reader.poll() == pytest.approx(4.0)
    _write(package1 / "energy_uj", 1500000)  # +0.5 J
    assert reader.poll() == pytest.approx(4.5)

    meter = cost.CostMeter(energy=cost.RaplReader(root), poll_s=0.01).start()
    _write(package0 / "energy_uj", 3600000)  # +0.6 J
    _write(package1 / "energy_uj", 4500000)  # +3 J
    time.sleep(0.05)  # the poll thread reads it too; deltas are counted once
    measured = meter.stop()
    assert measured.energy_source == "rapl" and measured.energy_kwh == pytest.approx(3.6 / 3.6e6)
    # another rank of the same machine: the socket is counted by local rank 0 only
    other = cost.CostMeter(energy=cost.RaplReader(root), machine_energy=False).start().stop()
    assert other.energy_source == "rapl" and other.energy_kwh == 0.0


def test_no_readable_rapl_means_an_estimate(tmp_path: Path) -> None:
    (tmp_path / "intel-rapl:0").mkdir()  # no energy_uj (or not readable, as for non-root users)
    with pytest.raises(OSError):
        cost.RaplReader(tmp_path)
    assert cost.energy_source(gpu_index=None, rapl_root=tmp_path) is None
    meter = cost.CostMeter(rapl_root=tmp_path).start()
    sum(i * i for i in range(200_000))
    result = meter.stop()
    assert result.energy_source == "estimate" and result.cpu_hours > 0
    assert result.energy_kwh == pytest.approx(result.cpu_hours * cost.ESTIMATE_WATTS_PER_CORE / 1000)
    # no NVML here: a GPU would be estimated too (device-hours x watts per GPU on top)
    assert cost.energy_source(gpu_index=0) is None


def _fake_nvml(*, counter: bool) -> types.SimpleNamespace:
    class NVMLError(Exception):
        pass

    state = {"mj": 1_000_000}

    def total_energy(handle):
        if not counter:
            raise NVMLError("not supported")
        state["mj"] += 2_500  # +2.5 J per read
        return state["mj"]

    def by_uuid(uuid):
        raise NVMLError("no such uuid")

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetHandleByIndex=lambda index: ("gpu", index),
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetPowerUsage=lambda handle: 200_000,  # 200 W
    )


def test_nvml_energy_counter_and_power_sampling_with_a_fake_nvml() -> None:
    counted = cost.NvmlEnergy(0, nvml=_fake_nvml(counter=True))
    assert counted.handle == ("gpu", 0)
    assert counted.poll() == pytest.approx(2.5) and counted.poll() == pytest.approx(5.0)

    before = time.monotonic()
    sampled = cost.NvmlEnergy(1, nvml=_fake_nvml(counter=False))
    time.sleep(0.05)
    joules = sampled.poll()
    elapsed = time.monotonic() - before
    assert 200 * 0.05 <= joules <= 200 * elapsed + 1e-9


# ---- parent sums, stage runs, the model card --------------------------------------------------------


def _log_cost(run, device: float, cpu: float, kwh: float, source: str = "estimate") -> None:
    run.log_metrics(cost.Cost(device, cpu, kwh).metrics(), step=0)
    run.set_tags({cost.SOURCE_TAG: source})


def test_parent_sums_the_cost_of_its_stage_runs_trials_and_reused_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    clear_run_env(monkeypatch)
    root = make_project(tmp_path / "repo", raw_params(tmp_path))
    monkeypatch.chdir(root)
    client = MlflowClient(mlflow_store)
    params = parse_params(raw_params(tmp_path))
    with tracked_run(params, stage="prepare"):
        pass  # no training: no cost
    with tracked_run(params, stage="pretrain") as run:
        _log_cost(run, 1.0, 8.0, 0.5, "nvml")
    with tracked_run(params, stage="tune") as tune:
        for number, (device, cpu, kwh) in enumerate([(0.25, 1.0, 0.125), (0.5, 2.0, 0.25)]):
            with tune.child_run(f"trial-{number}") as trial:
                _log_cost(trial, device, cpu, kwh)
    parent = client.get_run(tune.run_id).data.tags["mlflow.parentRunId"]
    first = client.get_run(parent)
    sums = {k: v for k, v in first.data.metrics.items() if k.startswith("cost.")}
    assert sums == pytest.approx(
        {"cost.device_hours": 1.75, "cost.cpu_hours": 11.0, "cost.energy_kwh": 0.875}
    )
    assert first.data.tags[cost.SOURCE_TAG] == "estimate+nvml"
    assert frontpage.run_cost(client, tune.run_id).as_dict() == pytest.approx(
        {"device_hours": 0.75, "cpu_hours": 3.0, "energy_kwh": 0.375}
    )

    # the next pipeline version (another lr) reuses pretrain and tune, runs finetune
    raw = raw_params(tmp_path)
    raw["finetune"]["lr"] = 0.0123
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with tracked_run(parse_params(raw), stage="finetune") as run:
        _log_cost(run, 0.5, 1.0, 0.125)
    second = client.get_run(client.get_run(run.run_id).data.tags["mlflow.parentRunId"])
    assert second.info.run_id != parent
    assert {k: v for k, v in second.data.metrics.items() if k.startswith("cost.")} == pytest.approx(
        {"cost.device_hours": 2.25, "cost.cpu_hours": 12.0, "cost.energy_kwh": 1.0}
    )


def test_card_without_recorded_cost_says_so() -> None:
    text = "\n".join(card._cost_section({"pretrain": None, "tune": None, "finetune": None}))
    assert text.startswith("## Cost") and "No cost recorded" in text
    rows = card._cost_section({"pretrain": None, "finetune": cost.Cost(0.5, 1.0, 0.25, "rapl")})
    assert "| pretrain | not recorded | | | |" in rows and "| finetune | 0.5 | 1 | 0.25 | rapl |" in rows


@pytest.mark.slow
def test_tune_finetune_evaluate_log_cost_and_the_card_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    from bigmodel_ops.pipeline.evaluate import run as run_evaluate
    from bigmodel_ops.pipeline.finetune import run as run_finetune
    from bigmodel_ops.pipeline.tune import run as run_tune
    from tests.helpers_finetune import make_project as make_ft_project

    clear_run_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    fast = {"gate": {"max": {}}, "latency_repeats": 2, "latency_warmup": 0}
    params, paths, _ = make_ft_project(tmp_path, n_train=32, n_eval=16, evaluate=fast)
    run_tune(params, paths=paths, quiet=True)
    run_finetune(params, paths=paths, quiet=True)
    report = run_evaluate(params, paths=paths, quiet=True)

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("ft-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], max_results=100)}
    trained = [runs["tune/trial-0"], runs["tune/trial-1"], runs["finetune"]]
    source = "rapl" if _rapl_readable() else "estimate"
    for run in trained:  # every training run logs its cost
        assert METRICS <= set(run.data.metrics), run.info.run_name
        assert all(run.data.metrics[m] > 0 for m in METRICS)
        assert run.data.tags[cost.SOURCE_TAG] == source
    assert not METRICS & set(runs["tune"].data.metrics)  # the trials carry it, not the tune run
    expected = {f"cost.{k}": sum(r.data.metrics[f"cost/{k}"] for r in trained) for k in cost.KEYS}
    parent = client.get_run(runs["evaluate"].data.tags["mlflow.parentRunId"])
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("cost.")} == pytest.approx(expected)
    assert parent.data.tags[cost.SOURCE_TAG] == source

    version = client.get_model_version("ft-test-classifier", str(report["model_version"]))
    assert float(version.tags["cost.energy_kwh"]) == pytest.approx(expected["cost.energy_kwh"], rel=1e-5)
    text = (paths.evaluate_dir / card.CARD_FILE).read_text()
    section = text.split("## Cost")[1].split("\n## ")[0]
    assert "| pretrain | not recorded |" in section  # no pretrain run in this project
    tune_row = next(line for line in section.splitlines() if line.startswith("| tune (all trials) |"))
    trials_kwh = sum(r.data.metrics["cost/energy_kwh"] for r in trained[:2])
    assert f"| {trials_kwh:.3g} | {source} |" in tune_row
    assert f"| {expected['cost.device_hours']:.3g} |" in section.split("| **total** (recorded stages) ")[1]
    assert "## Cost" in version.description
