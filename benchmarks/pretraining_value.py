"""The value of pretraining, measured: our pretrained backbone against the same classifier from scratch,
LoRA and TF-IDF + logistic regression, on one split of a labelled CSV, in one process.

    python benchmarks/pretraining_value.py --data ../shared/data/imdb_reviews_2500.csv [--objective causal]
    python benchmarks/pretraining_value.py --data reviews.csv --short        # first sentence of each review
    python benchmarks/pretraining_value.py --data reviews.csv --quick        # smoke test (< 2 minutes)
    python benchmarks/pretraining_value.py --data reviews.csv --set profiles.max_steps=2000 --set finetune.lr=0.001
    python benchmarks/pretraining_value.py --data reviews.csv --seed 1337 --seed 2 --seed 3 --skip-lora
    python benchmarks/pretraining_value.py --data reviews.csv --variant maxpool:pooling=mean_max

In a temporary project folder (MLflow: a sqlite store in that folder, no system metrics), with the
repo's params.yaml where only the source (the given CSV, plus ``--unlabeled`` text if given), the
objective and the seed change, the pipeline's own stages run as library calls: prepare (one seeded,
stratified train / val / test split), tokenize (WordPiece trained on the pretraining pool) and
pretrain (the active profile's recipe; its val loss against the unigram entropy of the val shard).

Then, with the same fine-tuning recipe and budget (the params' ``finetune`` section, as the
finetune stage builds it with ``use_tuned`` left aside), on the same tokenised splits:

  (a) pretrained: the classifier fine-tuned from the pretrained backbone;
  (b) scratch:    the same classifier, same architecture, random init (``from_scratch: true``);
  (d) lora:       ``method: lora`` from the pretrained backbone (adapters merged at export);

each exported at its best epoch (by val accuracy, as the finetune stage exports it), saved and
loaded back as the evaluate stage loads it, and scored on the TEST split; and

  (c) tfidf:      TF-IDF + logistic regression (``evaluate.baseline`` settings, the evaluate
                  stage's baseline) fitted on the same train split, scored on the same test split;

  (e) probe:      what the frozen backbone already knows about the labels, before any
                  fine-tuning: logistic regression (scikit-learn, C by 5-fold CV) on the mean of
                  the final hidden states over each text's real tokens, fitted on the train split
                  and scored on test, for the pretrained backbone and for the same architecture at
                  random init (seeded). A pretrained probe no better than the random one means
                  pretraining learnt nothing the task can read off its mean state.

``--short`` first writes a derived CSV with the first sentence of each review (markup stripped).
``--quick`` shrinks pretraining to a few steps and fine-tuning to one epoch (a smoke test).
``--seed S`` repeated runs the whole comparison once per seed (each its own split, tokenizer,
backbone and inits), prints a table across seeds, and reports the means: on a test split of a
few hundred texts one seed's (a) - (b) is within noise. ``--skip-lora`` leaves out (d).
``--variant NAME:KEY=VALUE[,KEY=VALUE]`` (repeatable) fine-tunes (a) once more from the same backbone
with those ``finetune`` settings (e.g. ``maxpool:pooling=mean_max``, or ``scratchmax:pooling=mean_max,
from_scratch=true`` for a control with them); the settings are checked before any work, and each
variant adds ``acc_NAME``, ``val_acc_NAME`` and ``NAME_minus_pretrained_points`` (with several seeds
also its ``..._se``, the standard error of the mean paired difference from (a)).

Prints a table, then as the LAST line one JSON object: acc_pretrained / acc_scratch / acc_lora /
acc_tfidf / acc_probe_pretrained / acc_probe_random (test accuracies, fractions), val_acc_*,
trainable_params_*, pretrain_val_loss, unigram_entropy (nats), gap_to_unigram (entropy minus val loss: > 0 means the model learnt beyond
token frequencies), seconds and seconds_<part>, objective, corpus (full | short), n_train / n_val /
n_test, test_se_points (the binomial standard error of an accuracy near the observed ones on a
test split of this size, in points: differences of about twice that are noise) and
pretrained_minus_scratch_points; tokenizer_sha256 and backbone_sha256 (the first 16 hex digits of
tokenizer.json's and of the pretrained model.safetensors' sha256: two runs of one seed whose figures
differ show whether they parted at the tokenizer, in pretraining or only in fine-tuning). With several
seeds the numbers are means over the seeds (``seconds``: the total; the hashes stay per seed),
``seeds`` lists the seeds, ``per_seed`` holds each seed's summary, and
``pretrained_minus_scratch_se`` / ``val_pretrained_minus_scratch_se`` the standard error of the
mean paired difference.
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks._project import log, project_dir  # noqa: E402

_MARKUP = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
# A sentence ends at . ! or ? followed by space and something that starts a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")

QUICK = {
    # A few steps of a small batch: enough to run every code path, not to learn anything.
    "profiles": {"max_steps": 8, "batch_size": 8},
    "model": {"block_size": 64},
    "pretrain": {"warmup_steps": 2, "val_every_n_steps": 4, "val_batches": 2, "checkpoint_every_n_steps": 4},
    "finetune": {"max_epochs": 1},
}
# Summary keys that describe one seed's run and are not averaged over seeds (``per_seed`` has them).
PER_SEED_ONLY = ("seed", "tokenizer_sha256", "backbone_sha256")


def first_sentence(text: str) -> str:
    """The first sentence of a review, HTML markup (``<br />``) and runs of spaces removed."""
    clean = _SPACE.sub(" ", _MARKUP.sub(" ", text)).strip()
    return _SENTENCE_END.split(clean, maxsplit=1)[0]


def write_short_csv(source: Path, target: Path, *, text_column: str) -> int:
    """Copy the CSV with each text replaced by its first sentence; returns the row count."""
    with (
        source.open(newline="", encoding="utf-8") as fin,
        target.open("w", newline="", encoding="utf-8") as fout,
    ):
        reader = csv.DictReader(fin)
        if reader.fieldnames is None or text_column not in reader.fieldnames:
            raise SystemExit(f"{source}: no column {text_column!r} (columns: {reader.fieldnames})")
        writer = csv.DictWriter(fout, fieldnames=reader.fieldnames)
        writer.writeheader()
        rows = 0
        for row in reader:
            row[text_column] = first_sentence(row[text_column] or "")
            writer.writerow(row)
            rows += 1
    return rows


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A section of the raw params; ``profiles`` means the active profile."""
    return raw["profiles"][raw["profile"]] if name == "profiles" else raw[name]


