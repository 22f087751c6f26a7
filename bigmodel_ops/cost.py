"""What a training run cost: device-hours, CPU-hours and energy, measured from fit start to end.

One job: :class:`CostMeter` is started when a ``Trainer.fit`` starts and read when it ends (the
Lightning callback that drives it is :class:`bigmodel_ops.cost_callback.CostCallback`, which
:func:`~bigmodel_ops.trainer.build_trainer` adds to every Trainer that has a
:class:`~bigmodel_ops.trainer.MetricsCallback`: pretraining, each tuning trial, fine-tuning).
Plain Python: no Lightning, no MLflow, torch only imported to find a GPU's NVML handle, so the
tracking layer can import the names below cheaply.

What is measured (one process, one rank):

- **device-hours**: wall hours of the fit x the devices in use, i.e. the Trainer's world size:
  GPUs on GPU, processes on CPU (a CPU process counts as one device however many cores it uses).
- **CPU-hours**: this process's CPU time (user + system, all its threads:
  :func:`time.process_time`) / 3600. Other processes are not counted: DataLoader worker
  processes, the tracking sender process, other Optuna workers (they meter their own trials).
- **energy (kWh)**, its source recorded as the tag :data:`SOURCE_TAG`:

  - ``nvml`` on a GPU when NVML is usable (the ``pynvml`` module, package ``nvidia-ml-py``): the
    device's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer), else
    its power draw sampled every :data:`POLL_S` seconds and integrated (trapezoids). The GPU
    board only (not the host CPU), and the whole board: another process on the same GPU counts too.
  - ``rapl`` on CPU where Intel RAPL counters are readable
    (``/sys/class/powercap/intel-rapl:<n>/energy_uj``, package domains; most distributions make them
    root-only): polled every :data:`POLL_S` seconds, a counter that went down wrapped at its
    ``max_energy_range_uj``. The whole socket: other processes on the machine count too, so
    parallel tuning workers on one machine each count the machine's energy.
  - ``estimate`` otherwise: CPU-hours x :data:`ESTIMATE_WATTS_PER_CORE` (a busy server core,
    its share of the package power), plus on a GPU without NVML, device-hours x
    :data:`ESTIMATE_WATTS_PER_GPU`.

Under DDP each rank meters itself; the callback sums CPU time and energy over the ranks (an
all-reduce at the end of training) and logs from rank 0; RAPL is read by one rank per machine
(local rank 0) so a socket is not counted once per rank. When training stops on an exception
there is no all-reduce: rank 0's values are scaled by the world size (machines for RAPL).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

KEYS = ("device_hours", "cpu_hours", "energy_kwh")
METRIC_PREFIX = "cost/"  # a training run's metrics: cost/device_hours, cost/cpu_hours, cost/energy_kwh
SOURCE_TAG = "cost.energy_source"  # nvml | rapl | estimate
ESTIMATE_WATTS_PER_CORE = 10.0  # ~ a 250-350 W server CPU package spread over its 32 cores
ESTIMATE_WATTS_PER_GPU = 350.0  # ~ half the 700 W TDP of an H100 / H200 SXM: an average under training
POLL_S = 5.0  # energy counters and power draw are read this often (RAPL wraps in ~1 h at 100 W)
RAPL_ROOT = Path("/sys/class/powercap")
_J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Cost:
    """The cost of one or more runs; ``energy_source``: nvml, rapl, estimate or a ``+``-joined mix."""

    device_hours: float = 0.0
    cpu_hours: float = 0.0
    energy_kwh: float = 0.0
    energy_source: str = ""

    def __add__(self, other: Cost) -> Cost:
        sources = {s for c in (self, other) for s in c.energy_source.split("+") if s}
        return Cost(
            self.device_hours + other.device_hours,
            self.cpu_hours + other.cpu_hours,
            self.energy_kwh + other.energy_kwh,
            "+".join(sorted(sources)),
        )

    def as_dict(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in KEYS}

    def metrics(self, prefix: str = METRIC_PREFIX) -> dict[str, float]:
        """``{prefix + key: value}``: what a training run logs."""
        return {prefix + key: value for key, value in self.as_dict().items()}

    @classmethod
    def from_metrics(
        cls, metrics: Mapping[str, float], source: str = "", prefix: str = METRIC_PREFIX
    ) -> Cost | None:
        """The cost a run logged (None when it logged none)."""
        if not any(prefix + key in metrics for key in KEYS):
            return None
        return cls(*(float(metrics.get(prefix + key, 0.0)) for key in KEYS), source)


# ---- energy sources ------------------------------------------------------------------------------


class RaplReader:
    """Joules from the Intel RAPL package counters under ``root`` (``intel-rapl:<n>/energy_uj``,
    top-level zones only: their sub-zones, ``intel-rapl:<n>:<m>``, are parts of them). Each
    :meth:`poll` adds the increase since the last one; a counter lower than before wrapped once
    at ``max_energy_range_uj``. Polls must come often enough that no counter wraps twice."""

    source = "rapl"

    def __init__(self, root: Path | str = RAPL_ROOT) -> None:
        self.zones = self.zones_under(Path(root))
        if not self.zones:
            raise OSError(f"no readable RAPL package counters under {root}")
        self.ranges = {zone: _read_int(zone / "max_energy_range_uj") for zone in self.zones}
        self._last = {zone: _read_int(zone / "energy_uj") for zone in self.zones}
        self.joules = 0.0

    @staticmethod
    def zones_under(root: Path) -> list[Path]:
        """The readable top-level zones; the ``package-*`` ones where the machine also has a
        ``psys`` (platform) zone, which contains them."""
        zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            with contextlib.suppress(OSError, ValueError):
                _read_int(zone / "energy_uj")
                zones.append(zone)
        named = {zone: _read_text(zone / "name") for zone in zones}
        packages = [zone for zone in zones if named[zone].startswith("package")]
        return packages or zones

    def poll(self) -> float:
        for zone in self.zones:
            now = _read_int(zone / "energy_uj")
            before = self._last[zone]
            delta = now - before if now >= before else now + self.ranges[zone] - before
            self.joules += delta / 1e6
            self._last[zone] = now
        return self.joules


class NvmlEnergy:
    """Joules of one GPU from NVML: the total-energy counter (mJ) where the GPU has one, else the
    power draw (mW) sampled at each :meth:`poll` and integrated. ``nvml``: the ``pynvml`` module
    (an argument so tests can pass a fake one)."""

    source = "nvml"

    def __init__(self, device_index: int, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml  # package nvidia-ml-py; ImportError: no NVML, estimate instead
        nvml.nvmlInit()
        self.nvml = nvml
        self.handle = _nvml_handle(nvml, device_index)
        self.joules = 0.0
        self._time = time.monotonic()
        try:
            self._counter: int | None = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except nvml.NVMLError:  # older than Volta: sample the power draw
            self._counter = None
            self._watts = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def poll(self) -> float:
        if self._counter is not None:
            now = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.joules += max(now - self._counter, 0) / 1000.0
            self._counter = now
        else:
            watts = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            now = time.monotonic()
            self.joules += (watts + self._watts) / 2 * (now - self._time)
            self._watts, self._time = watts, now
        return self.joules


def _nvml_handle(nvml: Any, device_index: int) -> Any:
    """The NVML handle of CUDA device ``device_index`` (by UUID: CUDA_VISIBLE_DEVICES reorders)."""
    with contextlib.suppress(Exception):
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return nvml.nvmlDeviceGetHandleByIndex(device_index)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def energy_source(
    *, gpu_index: int | None, rapl_root: Path | str = RAPL_ROOT
) -> RaplReader | NvmlEnergy | None:
    """The meter of this rank's energy: NVML for a GPU, else RAPL, else None (an estimate)."""
    if gpu_index is not None:
        try:
            return NvmlEnergy(gpu_index)
        except Exception as error:  # noqa: BLE001 - no pynvml, no driver: estimate instead
            _logger.info("cost: no NVML energy for GPU %d (%s): energy is estimated", gpu_index, error)
            return None
    try:
        return RaplReader(rapl_root)
    except (OSError, ValueError):
        return None


