"""System metrics (CPU, memory, disk, network, GPU) of a stage run, sent through its queue.

MLflow's ``SystemMetricsMonitor`` samples with its own monitors; we keep those and its
``publish_metrics`` (the ``system/`` names and the step counter) but not its loop, which
expects its own ``BatchMetricsLogger`` (it reads ``total_training_time`` after every publish,
and on any error stops with "Failed to log system metrics"), asks the store for the run's
status after every sample (a store call in the training process, and an end to sampling during
an outage), and drops the partial sample at ``finish()``. Here samples are queued like any
metric, and ``finish()`` takes a last sample, so a run's system metrics cover it to its end.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

_logger = logging.getLogger(__name__)


class SystemMetrics(SystemMetricsMonitor):
    """Samples every ``interval_s`` on a daemon thread until ``finish()``, which samples once more."""

    def __init__(self, run: Any, *, interval_s: float, resumed: bool, uri: str) -> None:
        # resume_logging: continue the step count of a resumed run (one store read, now).
        super().__init__(run.run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri)
        self.mlflow_logger, self._stage_run = self, run  # publish_metrics records through us

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """What ``publish_metrics`` calls: samples go to the run's queue."""
        self._stage_run.log_metrics(metrics, step=int(step or 0))

    def monitor(self) -> None:
        samples, stopping = 0, False
        try:
            while not stopping:
                self.collect_metrics()
                samples += 1
                stopping = self._shutdown_event.wait(self.sampling_interval)
                if stopping:
                    self.collect_metrics()  # the sample at finish()
                if samples >= self.samples_before_logging or stopping:
                    self.publish_metrics(self.aggregate_metrics())
                    samples = 0
        except Exception as error:  # optional telemetry must not disturb training
            _logger.warning("system metrics stopped: %s", error)

    def finish(self) -> None:
        if self._process is not None:
            self._shutdown_event.set()
            self._process.join()
            self._process = None


def start_system_metrics(run: Any, interval_s: float, resumed: bool, uri: str) -> SystemMetrics | None:
    """Start sampling for ``run`` (a resumed run continues its step count); None (with a
    warning) when that is not possible."""
    try:
        monitor = SystemMetrics(run, interval_s=interval_s, resumed=resumed, uri=uri)
        monitor.start()
        return monitor
    except Exception as error:  # optional telemetry must not stop training
        _logger.warning("system metrics not recorded: %s", error)
        return None
