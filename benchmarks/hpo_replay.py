"""Pruner settings tried in seconds: a finished unpruned search replayed through each of them.

Reads an Optuna study that ran without a pruner (for example the ``study-unpruned.db`` that
``hpo_pruning.py --keep DIR`` leaves in DIR) and, for each ``--try`` setting, feeds the complete
trials' step reports, in trial order, to a fresh in-memory study with that pruner
(:func:`bigmodel_ops.tuning.study.make_pruner`, so exactly what the tune stage would build, the
study name included: Hyperband's brackets depend on it). A trial the pruner stops at step s
costs s optimizer steps; a trial it lets finish costs its recorded ``optimizer_steps`` and
keeps its value.

The replay is exact when the sampler's choices do not depend on earlier results
(``tune.sampler: random``) and each trial's training is seeded, as the tune stage does: the
pruned search then trains the same trials, and a trial stopped at step s has made the same
reports as its unpruned twin up to s. With a model-based sampler (TPE, CMA-ES, GP) it is an
estimate: a real pruned search samples other points once it sees other results. Trials that
did not complete in the unpruned study (failed) are left out of both sides. Checked against real
pruned searches of the tune stage (random sampler, 16 trials): successive halving and median on
2-epoch trials and Hyperband on 1-epoch trials matched step for step; Hyperband on 2-epoch trials took one decision in 16
differently (1,700 replayed steps against 1,732 real ones), with identical reports on both sides.

A setting with ``report_every_n_examples=N`` replays on the examples axis, as the tune stage
reports then: a trial of batch size B (its sampled ``batch_size``, else the params'
``finetune.batch_size``; a trial trains on one device without gradient accumulation) reports at
each first optimizer step whose examples (step x B) reach the next multiple of N, with step =
those examples; only those of its recorded reports are fed, and its cost stays in optimizer
steps. Reports do not change the training (the subset is measured without gradients, in eval
mode), so a recorded report at such a step is the one the real search would have made. The
replay is exact or refused: when the recorded study lacks one of those steps (recorded every 20
steps, batch 32, N=320: step 10), the script exits 2 naming the setting, the trial and the step.
The tune stage gives an examples-axis search its own study name, and Hyperband hashes the name
into its brackets: a Hyperband setting on the examples axis needs ``--examples-study-name`` (the
``examples`` entry of the ``study-names.json`` that ``hpo_pruning.py --keep DIR`` writes) and is
refused without it. With N a multiple of every batch size B, record the unpruned study with a
``report_every_n_steps`` that divides every N / B. The recorded study must itself report on
optimizer steps: one the tune stage ran with ``report_every_n_examples`` is refused.

Prints one line per setting, then, last, one JSON line with, per setting, ``steps_fraction``
(replayed steps over the unpruned study's), ``best_gap_points`` (unpruned best minus replayed
best, times 100: accuracy points for ``val_acc``; for a minimised metric, replayed minus
unpruned) and ``n_pruned``.

Usage::

    python benchmarks/hpo_replay.py --study sqlite:///DIR/study-unpruned.db \\
        --try pruner=successive_halving,min_resource=60,reduction_factor=4 --try pruner=hyperband \\
        --try report_every_n_examples=640,pruner=successive_halving,min_resource=1280

Each ``--try`` is comma-separated ``tune.*`` settings over the repo's params.yaml (or
``--params``: its ``finetune.batch_size`` is the batch size of trials that did not search it),
validated by the params schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


class ReplayError(Exception):
    """The study or a setting cannot be replayed; the message says which and why."""


# Gradient accumulation of a tune trial: fine-tuning builds its Trainer without any (and each
# trial runs on one device), so one optimizer step trains batch_size examples.
ACCUMULATION = 1


def parse_setting(text: str, *, base: dict[str, Any], source: str) -> Any:
    """``key=value,key=value`` over ``base``'s tune section, validated: the whole Params (the
    setting is its ``tune``; ``finetune.batch_size`` is the batch size of unsearched trials)."""
    from bigmodel_ops.config import ConfigError, parse_params

    raw = json.loads(json.dumps(base))
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReplayError(f"--try {text!r}: {item!r} is not KEY=VALUE")
        raw["tune"][key.strip()] = yaml.safe_load(value)
    try:
        return parse_params(raw, source=f"{source} with --try {text}")
    except ConfigError as error:
        raise ReplayError(str(error)) from None


def load_unpruned(storage: str, study_name: str | None) -> tuple[Any, list[Any]]:
    """The study and its complete trials, in trial order; refuses a study that pruned."""
    import optuna

    names = optuna.get_all_study_names(storage=storage)
    if study_name is None:
        if len(names) != 1:
            raise ReplayError(f"{storage} holds {len(names)} studies {names}: name one with --study-name")
        study_name = names[0]
    elif study_name not in names:
        raise ReplayError(f"{storage} has no study {study_name!r} (it has {names})")
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = optuna.trial.TrialState
    if any(t.state == states.PRUNED for t in study.trials):
        raise ReplayError(
            f"study {study_name!r} pruned some trials: replay needs a search run without a pruner"
        )
    trials = [t for t in study.trials if t.state == states.COMPLETE]
    if not trials:
        raise ReplayError(f"study {study_name!r} has no complete trial")
    missing = [t.number for t in trials if "optimizer_steps" not in t.user_attrs or not t.intermediate_values]
    if missing:
        raise ReplayError(
            f"study {study_name!r}: trials {missing} lack step reports or the user attribute "
            "optimizer_steps (run by the tune stage, they have both)"
        )
    in_examples = [t.number for t in trials if t.user_attrs.get("report_axis") == "examples"]
    if in_examples:
        raise ReplayError(
            f"study {study_name!r}: trials {in_examples} reported on training examples "
            "(tune.report_every_n_examples): replay needs a search that reported on optimizer steps"
        )
    return study, trials


def reports_to_replay(trial: Any, params: Any, *, setting: str) -> list[tuple[int, int, float]]:
    """(optimizer step, report step, value) of the reports the tune stage would have made in
    ``trial`` under ``params.tune``, in step order.

    Steps axis (``report_every_n_examples`` null): every recorded report, as recorded. Examples
    axis: the steps of :func:`~bigmodel_ops.tuning.pruning.examples_report_steps` up to the
    trial's ``optimizer_steps``, for the trial's batch size (its ``batch_size`` param, else
    ``params.finetune.batch_size``) times :data:`ACCUMULATION`, each reported at step x that;
    ReplayError naming ``setting``, the trial and the first such step the study did not record.
    """
    from bigmodel_ops.tuning.pruning import examples_report_steps

    recorded = trial.intermediate_values
    every = params.tune.report_every_n_examples
    if every is None:
        return [(step, step, recorded[step]) for step in sorted(recorded)]
    batch = int(trial.params.get("batch_size", params.finetune.batch_size))
    per_step = batch * ACCUMULATION
    wanted = examples_report_steps(
        every_n_examples=every, examples_per_step=per_step, last_step=int(trial.user_attrs["optimizer_steps"])
    )
    absent = [step for step in wanted if step not in recorded]
    if absent:
        steps = sorted(recorded)
        shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
        raise ReplayError(
            f"--try {setting}: report_every_n_examples={every} cannot be replayed exactly: trial "
            f"{trial.number} (batch {batch} x accumulation {ACCUMULATION} = {per_step} examples a step) "
            f"would report at optimizer step {absent[0]} ({absent[0] * per_step} examples), which the "
            f"study did not record (its reports: steps {shown})"
        )
    return [(step, step * per_step, recorded[step]) for step in wanted]


def replay(
    study: Any,
    trials: list[Any],
    tune: Any,
    *,
    reports: list[list[tuple[int, int, float]]] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Feed ``trials``' reports, in order, to a fresh study with ``tune``'s pruner.

    ``name``: the fresh study's name (Hyperband's brackets hash it); default the recorded study's.

    ``reports``: per trial, the (optimizer step, report step, value) to feed
    (:func:`reports_to_replay`); None feeds every recorded report at its own step. A trial
    pruned at a report costs that report's optimizer step.
    """
    import optuna

    from bigmodel_ops.tuning.study import make_pruner

    if reports is None:
        reports = [[(s, s, t.intermediate_values[s]) for s in sorted(t.intermediate_values)] for t in trials]
    direction = study.direction
    shadow = optuna.create_study(
        study_name=name or study.study_name, direction=direction, pruner=make_pruner(tune)
    )
    steps, values, pruned = 0, [], 0
    for original, fed in zip(trials, reports, strict=True):
        trial = shadow.ask()
        for step, report_step, value in fed:
            trial.report(value, report_step)
            if trial.should_prune():
                steps, pruned = steps + step, pruned + 1
                shadow.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            steps += int(original.user_attrs["optimizer_steps"])
            values.append(float(original.value))
            shadow.tell(trial, original.value)
    total = sum(int(t.user_attrs["optimizer_steps"]) for t in trials)
    maximise = direction == optuna.study.StudyDirection.MAXIMIZE
    best_all = max(t.value for t in trials) if maximise else min(t.value for t in trials)
    best = (max(values) if maximise else min(values)) if values else None
    gap = None if best is None else 100.0 * ((best_all - best) if maximise else (best - best_all))
    return {
        "steps_fraction": round(steps / total, 4),
        "best_gap_points": None if gap is None else round(gap, 2),
        "n_pruned": pruned,
        "n_complete": len(values),
        "steps": steps,
        "best_value": best,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="Optuna storage URL of the unpruned search")
    parser.add_argument("--study-name", default=None, help="needed when the storage holds several studies")
    parser.add_argument(
        "--try",
        dest="settings",
        action="append",
        required=True,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="tune.* settings of one pruner to replay, e.g. pruner=median,pruner_warmup_steps=60 "
        "(report_every_n_examples=N: on the examples axis)",
    )
    parser.add_argument(
        "--examples-study-name",
        default=None,
        help="the study name of this setup on the examples axis (hpo_pruning.py --keep DIR writes it to "
        "DIR/study-names.json); needed by Hyperband settings with report_every_n_examples",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="params file (default: the repo's); its finetune.batch_size is that of unsearched trials",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params_path = args.params or REPO_ROOT / "params.yaml"
    try:
        base = yaml.safe_load(params_path.read_text())
        settings = [parse_setting(text, base=base, source=str(params_path)) for text in args.settings]
        study, trials = load_unpruned(args.study, args.study_name)
        for text, params in zip(args.settings, settings, strict=True):
            t = params.tune
            if (
                t.report_every_n_examples is not None
                and t.pruner == "hyperband"
                and not args.examples_study_name
            ):
                raise ReplayError(
                    f"--try {text}: Hyperband on the examples axis hashes the examples-axis study name "
                    "into its brackets: give it with --examples-study-name (the 'examples' entry of "
                    "the study-names.json that hpo_pruning.py --keep DIR writes)"
                )
        # Every setting's reports before any replay: a setting that cannot be exact refuses the run.
        fed = [
            [reports_to_replay(t, params, setting=text) for t in trials]
            for text, params in zip(args.settings, settings, strict=True)
        ]
    except (ReplayError, OSError) as error:
        print(f"hpo_replay: {error}", file=sys.stderr)
        return 2
    total = sum(int(t.user_attrs["optimizer_steps"]) for t in trials)
    best = max(trials, key=lambda t: t.value if study.direction.name == "MAXIMIZE" else -t.value)
    print(
        f"unpruned {study.study_name}: {len(trials)} complete trials, {total} optimizer steps, "
        f"best {best.value:.4f} (trial {best.number})",
        flush=True,
    )
    results = []
    for text, params, reports in zip(args.settings, settings, fed, strict=True):
        examples = params.tune.report_every_n_examples is not None
        name = args.examples_study_name if examples else None
        result = {"setting": text, **replay(study, trials, params.tune, reports=reports, name=name)}
        results.append(result)
        gap = result["best_gap_points"]
        print(
            f"{text}: {result['n_pruned']} pruned, {result['steps_fraction']:.0%} of the steps, "
            f"best gap {'none complete' if gap is None else f'{gap:+.2f}'}",
            flush=True,
        )
    summary = {
        "benchmark": "hpo_replay",
        "study": study.study_name,
        "n_trials": len(trials),
        "unpruned_steps": total,
        "unpruned_best": best.value,
        "settings": results,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
