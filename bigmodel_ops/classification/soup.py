"""Model soups: the weights of several fine-tuning runs of one backbone, averaged into one model.

Wortsman et al. (2022), "Model soups": fine-tuning runs that start from the same pretrained
weights and differ only in their seed tend to end in one basin of the loss, so the average of
their weights is itself a good model, often better than the best of them, at the inference cost
of one. The *greedy* soup (:func:`greedy_soup`) tries the runs in order of val accuracy, best
first, and keeps a run in the average only when the average's val accuracy does not drop; it
starts as the best run, so on val it never reads below it. Runs that ended in other basins (their
average predicts worse) are left out, and with one run the soup is that run.

``finetune.restarts: N`` with ``finetune.combine_restarts: soup`` (the mean of all N runs, the
*uniform* soup, :func:`uniform_soup`) or ``greedy_soup`` makes the finetune stage export a soup
of its N runs instead of the best one. The greedy soup's val accuracy is optimistic, as the best
run's is (val chose it); the uniform soup reads val only to report it. Test accuracy is the one
to quote.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from bigmodel_ops.classification.inputs import TokenizedSplit, collate
from bigmodel_ops.classification.metrics import val_metrics


def average_weights(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``models[0]`` whose floating-point parameters and buffers are the mean of the
    models' (integer buffers are the first model's). The models must share one architecture: a
    ValueError names a state key that differs; an empty sequence is a ValueError too."""
    if not models:
        raise ValueError("average_weights: no models")
    states = [model.state_dict() for model in models]
    for i, state in enumerate(states[1:], start=1):
        for key in [*states[0], *(k for k in state if k not in states[0])]:
            if key not in state or key not in states[0] or state[key].shape != states[0][key].shape:
                raise ValueError(f"average_weights: model {i} differs from model 0 at {key!r}")
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            total = torch.stack([state[key].to(torch.float64) for state in states]).mean(0)
            averaged[key] = total.to(value.dtype)
        else:
            averaged[key] = value
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(averaged)
    return soup


@torch.no_grad()
def evaluate(
    model: nn.Module, split: TokenizedSplit, *, num_labels: int, batch_size: int = 64, device: str = "cpu"
) -> dict[str, float]:
    """``val_loss`` (plain cross-entropy), ``val_acc`` and ``val_f1`` (macro) of a classifier on a
    tokenised split, in eval mode, longest texts first (little padding; the metrics do not depend
    on the order). The model is put back in the mode and on the device it was in."""
    was_training, was_on = model.training, next(model.parameters()).device
    model.eval().to(device)
    rows = sorted(range(len(split)), key=lambda r: -len(split.ids[r]))
    logits, labels = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate([(split.ids[r], int(split.labels[r])) for r in rows[start : start + batch_size]])
            logits.append(model(batch["idx"].to(device), batch["lengths"].to(device)).float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training).to(was_on)
    if not logits:
        raise ValueError("evaluate: the split is empty")
    return val_metrics(torch.cat(logits), torch.cat(labels), num_labels)


@dataclass(frozen=True)
class Soup:
    """A greedy soup: the averaged model, the runs in it (positions in the input, best first) and
    its val metrics."""

    model: nn.Module
    members: list[int]
    val: dict[str, float]
    kind: str  # "soup" (uniform) or "greedy_soup"


def uniform_soup(models: Sequence[nn.Module], *, score: Callable[[nn.Module], dict[str, float]]) -> Soup:
    """The mean of all ``models`` (Wortsman et al., 2022: the uniform soup), scored once by
    ``score``; no model is left out, so val is read only to report the soup. Raises ValueError on
    an empty sequence or models of different shapes (:func:`average_weights`)."""
    soup = average_weights(models)
    return Soup(model=soup, members=list(range(len(models))), val=dict(score(soup)), kind="soup")


def greedy_soup(models: Sequence[nn.Module], *, score: Callable[[nn.Module], dict[str, float]]) -> Soup:
    """The greedy soup of ``models`` by ``score(model)["val_acc"]`` (Wortsman et al., 2022).

    Each model is scored alone; then, best first (the earlier of equals first), a model joins the
    soup when the soup's val accuracy with it is at least the soup's without it. The result is the
    best model alone when no other one helps; its val metrics are then that model's. Raises
    ValueError on an empty sequence. Scoring takes one pass over val per model and per candidate
    soup: 2N - 1 passes for N models.
    """
    if not models:
        raise ValueError("greedy_soup: no models")
    alone = [score(model) for model in models]
    order = sorted(range(len(models)), key=lambda i: (-alone[i]["val_acc"], i))
    members, soup, val = [order[0]], models[order[0]], alone[order[0]]
    for i in order[1:]:
        candidate = average_weights([models[j] for j in [*members, i]])
        metrics = score(candidate)
        if metrics["val_acc"] >= val["val_acc"]:
            members, soup, val = [*members, i], candidate, metrics
    return Soup(model=soup, members=members, val=dict(val), kind="greedy_soup")


def soup_of(
    models: Sequence[nn.Module],
    *,
    kind: str,
    val: TokenizedSplit,
    num_labels: int,
    batch_size: int = 64,
    accelerator: str = "cpu",
) -> Soup:
    """The ``kind`` soup (``soup``: :func:`uniform_soup`; ``greedy_soup``: :func:`greedy_soup`) of
    ``models``, scored on the tokenised ``val`` split (:func:`evaluate`; on the GPU when
    ``accelerator`` asks for one and there is one). ValueError naming an unknown ``kind``."""
    makers = {"soup": uniform_soup, "greedy_soup": greedy_soup}
    if kind not in makers:
        raise ValueError(f"unknown soup {kind!r} (valid: {', '.join(makers)})")
    device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"

    def score(model: nn.Module) -> dict[str, float]:
        return evaluate(model, val, num_labels=num_labels, batch_size=batch_size, device=device)

    return makers[kind](models, score=score)


__all__ = ["Soup", "average_weights", "evaluate", "greedy_soup", "soup_of", "uniform_soup"]
