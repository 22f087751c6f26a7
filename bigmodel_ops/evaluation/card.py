"""The model card of a registered classifier version (markdown).

:func:`model_card` writes what a user of a version needs to know: what it classifies, the data and
its version, the training recipe (backbone, pretraining budget and objective from
``outputs/metrics/pretrain.json``, the best tuned params from ``outputs/tune/best_params.yaml``,
the fine-tuning hparams actually used), test metrics beside the TF-IDF baseline, the gate
decision, the cost of producing it (device-hours, CPU-hours and energy of pretraining, tuning with
its trials, and fine-tuning: the ``cost/*`` metrics of their runs, :mod:`bigmodel_ops.cost`),
intended use and limits, and the runs that made it. The evaluate stage writes it to
``outputs/evaluate/model_card.md``, logs it to its run and sets it as the version's description
(:func:`description`).

No secrets: the card uses the experiment name, run ids, the version's tags and params values
outside ``tracking`` and ``tune.storage`` (never a tracking URI, never a storage URL); a data
path that is a URL is shown without its user info and query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from bigmodel_ops.cost import ESTIMATE_WATTS_PER_CORE, ESTIMATE_WATTS_PER_GPU

CARD_FILE = "model_card.md"
# MLflow's SQL stores declare a model version's description as VARCHAR(5000).
DESCRIPTION_LIMIT = 5000

# (metric suffix, shown name, higher is better)
_SUMMARY = (
    ("acc", "accuracy", True),
    ("f1", "macro F1", True),
    ("f1_micro", "micro F1", True),
    ("roc_auc", "ROC-AUC", True),
    ("log_loss", "log loss", False),
    ("ece", "expected calibration error", False),
)


def _read_json(path: Path | None) -> dict[str, Any]:
    """A JSON or YAML mapping file ({} when absent or unreadable: the card says what is missing)."""
    if path is None:
        return {}
    try:
        value = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def safe_location(value: str) -> str:
    """A path or URL without user info, query or fragment (where credentials and tokens hide)."""
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc:
        return value
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _num(value: Any, digits: int = 4) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"
    return f"{number:.{digits}f}"


def _metrics_table(metrics: Mapping[str, float]) -> list[str]:
    rows = [
        "| metric | model | baseline (TF-IDF + logistic regression) | model - baseline |",
        "|---|---|---|---|",
    ]
    for suffix, shown, _ in _SUMMARY:
        key = f"test_{suffix}"
        if key not in metrics:
            continue
        diff = metrics.get(f"{key}_minus_baseline")
        if diff is None and f"baseline_{key}" in metrics:
            diff = float(metrics[key]) - float(metrics[f"baseline_{key}"])
        rows.append(
            f"| {shown} (`{key}`) | {_num(metrics[key])} | {_num(metrics.get(f'baseline_{key}'))} "
            f"| {_num(diff)} |"
        )
    return rows


_COST_STAGES = {"pretrain": "pretrain", "tune": "tune (all trials)", "finetune": "finetune"}


def _sig(value: float) -> str:
    return f"{value:.3g}"


def _cost_section(cost: Mapping[str, Any] | None) -> list[str]:
    """The "Cost" section: one row per stage of the lineage (a ``Cost`` or None) and the total."""
    lines = ["## Cost", ""]
    found = {stage: c for stage, c in (cost or {}).items() if c is not None}
    if not found:
        return [
            *lines,
            "No cost recorded: the training runs of this version logged no `cost/*` metrics (they ran "
            "before cost metering) or could not be read.",
            "",
        ]
    lines += [
        "What producing this version took: every training run of its lineage (`cost/*` metrics of "
        "their MLflow runs).",
        "",
        "| stage | device-hours | CPU-hours | energy (kWh) | energy source |",
        "|---|---|---|---|---|",
    ]
    for stage, shown in _COST_STAGES.items():
        c = found.get(stage)
        if c is None:
            lines.append(f"| {shown} | not recorded | | | |")
        else:
            row = f"{_sig(c.device_hours)} | {_sig(c.cpu_hours)} | {_sig(c.energy_kwh)} | {c.energy_source or '?'}"
            lines.append(f"| {shown} | {row} |")
    costs = list(found.values())
    total = sum(costs[1:], costs[0])
    label = "**total**" if len(found) == len(_COST_STAGES) else "**total** (recorded stages)"
    lines += [
        f"| {label} | {_sig(total.device_hours)} | {_sig(total.cpu_hours)} | {_sig(total.energy_kwh)} "
        f"| {total.energy_source or '?'} |",
        "",
        "Device-hours: wall time x devices in use (GPUs, or processes on CPU). CPU-hours: the training "
        "processes' CPU time. Energy: `nvml` is the GPUs' own counters, `rapl` the CPU packages' "
        f"(the whole socket), `estimate` is CPU-hours x {ESTIMATE_WATTS_PER_CORE:g} W per core (+ "
        f"{ESTIMATE_WATTS_PER_GPU:g} W per GPU-hour without NVML).",
        "",
    ]
    return lines


def _kv(items: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}`={v}" for k, v in items.items()) or "none"


def model_card(
    *,
    name: str,
    version: str | int,
    labels: Sequence[str],
    metrics: Mapping[str, float],
    promotion: Mapping[str, Any],
    version_tags: Mapping[str, str],
    params: Any,
    classifier_config: Mapping[str, Any],
    pretrain_report: Path | None = None,
    best_params: Path | None = None,
    n_test: int | None = None,
    n_train: int | None = None,
    cost: Mapping[str, Any] | None = None,
) -> str:
    """The markdown card of version ``version`` of registered model ``name`` (see the module doc).

    ``cost``: {stage: :class:`bigmodel_ops.cost.Cost` or None} for pretrain, tune and finetune."""
    pretrain = _read_json(pretrain_report)
    tuned = _read_json(best_params)
    backbone = dict(classifier_config.get("config") or {})
    source = params.prepare.source
    promoted = bool(promotion.get("promoted"))
    alias = promotion.get("alias", "")
    gate = promotion.get("gate") or {}
    data_tags = {k[len("data.") :]: v for k, v in sorted(version_tags.items()) if k.startswith("data.")}
    lines = [
        f"# Model card: {name} v{version}",
        "",
        f"A text classifier over the labels {', '.join(f'`{label}`' for label in labels)}, fine-tuned "
        f"from a {backbone.get('objective', '?')} transformer language model pretrained by this pipeline "
        f"(project `{params.project.name}`, experiment `{params.experiment_name}`).",
        "",
        "## Gate decision",
        "",
        f"**{'Promoted to ' + str(alias) if promoted else 'Kept as ' + str(alias)}.** "
        f"{promotion.get('reason', '')}",
        "",
        f"Gate: `{gate.get('metric', '?')}` >= {gate.get('min', '?')}, margin over the current champion "
        f"{gate.get('min_margin_over_champion', 0)}, ceilings {_kv(gate.get('max') or {})}.",
        "",
        "## Data",
        "",
        f"- Source: `{source.kind}` `{safe_location(source.path)}` (text column `{source.text_column}`, "
        f"label column `{source.label_column}`).",
        f"- Split: train {params.prepare.split.train}, val {params.prepare.split.val}, "
        f"test {params.prepare.split.test} (seed {params.project.seed})"
        + (f"; {n_train} train and {n_test} test texts." if n_train and n_test else "."),
        f"- Data version: `{version_tags.get('data_version', 'unknown')}` (hash of the dvc.lock md5s below); "
        f"git commit `{version_tags.get('git_commit', 'unknown')}`"
        + (" (uncommitted changes)" if version_tags.get("git_dirty") == "true" else "")
        + ".",
    ]
    lines += [f"  - `{path}`: `{md5}`" for path, md5 in data_tags.items()]
    lines += [
        "",
        "## Training recipe",
        "",
        f"- Backbone: {backbone.get('objective', '?')} objective, {backbone.get('n_layer', '?')} layers, "
        f"{backbone.get('n_head', '?')} heads, width {backbone.get('n_embd', '?')}, context "
        f"{backbone.get('block_size', '?')}, vocabulary {backbone.get('vocab_size', '?')}"
        + (", ALiBi" if backbone.get("alibi") else "")
        + ".",
    ]
    if pretrain:
        lines.append(
            f"- Pretraining budget: {pretrain.get('global_step', '?')} of {pretrain.get('max_steps', '?')} "
            f"steps, {pretrain.get('tokens', '?')} tokens, {_num(pretrain.get('train_seconds'), 0)} s; "
            f"val loss {_num(pretrain.get('val_loss'))} (unigram entropy "
            f"{_num(pretrain.get('unigram_entropy'))}); run `{pretrain.get('run_id', 'unknown')}`."
        )
    else:
        lines.append("- Pretraining: no report found (outputs/metrics/pretrain.json).")
    if tuned:
        shown = {k: v for k, v in tuned.items() if k not in ("value", "trial")}
        lines.append(
            f"- Best tuned params (trial {tuned.get('trial', '?')}, val {_num(tuned.get('value'))}): "
            f"{_kv(shown)}."
        )
    else:
        lines.append("- Tuning: no best params (outputs/tune/best_params.yaml); params.finetune used.")
    hparams = classifier_config.get("hparams") or {}
    weights = f"best epoch {classifier_config.get('best_epoch', '?')}"
    if "soup_members" in classifier_config:  # finetune.combine_restarts
        weights = (
            f"{classifier_config.get('combine_restarts', 'soup')}: the mean of restarts "
            f"{classifier_config['soup_members']} (seeds {classifier_config.get('soup_seeds', '?')}), each at its "
            "best epoch"
        )
    averaging = hparams.get("weight_averaging", "none")  # finetune.weight_averaging
    if averaging == "ema":
        weights += f" of an exponential moving average of the weights (decay {hparams.get('ema_decay', '?')})"
    elif averaging == "swa":
        weights += (
            " of the mean of the weights after each step past the first "
            f"{hparams.get('swa_start', '?')} of the steps (swa)"
        )
    lines.append(
        f"- Fine-tuning: {classifier_config.get('pooling', '?')} pooling, max length "
        f"{classifier_config.get('max_length', '?')} tokens ({classifier_config.get('truncation', 'head')} "
        f"kept), {weights}; hparams {_kv(hparams)}."
    )
    lines += ["", *_cost_section(cost)]
    lines += [
        "## Evaluation (test split)",
        "",
        *_metrics_table(metrics),
        "",
        f"CPU latency: batch 1 median {_num(metrics.get('latency_b1_median_ms'), 1)} ms, batch 32 median "
        f"{_num(metrics.get('latency_b32_median_ms'), 1)} ms; size on disk "
        f"{_num(metrics.get('model_size_mb'), 2)} MB. Per-class precision / recall / F1, curves and the "
        "most confident errors are artifacts of the evaluate run (`evaluate/`, `plots/`).",
        "",
        "## Intended use and limits",
        "",
        f"- Intended use: classifying short English texts like the training data (source `{source.kind}`) "
        f"into {', '.join(labels)}; through `bigmodel-ops predict` or `mlflow models serve` (pyfunc "
        "output: `label`, `score` and one `prob_<label>` column per label).",
        "- It always answers one of the training labels: a text of another kind (another language, "
        "another domain, another label) still gets a confident-looking label. Empty texts are refused.",
        f"- Texts longer than {classifier_config.get('max_length', '?')} tokens are truncated: "
        f"{_read_part(classifier_config)}.",
        "- The test split is small and from the same source as the training data: the metrics above "
        "say nothing about other data; compare with the baseline before trusting a gain.",
        "- Probabilities are softmax outputs; see the calibration error above before using them as "
        "confidences.",
        "",
        "## Lineage",
        "",
        f"- Runs: pretrain `{version_tags.get('pretrain_run_id', 'unknown')}`, tune "
        f"`{version_tags.get('tune_run_id', 'unknown')}`, finetune "
        f"`{version_tags.get('finetune_run_id', 'unknown')}`, evaluate "
        f"`{version_tags.get('evaluate_run_id', 'unknown')}`; pipeline "
        f"`{version_tags.get('pipeline_id', 'unknown')}`.",
        "",
    ]
    return "\n".join(lines)


def description(card: str, *, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a version description: whole when it fits MLflow's limit, else cut at a line
    with a pointer to the full card (an artifact of the evaluate run)."""
    if len(card) <= limit:
        return card
    note = f"\n\n(truncated; the full card is the evaluate run's artifact evaluate/{CARD_FILE})"
    head = card[: limit - len(note)]
    return head[: head.rfind("\n")] + note


def _read_part(classifier_config: dict[str, Any]) -> str:
    """What of a long text the classifier reads, in words."""
    keep = classifier_config.get("truncation", "head")
    if keep == "tail":
        return "only their end is read"
    if keep == "head_tail":
        head = int(classifier_config.get("head_tokens", 0))
        tail = int(classifier_config.get("max_length", 0)) - head
        return f"their first {head} and last {tail} tokens are read, the middle is not"
    return "only their beginning is read"
