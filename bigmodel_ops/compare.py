"""`bigmodel-ops compare` and `bigmodel-ops runs reap`: the pipeline runs of the tracking store.

``compare A B`` (pipeline ids, ``pipeline-<id>`` run names or run ids; ``--last N``, default the
last 2 pipelines) prints the params that differ between two pipeline runs, their headline
metrics side by side (``tracking.headline_metrics``, copied onto each pipeline run) and the URL of
MLflow's compare page for the two runs. ``runs reap`` ends FAILED the runs whose heartbeat is
stale and whose process is gone (:mod:`bigmodel_ops.tracking.reaper`).
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from bigmodel_ops.config import Params
from bigmodel_ops.errors import ConfigError

PIPELINE_FILTER = "tags.`bigmodel_ops.role` = 'pipeline'"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `bigmodel-ops ui` serves the store by default


def add_parsers(sub: argparse._SubParsersAction, add_common_args: Any) -> None:
    """The ``compare`` and ``runs`` subcommands."""
    compare = sub.add_parser(
        "compare", help="Compare two pipeline runs: params that differ, headline metrics."
    )
    add_common_args(compare)
    compare.add_argument("refs", nargs="*", metavar="RUN", help="two pipeline ids or run ids")
    compare.add_argument(
        "--last", type=int, default=2, metavar="N", help="the last N pipelines, oldest first (default 2)"
    )
    runs = sub.add_parser("runs", help="Housekeeping of the tracking store's runs.")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    reap = runs_sub.add_parser(
        "reap", help="End FAILED the runs whose heartbeat is stale and whose process is gone."
    )
    add_common_args(reap)
    reap.add_argument(
        "--other-hosts",
        action="store_true",
        help="also runs of other hosts (their process cannot be checked)",
    )
    reap.add_argument("--dry-run", action="store_true", help="say what would be reaped, change nothing")


def run_command(params: Params, args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from bigmodel_ops.tracking.runs import tracking_uri

    uri = tracking_uri(params.tracking)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.experiment_name)
    if experiment is None:
        raise ConfigError(f"no MLflow experiment {params.experiment_name!r} in {uri}: run the pipeline first")
    if args.command == "runs":
        return _reap(client, experiment.experiment_id, params, args)
    runs = pick_runs(client, experiment.experiment_id, refs=args.refs, last=args.last)
    print(
        compare_text(
            runs, experiment_id=experiment.experiment_id, ui=uri if uri.startswith("http") else DEFAULT_UI
        )
    )
    return 0


def _reap(client: Any, experiment_id: str, params: Params, args: argparse.Namespace) -> int:
    from bigmodel_ops.tracking import reaper

    verdicts = reaper.reap(
        client,
        [experiment_id],
        stale_s=params.tracking.heartbeat_stale_s,
        other_hosts=args.other_hosts,
        dry_run=args.dry_run,
    )
    for verdict in verdicts:
        word = ("would reap" if args.dry_run else "reaped") if verdict.reaped else "left"
        print(f"{word:<10} {verdict.run_name} {verdict.run_id}: {verdict.reason}")
    print(f"{len(verdicts)} running stage run(s), {sum(v.reaped for v in verdicts)} dead")
    return 0


def pick_runs(client: Any, experiment_id: str, *, refs: list[str], last: int) -> list[Any]:
    """The pipeline runs named by ``refs`` (exactly two), else the ``last`` newest, oldest first.

    A ref is a run id, a pipeline id or a ``pipeline-<id>`` run name; ConfigError names a ref that
    matches nothing, and says how many pipelines exist when there are fewer than asked for."""
    if refs:
        if len(refs) != 2:
            raise ConfigError(f"compare takes two runs (or --last N), got {len(refs)}: {refs}")
        return [_find(client, experiment_id, ref) for ref in refs]
    if last < 2:
        raise ConfigError(f"compare --last must be at least 2, got {last}")
    found = client.search_runs(
        [experiment_id], PIPELINE_FILTER, max_results=last, order_by=["attributes.start_time DESC"]
    )
    if len(found) < 2:
        raise ConfigError(f"compare needs two pipeline runs; the experiment has {len(found)}")
    return list(reversed(found))


def _find(client: Any, experiment_id: str, ref: str) -> Any:
    pipeline_id = ref.removeprefix("pipeline-")
    found = client.search_runs(
        [experiment_id],
        f"{PIPELINE_FILTER} and tags.`bigmodel_ops.pipeline_id` = '{pipeline_id}'",
        max_results=1,
    )
    if found:
        return found[0]
    try:
        return client.get_run(ref)
    except Exception:  # noqa: BLE001 - any lookup failure means: no such run
        raise ConfigError(f"compare: no pipeline or run {ref!r} in this experiment") from None


def compare_text(runs: list[Any], *, experiment_id: str, ui: str) -> str:
    """The report: the two runs, the params that differ, the headline metrics and the compare URL."""
    from bigmodel_ops.tracking.frontpage import table_url

    a, b = runs
    lines = [
        f"A: {a.info.run_name} ({a.info.run_id}, {a.info.status})",
        f"B: {b.info.run_name} ({b.info.run_id}, {b.info.status})",
    ]
    keys = sorted(set(a.data.params) | set(b.data.params))
    differ = [
        (k, a.data.params.get(k, "-"), b.data.params.get(k, "-"))
        for k in keys
        if a.data.params.get(k) != b.data.params.get(k)
    ]
    lines.append(f"\nparams that differ ({len(differ)}):")
    lines += _table([("param", "A", "B"), *differ]) if differ else ["  (none)"]
    metrics = sorted(set(a.data.metrics) | set(b.data.metrics))
    rows = [
        (
            k,
            _num(a.data.metrics.get(k)),
            _num(b.data.metrics.get(k)),
            _delta(a.data.metrics.get(k), b.data.metrics.get(k)),
        )
        for k in metrics
    ]
    lines.append(f"\nheadline metrics ({len(rows)}):")
    lines += _table([("metric", "A", "B", "B - A"), *rows])
    ids = urllib.parse.quote(json.dumps([a.info.run_id, b.info.run_id]))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    lines.append(f"\nruns table: {table_url(ui, experiment_id)}")
    lines.append(f"MLflow compare: {ui.rstrip('/')}/#/compare-runs?runs={ids}&experiments={experiments}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b - a:+.6g}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