# ---- the meter -----------------------------------------------------------------------------------


class CostMeter:
    """Device-hours, CPU-hours and energy of this process from :meth:`start` (see the module doc).

    ``devices``: the devices in use by the whole run (the world size); ``gpu_index``: this rank's
    CUDA device (None on CPU); ``machine_energy``: whether this rank reads machine-wide counters
    (RAPL; False on all but one rank per machine). ``energy``: an energy source to use instead of
    the one found (tests). A daemon thread polls the energy counters every ``poll_s`` seconds.
    """

    def __init__(
        self,
        *,
        devices: int = 1,
        gpu_index: int | None = None,
        machine_energy: bool = True,
        energy: RaplReader | NvmlEnergy | None = None,
        rapl_root: Path | str = RAPL_ROOT,
        poll_s: float = POLL_S,
    ) -> None:
        self.devices, self.gpu_index, self.poll_s = max(int(devices), 1), gpu_index, poll_s
        self._energy = energy
        self._find = energy is None
        self._machine_energy, self._rapl_root = machine_energy, rapl_root
        self._wall0 = self._cpu0 = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: Cost | None = None
        self._warned = False

    @property
    def source(self) -> str:
        return self._energy.source if self._energy is not None else "estimate"

    def start(self) -> CostMeter:
        if self._find:
            self._energy = energy_source(gpu_index=self.gpu_index, rapl_root=self._rapl_root)
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        if self._energy is not None:
            self._thread = threading.Thread(target=self._poll_loop, name="bigmodel_ops-cost", daemon=True)
            self._thread.start()
        return self

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> float:
        if self._energy is None:
            return 0.0
        with self._lock:
            try:
                return self._energy.poll()
            except Exception as error:  # noqa: BLE001 - a failed read: the next poll counts its energy
                if not self._warned:
                    _logger.warning("cost: energy counter unreadable (%s); energy may be undercounted", error)
                    self._warned = True
                return self._energy.joules

    def read(self) -> Cost:
        """The cost so far (the meter keeps running)."""
        if self._result is not None:
            return self._result
        hours = (time.perf_counter() - self._wall0) / 3600.0
        cpu_hours = (time.process_time() - self._cpu0) / 3600.0
        measured = self._poll()
        if self._energy is not None:
            # RAPL on another rank of this machine: that rank counts the machine's energy
            counted = self._machine_energy or self._energy.source != "rapl"
            kwh = measured / _J_PER_KWH if counted else 0.0
        else:
            watts_hours = cpu_hours * ESTIMATE_WATTS_PER_CORE
            if self.gpu_index is not None:
                watts_hours += hours * ESTIMATE_WATTS_PER_GPU
            kwh = watts_hours / 1000.0
        return Cost(hours * self.devices, cpu_hours, kwh, self.source)

    def stop(self) -> Cost:
        """The cost from start to now; the meter stops (later reads return the same)."""
        if self._result is None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._result = self.read()
        return self._result
