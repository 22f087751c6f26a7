"""``bigmodel-ops dashboard``: optuna-dashboard on the tune stage's study storage."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

from bigmodel_ops.errors import ConfigError
from bigmodel_ops.tuning.storage import open_storage


def dashboard_urls(storage: optuna.storages.BaseStorage, *, host: str, port: int) -> list[str]:
    """The dashboard's home URL, then one URL per study in the storage (``<url>  <study name>``)."""
    base = f"http://{host}:{port}/dashboard"
    lines = [f"{base}/"]
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        lines.append(f"{base}/studies/{summary._study_id}  {summary.study_name}")
    return lines


def run_dashboard(
    *,
    url: str | None,
    journal: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    setting: str = "tune.storage",
) -> int:
    """Serve optuna-dashboard for the study storage (``url``, else the journal file) on
    ``host:port`` until interrupted, after printing its URLs (stdout, flushed).

    Raises ConfigError when optuna-dashboard is not installed, when there is no journal yet (no
    tune stage has run) or when ``url`` cannot be opened (naming ``setting``).
    """
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ConfigError(
            "bigmodel-ops dashboard needs optuna-dashboard: pip install optuna-dashboard"
        ) from None
    if not url and not journal.is_file():
        raise ConfigError(f"{journal}: no study yet (run `bigmodel-ops tune` first, or set tune.storage)")
    # The heartbeat settings do not matter here: the dashboard only reads and never runs trials.
    storage = open_storage(
        url, journal=journal, heartbeat_interval=60, grace_period=120, max_retry=0, setting=setting
    )
    lines = dashboard_urls(storage, host=host, port=port)
    print(f"optuna-dashboard: {lines[0]}", flush=True)
    for line in lines[1:]:
        print(f"  study: {line}", flush=True)
    sys.stdout.flush()
    run_server(storage, host=host, port=port)
    return 0