def build_params(
    *,
    data: Path,
    text_column: str,
    label_column: str,
    objective: str,
    seed: int | None,
    tracking_uri: str,
    quick: bool,
    unlabeled: Path | None = None,
    overrides: list[str] | None = None,
) -> Any:
    """The repo's params.yaml with the benchmark's source, objective and tracking, validated."""
    from bigmodel_ops.config import parse_params

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["prepare"]["source"].update(
        {"kind": "csv", "path": str(data), "text_column": text_column, "label_column": label_column}
    )
    raw["prepare"]["source"]["unlabeled_path"] = str(unlabeled) if unlabeled else None
    raw["model"]["objective"] = objective
    if seed is not None:
        raw["project"]["seed"] = seed
    raw["tracking"].update({"uri": tracking_uri, "system_metrics": False})
    # The registry is tracking bookkeeping, not part of what is measured.
    raw["pretrain"]["register_model"] = False
    if quick:
        for section, values in copy.deepcopy(QUICK).items():
            _section(raw, section).update(values)
    for item in overrides or ():
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not name or section not in raw:
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE with a params.yaml section")
        _section(raw, section)[name] = yaml.safe_load(value)
    return parse_params(raw, source="params.yaml (benchmark overrides)")


_RESTART_KEYS = ("kept_restart", "restart_acc", "restart_val_acc", "soup_members")
_SOUP_KEYS = ("acc_best_restart", "val_acc_best_restart")  # averaged over seeds
_RESERVED = ("pretrained", "scratch", "lora", "tfidf", "probe")
_VARIANT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` -> (name, ``finetune.KEY=VALUE`` overrides). SystemExit
    naming the argument when it is malformed; the values are checked by the params schema."""
    name, sep, settings = text.partition(":")
    pairs = [item.strip() for item in settings.split(",") if item.strip()]
    problem = None
    if not sep or not pairs:
        problem = "expected NAME:KEY=VALUE[,KEY=VALUE...] with finetune settings"
    elif not _VARIANT_NAME.fullmatch(name) or name in _RESERVED:
        problem = (
            f"name {name!r} must be lower-case letters, digits and _, and not one of {', '.join(_RESERVED)}"
        )
    elif bad := [item for item in pairs if "=" not in item or "." in item.partition("=")[0]]:
        problem = f"{bad[0]!r} is not KEY=VALUE with a key of the finetune section"
    if problem:
        raise SystemExit(f"--variant {text}: {problem}")
    return name, [f"finetune.{item}" for item in pairs]


def finetune_variant(
    name: str, params: Any, paths: Any, splits: Any, test: tuple[list[str], Any], **changes: Any
):
    """Fine-tune one variant with the params' recipe (``finetune.restarts`` runs, the best by val
    kept, or their soup with ``finetune.combine_restarts``, as the finetune stage does); export each
    run's best epoch (and the soup), reload it and score TEST."""
    import dataclasses

    from bigmodel_ops.classification.restarts import Restart, pick_best, restart_seed
    from bigmodel_ops.classification.soup import soup_of
    from bigmodel_ops.classification.training import fit_classifier, trainable_parameters
    from bigmodel_ops.pipeline._finetuning import fit_config, hyperparams

    started = time.perf_counter()
    hparams = hyperparams(params).replace(**changes) if changes else hyperparams(params)
    fit = fit_config(params)
    tries, accs, exported = [], [], []
    for k in range(params.finetune.restarts):
        seed = restart_seed(fit.seed, k)
        module, trainer = fit_classifier(
            dataclasses.replace(fit, seed=seed),
            model_dir=paths.pretrained_model,
            splits=splits,
            hparams=hparams,
            quiet=True,
        )
        n_trainable = trainable_parameters(module.model)
        tries.append(Restart.of_fit(module, trainer, index=k, seed=seed))
        # best epoch, adapters merged (as the finetune stage does)
        model = module.export_model().cpu()
        accs.append(_test_accuracy(model, f"{name}-{k}", params, paths, test))
        if params.finetune.combine_restarts != "best":
            exported.append(model)
        del module, trainer
        if params.finetune.restarts > 1:
            log(
                f"  {name:<10} restart {k} (seed {seed}): test acc {accs[-1]:.4f}  val acc {tries[-1].val_acc:.4f}"
            )
    kept = pick_best(tries)
    best = tries[kept]
    result = {
        "acc": accs[kept],
        "val_acc": best.val.get("val_acc", float("nan")),
        "val_loss": best.val.get("val_loss", float("nan")),
        "best_epoch": best.best_epoch,
        "epochs": best.epochs,
        "trainable_params": int(n_trainable),
        "seconds": time.perf_counter() - started,
    }
    if len(tries) > 1:
        result |= {
            "kept_restart": kept,
            "restart_acc": [round(a, 4) for a in accs],
            "restart_val_acc": [round(t.val_acc, 4) for t in tries],
        }
    if exported:  # the soup replaces the best run; the best run is reported beside it
        soup = soup_of(
            exported,
            kind=params.finetune.combine_restarts,
            val=splits["val"],
            num_labels=fit.num_labels,
            batch_size=hparams.batch_size,
        )
        result |= {
            "acc_best_restart": result["acc"],
            "val_acc_best_restart": result["val_acc"],
            "acc": _test_accuracy(soup.model, f"{name}-soup", params, paths, test),
            "val_acc": soup.val["val_acc"],
            "val_loss": soup.val["val_loss"],
            "soup_members": soup.members,
        }
        log(
            f"  {name:<10} {soup.kind} of restarts {soup.members}: test acc {result['acc']:.4f}  val acc "
            f"{result['val_acc']:.4f} (the best restart: {result['acc_best_restart']:.4f} / "
            f"{result['val_acc_best_restart']:.4f})"
        )
    log(
        f"  {name:<10} test acc {result['acc']:.4f}  val acc {result['val_acc']:.4f}  "
        f"({n_trainable:,} trainable, {_which(result, best.best_epoch, kept, len(tries))}, {result['seconds']:.0f}s)"
    )
    return result


def _which(result: dict[str, Any], best_epoch: int, kept: int, n: int) -> str:
    """What a variant's figures are: the soup of some of its n runs, or the best epoch of one run."""
    if "soup_members" in result:
        return f"soup of {len(result['soup_members'])} of {n} runs"
    return f"best epoch {best_epoch}" + (f", restart {kept} of {n}" if n > 1 else "")


def _test_accuracy(classifier: Any, name: str, params: Any, paths: Any, test: tuple[list[str], Any]) -> float:
    """Save the classifier as the finetune stage does, reload it and score TEST."""
    from bigmodel_ops.classification.export import load_classifier, save_classifier
    from bigmodel_ops.classification.inputs import effective_max_length
    from bigmodel_ops.contract import TOKENIZER_FILE
    from bigmodel_ops.model import read_exported_config

    config, _ = read_exported_config(paths.pretrained_model)
    out_dir = paths.outputs / "benchmark" / name
    save_classifier(
        classifier,
        out_dir,
        labels=params.prepare.labels,
        max_length=effective_max_length(params.finetune.max_length, config),
        tokenizer_file=paths.pretrained_model / TOKENIZER_FILE,
        truncation=params.finetune.truncation,
        head_tokens=params.finetune.head_tokens,
    )
    texts, label_ids = test
    predicted, _ = load_classifier(out_dir).predict(texts, batch_size=params.evaluate.batch_size)
    labels = params.prepare.labels
    correct = sum(labels[int(y)] == p for y, p in zip(label_ids, predicted, strict=True))
    return correct / len(texts)


def tfidf(params: Any, paths: Any) -> dict[str, Any]:
    """TF-IDF + logistic regression (the evaluate stage's baseline) on the same train / test split."""
    from bigmodel_ops.classification.inputs import read_labeled_split
    from bigmodel_ops.evaluation.baseline import baseline_proba

    started = time.perf_counter()
    labels = params.prepare.labels
    train_texts, train_ids = read_labeled_split(paths.prepared / "train.parquet", labels)
    test_texts, test_ids = read_labeled_split(paths.prepared / "test.parquet", labels)
    probs = baseline_proba(
        train_texts,
        train_ids,
        test_texts,
        n_labels=len(labels),
        settings=params.evaluate.baseline,
        seed=params.project.seed,
    )
    acc = float((probs.argmax(axis=1) == test_ids).mean())
    return {"acc": acc, "seconds": time.perf_counter() - started}


def mean_hidden_states(model: Any, ids: list[list[int]], *, batch_size: int = 64) -> Any:
    """(N, C) array: ``model``'s final hidden states averaged over each row's real tokens, through the
    classifier's own ``mean`` pooling (:meth:`SequenceClassifier.pool`), so a row's features do not
    depend on the rows batched with it."""
    import numpy as np
    import torch

    from bigmodel_ops.classification.inputs import collate
    from bigmodel_ops.classification.model import SequenceClassifier

    pooler = SequenceClassifier(model, num_labels=2, pooling="mean").eval()
    rows = [(row, 0) for row in ids]
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            out.append(pooler.pool(batch["idx"], batch["lengths"]).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_embd), dtype=np.float32)


def probe(params: Any, paths: Any, splits: Any) -> dict[str, Any]:
    """(e): logistic regression on the frozen mean hidden state, pretrained and random-init backbones."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bigmodel_ops.model import TransformerLM, load_pretrained, read_exported_config

    # scikit-learn >= 1.8 warns that the defaults of these will change; pinned to what the probe has
    # always used (an L2 penalty, C chosen by accuracy). Older versions take none of them.
    accepted = inspect.signature(LogisticRegressionCV).parameters
    pinned = {"l1_ratios": (0.0,), "scoring": "accuracy", "use_legacy_attributes": False}
    options = pinned if "use_legacy_attributes" in accepted else {}
    started = time.perf_counter()
    config, _ = read_exported_config(paths.pretrained_model)
    torch.manual_seed(params.project.seed)
    backbones = {"pretrained": load_pretrained(paths.pretrained_model), "random": TransformerLM(config)}
    result: dict[str, Any] = {}
    for name, model in backbones.items():
        train, test = (mean_hidden_states(model, splits[s].ids) for s in ("train", "test"))
        classifier = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(Cs=8, cv=5, max_iter=5000, random_state=params.project.seed, **options),
        )
        classifier.fit(train, splits["train"].labels)
        result[name] = float(classifier.score(test, splits["test"].labels))
    result["seconds"] = time.perf_counter() - started
    return result


def run(args: argparse.Namespace, *, seed: int | None, keep: Path | None) -> dict[str, Any]:
    """The whole comparison on one seed's split (``seed`` None: the params' ``project.seed``)."""
    from bigmodel_ops.classification.inputs import read_labeled_split
    from bigmodel_ops.contract import WEIGHTS_FILE
    from bigmodel_ops.fsutil import sha256_file
    from bigmodel_ops.paths import ProjectPaths
    from bigmodel_ops.pipeline import prepare, pretrain, tokenize
    from bigmodel_ops.pipeline._finetuning import stage_splits

    t_start = time.perf_counter()
    data = Path(args.data).resolve()
    if not data.is_file():
        raise SystemExit(f"--data {args.data}: not a file")
    unlabeled = Path(args.unlabeled).resolve() if args.unlabeled else None
    if unlabeled is not None and not unlabeled.is_file():
        raise SystemExit(f"--unlabeled {args.unlabeled}: not a file")
    with project_dir(keep, prefix="pretraining-value-") as root:
        corpus = "short" if args.short else "full"
        if args.short:
            short = root / "short.csv"
            rows = write_short_csv(data, short, text_column=args.text_column)
            log(f"short corpus: first sentence of each of {rows} rows -> {short}")
            data = short
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        common = dict(data=data, text_column=args.text_column, label_column=args.label_column)
        common.update(
            objective=args.objective, seed=seed, tracking_uri=uri, quick=args.quick, unlabeled=unlabeled
        )
        params = build_params(**common, overrides=args.set)
        variants, variant_settings = (
            {},
            {},
        )  # name -> the same params with its finetune settings (checked now)
        for text in args.variant or ():
            name, settings = parse_variant(text)
            if name in variants:
                raise SystemExit(f"--variant {text}: the name {name!r} is used twice")
            variants[name] = build_params(**common, overrides=[*(args.set or []), *settings])
            variant_settings[name] = settings
        paths = ProjectPaths(root)
        sizing = params.sizing
        log(
            f"pretraining-value: {data.name} ({corpus}), objective {args.objective}, seed {params.project.seed}, "
            f"preset {sizing.model_preset}, batch {sizing.batch_size}, {sizing.max_steps} steps, "
            f"lr {params.pretrain.lr:g}; fine-tune {params.finetune.max_epochs} epoch(s) at lr "
            f"{params.finetune.lr:g}, {params.finetune.pooling} pooling; torch threads "
            f"{__import__('torch').get_num_threads()}{' [QUICK]' if args.quick else ''}"
        )

        t = time.perf_counter()
        report = prepare.run(params, paths=paths, quiet=True)
        rows = report["rows"]
        seconds_prepare = time.perf_counter() - t
        log(
            f"prepare: {rows['train']} train / {rows['val']} val / {rows['test']} test / "
            f"{rows['pretrain']} pretrain rows ({seconds_prepare:.0f}s)"
        )

        t = time.perf_counter()
        tok_report = tokenize.run(params, paths=paths, quiet=True)
        seconds_tokenize = time.perf_counter() - t
        log(f"tokenize: vocab {tok_report.get('vocab_size')} ({seconds_tokenize:.0f}s)")

        t = time.perf_counter()
        pre = pretrain.run(params, paths=paths, quiet=True)
        seconds_pretrain = time.perf_counter() - t
        val_loss, entropy = float(pre["val_loss"]), float(pre["unigram_entropy"])
        gap = pre.get("val_gap_to_unigram")
        gap = float(gap) if gap is not None else entropy - val_loss
        backbone_sha = sha256_file(paths.pretrained_model / WEIGHTS_FILE)[:16]
        log(
            f"pretrain: {pre['global_step']} steps, {pre['tokens']:,} tokens, val loss {val_loss:.4f} against a "
            f"unigram entropy of {entropy:.4f} nats (gap {gap:+.3f}), {pre['n_params']:,} params "
            f"({seconds_pretrain:.0f}s)"
        )

        splits = stage_splits(params, paths, splits=("train", "val", "test"))
        test = read_labeled_split(paths.prepared / "test.parquet", params.prepare.labels)
        log("fine-tune (same recipe and budget):")
        results = {
            "pretrained": finetune_variant("pretrained", params, paths, splits, test),
            "scratch": finetune_variant("scratch", params, paths, splits, test, from_scratch=True),
        }
        if not args.skip_lora:
            results["lora"] = finetune_variant("lora", params, paths, splits, test, method="lora")
        for name, variant_params in variants.items():
            results[name] = finetune_variant(name, variant_params, paths, splits, test)
        results["tfidf"] = tfidf(params, paths)
        log(f"  {'tfidf':<10} test acc {results['tfidf']['acc']:.4f}  ({results['tfidf']['seconds']:.1f}s)")
        probes = probe(params, paths, splits)
        log(
            f"  {'probe':<10} test acc {probes['pretrained']:.4f} pretrained, {probes['random']:.4f} random "
            f"init ({probes['seconds']:.1f}s)"
        )

    n_test = len(test[0])
    accs = [r["acc"] for r in results.values()]
    p = min(max(sum(accs) / len(accs), 0.5), 0.99)
    summary: dict[str, Any] = {
        **{f"acc_{k}": round(r["acc"], 4) for k, r in results.items()},
        **{f"val_acc_{k}": round(r["val_acc"], 4) for k, r in results.items() if "val_acc" in r},
        **{
            f"trainable_params_{k}": r["trainable_params"]
            for k, r in results.items()
            if "trainable_params" in r
        },
        **{f"best_epoch_{k}": r["best_epoch"] for k, r in results.items() if "best_epoch" in r},
        "restarts": int(params.finetune.restarts),
        **{f"{key}_{k}": r[key] for k, r in results.items() for key in _RESTART_KEYS if key in r},
        **{f"{key}_{k}": round(r[key], 4) for k, r in results.items() for key in _SOUP_KEYS if key in r},
        "acc_probe_pretrained": round(probes["pretrained"], 4),
        "acc_probe_random": round(probes["random"], 4),
        "pretrained_minus_scratch_points": round(
            100 * (results["pretrained"]["acc"] - results["scratch"]["acc"]), 2
        ),
        **{
            f"{name}_minus_pretrained_points": round(
                100 * (results[name]["acc"] - results["pretrained"]["acc"]), 2
            )
            for name in variants
        },
        "variants": variant_settings,
        "pretrain_val_loss": round(val_loss, 4),
        "unigram_entropy": round(entropy, 4),
        "gap_to_unigram": round(gap, 4),
        "pretrain_steps": int(pre["global_step"]),
        "pretrain_tokens": int(pre["tokens"]),
        "pretrain_params": int(pre["n_params"]),
        "tokenizer_sha256": str(tok_report["tokenizer_sha256"])[:16],
        "backbone_sha256": backbone_sha,
        "seconds": round(time.perf_counter() - t_start, 1),
        "seconds_prepare": round(seconds_prepare, 1),
        "seconds_tokenize": round(seconds_tokenize, 1),
        "seconds_pretrain": round(seconds_pretrain, 1),
        **{f"seconds_finetune_{k}": round(r["seconds"], 1) for k, r in results.items() if k != "tfidf"},
        "seconds_tfidf": round(results["tfidf"]["seconds"], 1),
        "seconds_probe": round(probes["seconds"], 1),
        "objective": args.objective,
        "corpus": corpus,
        "unlabeled": unlabeled.name if unlabeled else None,
        "n_pretrain_texts": int(rows["pretrain"]),
        "n_train": int(rows["train"]),
        "n_val": int(rows["val"]),
        "n_test": int(n_test),
        "test_se_points": round(100 * math.sqrt(p * (1 - p) / max(n_test, 1)), 2),
        "seed": int(params.project.seed),
        "preset": sizing.model_preset,
        "quick": bool(args.quick),
        "set": list(args.set or []),
    }
    print_table(summary)
    return summary


def print_table(s: dict[str, Any]) -> None:
    log("")
    log(
        f"pretraining value: {s['objective']} objective, {s['corpus']} corpus, {s['n_train']} train / "
        f"{s['n_test']} test (SE of an accuracy: +-{s['test_se_points']:.1f} points)"
    )
    log(f"{'variant':<26}{'test acc':>10}{'val acc':>10}{'trainable':>12}{'seconds':>10}")
    names = {
        "pretrained": "(a) pretrained, full FT",
        "scratch": "(b) from scratch",
        "tfidf": "(c) TF-IDF + logreg",
        "lora": "(d) pretrained, LoRA",
    }
    for key, label in names.items():
        if f"acc_{key}" not in s:  # --skip-lora
            continue
        val = s.get(f"val_acc_{key}")
        trainable = s.get(f"trainable_params_{key}")
        seconds = s["seconds_tfidf"] if key == "tfidf" else s[f"seconds_finetune_{key}"]
        log(
            f"{label:<26}{100 * s[f'acc_{key}']:>9.1f}%"
            f"{(f'{100 * val:.1f}%' if val is not None else '-'):>10}"
            f"{(f'{trainable:,}' if trainable is not None else '-'):>12}{seconds:>10.1f}"
        )
    log(
        f"{'(e) probe, frozen':<26}{100 * s['acc_probe_pretrained']:>9.1f}% pretrained backbone, "
        f"{100 * s['acc_probe_random']:.1f}% random init ({s['seconds_probe']:.1f}s)"
    )
    log(
        f"pretrain: val loss {s['pretrain_val_loss']:.4f} nats, unigram entropy {s['unigram_entropy']:.4f}, "
        f"gap {s['gap_to_unigram']:+.4f}; {s['pretrain_steps']} steps, {s['pretrain_tokens']:,} tokens, "
        f"{s['seconds_pretrain']:.0f}s"
    )
    lora = (
        f"; lora - pretrained: {100 * (s['acc_lora'] - s['acc_pretrained']):+.1f}" if "acc_lora" in s else ""
    )
    log(
        f"pretrained - scratch: {s['pretrained_minus_scratch_points']:+.1f} points; "
        f"pretrained - tfidf: {100 * (s['acc_pretrained'] - s['acc_tfidf']):+.1f}{lora}"
    )
    for key in s.get("variants", {}):
        log(
            f"{'variant ' + key:<26}{100 * s[f'acc_{key}']:>9.1f}%{100 * s[f'val_acc_{key}']:>9.1f}%"
            f"{s[f'trainable_params_{key}']:>12,}{s[f'seconds_finetune_{key}']:>10.1f}"
            f"   {s[f'{key}_minus_pretrained_points']:+.1f} points on test against (a)"
        )
    finetunes = " / ".join(
        f"{s[f'seconds_finetune_{k}']:.0f}"
        for k in [*names, *s.get("variants", {})]
        if f"seconds_finetune_{k}" in s
    )
    log(
        f"wall: total {s['seconds']:.0f}s (prepare {s['seconds_prepare']:.0f}, tokenize {s['seconds_tokenize']:.0f}, "
        f"pretrain {s['seconds_pretrain']:.0f}, fine-tune {finetunes}, tfidf {s['seconds_tfidf']:.0f}, "
        f"probe {s['seconds_probe']:.0f})"
    )


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for several seeds: every number the runs share, averaged (``seconds``: the
    total), with the per-seed summaries under ``per_seed``. The paired difference (a) - (b) of each
    seed gives ``pretrained_minus_scratch_points`` (its mean) and ``..._se`` (the standard error of
    that mean over seeds: 0 for one seed, since one split says nothing about the spread); the same
    for val accuracy."""
    n = len(runs)
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key in PER_SEED_ONLY or key.startswith(_RESTART_KEYS):
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            if all(isinstance(run.get(key), int | float) for run in runs):
                summary[key] = round(sum(run[key] for run in runs) / n, 4)
        else:
            summary[key] = value
    summary["seconds"] = round(sum(run["seconds"] for run in runs), 1)
    pairs = [("pretrained_minus_scratch", "pretrained", "scratch")]
    pairs += [(f"{name}_minus_pretrained", name, "pretrained") for name in runs[0].get("variants", {})]
    for key, a, b in pairs:
        for prefix in ("", "val_"):
            diffs = [100 * (run[f"{prefix}acc_{a}"] - run[f"{prefix}acc_{b}"]) for run in runs]
            se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
            summary[f"{prefix}{key}_points"] = round(statistics.fmean(diffs), 2)
            summary[f"{prefix}{key}_se"] = round(se, 2)
    summary.update(seeds=[run["seed"] for run in runs], n_seeds=n, per_seed=runs)
    return summary


def print_seeds_table(s: dict[str, Any]) -> None:
    log("")
    log(f"pretraining value over {s['n_seeds']} seeds (test / val accuracy; (a) - (b) in points)")
    log(
        f"{'seed':<8}{'(a) pretrained':>17}{'(b) scratch':>17}{'(a) - (b)':>15}{'(c) tfidf':>11}{'gap':>8}"
        f"{'(e) probe a / random':>22}"
    )
    rows = [*s["per_seed"], {**s, "seed": "mean"}]
    for r in rows:
        diff_val = 100 * (r["val_acc_pretrained"] - r["val_acc_scratch"])
        log(
            f"{r['seed']!s:<8}{100 * r['acc_pretrained']:>9.1f} / {100 * r['val_acc_pretrained']:.1f}"
            f"{100 * r['acc_scratch']:>9.1f} / {100 * r['val_acc_scratch']:.1f}"
            f"{100 * (r['acc_pretrained'] - r['acc_scratch']):>+8.1f} / {diff_val:+.1f}"
            f"{100 * r['acc_tfidf']:>10.1f}%{r['gap_to_unigram']:>+8.2f}"
            f"{100 * r['acc_probe_pretrained']:>13.1f} / {100 * r['acc_probe_random']:.1f}"
        )
    log(
        f"(a) - (b): {s['pretrained_minus_scratch_points']:+.2f} +- {s['pretrained_minus_scratch_se']:.2f} "
        f"points on test, {s['val_pretrained_minus_scratch_points']:+.2f} +- "
        f"{s['val_pretrained_minus_scratch_se']:.2f} on val (mean +- its standard error over seeds); "
        f"wall {s['seconds']:.0f}s in all"
    )
    for key in s.get("variants", {}):
        per_seed = ", ".join(f"{r[f'{key}_minus_pretrained_points']:+.1f}" for r in s["per_seed"])
        log(
            f"variant {key}: {100 * s[f'acc_{key}']:.1f}% / {100 * s[f'val_acc_{key}']:.1f}%; minus (a): "
            f"{s[f'{key}_minus_pretrained_points']:+.2f} +- {s[f'{key}_minus_pretrained_se']:.2f} points on test "
            f"({per_seed}), {s[f'val_{key}_minus_pretrained_points']:+.2f} +- "
            f"{s[f'val_{key}_minus_pretrained_se']:.2f} on val"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="labelled CSV")
    parser.add_argument("--objective", choices=["masked", "causal"], default="masked")
    parser.add_argument("--short", action="store_true", help="first sentence of each text only")
    parser.add_argument("--quick", action="store_true", help="a few pretraining steps, one fine-tuning epoch")
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        help="the split and every init (default: project.seed of params.yaml); repeat it to run the whole "
        "comparison once per seed and report the means and the spread of (a) - (b)",
    )
    parser.add_argument(
        "--skip-lora", action="store_true", help="leave out (d): one fine-tuning less per seed"
    )
    parser.add_argument(
        "--unlabeled",
        metavar="PATH",
        help="extra unlabeled text for pretraining, one document per line (prepare.source.unlabeled_path; "
        "lines that are also texts of --data are dropped, so no test text enters pretraining; used as "
        "given, also with --short)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="one more fine-tuning of (a) from the same backbone with these finetune settings, e.g. "
        "maxpool:pooling=mean_max; reported as acc_NAME and NAME_minus_pretrained_points; repeatable",
    )
    parser.add_argument("--text-column", default="review")
    parser.add_argument("--label-column", default="sentiment")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="use (and keep) this project folder (several seeds: seed-S in it)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="a params.yaml setting for every variant, e.g. profiles.max_steps=2000 (the active "
        "profile) or finetune.lr=0.001; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = args.seed or [None]
    if len(set(seeds)) < len(seeds):  # before anything is set up or changed
        raise SystemExit(f"--seed: {seeds} names a seed twice")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: quiet them after)

    for name in ("lightning.pytorch", "lightning.fabric"):  # their info lines, once per fit
        logging.getLogger(name).setLevel(logging.WARNING)
    if len(seeds) == 1:
        summary = run(args, seed=seeds[0], keep=args.keep)
    else:
        runs = [
            run(args, seed=seed, keep=args.keep / f"seed-{seed}" if args.keep else None) for seed in seeds
        ]
        summary = aggregate(runs)
        print_seeds_table(summary)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
