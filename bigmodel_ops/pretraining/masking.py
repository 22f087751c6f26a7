"""BERT masking of pretraining rows: which positions are predicted and what the model sees there.

One job: the 80/10/10 masking of the masked objective, with a fixed number of predicted positions
per row (:func:`masked_count`), driven either by a NumPy generator (:func:`mask_tokens`) or by
per-row uniforms (:func:`mask_tokens_from_uniforms`, :func:`mask_uniforms`), so that a row is
masked alike whichever batch, rank or worker builds it (the batches of
:mod:`bigmodel_ops.pretraining.data` use the latter). Whole-word masking: given which tokens
continue the word before them (:func:`word_continuation_ids`), a word's pieces share one score,
so they are picked together.

NumPy arrays in and out; nothing here imports Lightning, pydantic or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bigmodel_ops.model import IGNORE_INDEX


def masked_count(block_size: int, mask_rate: float) -> int:
    """Positions predicted per row: round(rate * T), at least 1 (as in the original BERT)."""
    return max(1, min(block_size, round(mask_rate * block_size)))


def mask_tokens(
    tokens: np.ndarray,
    *,
    rng: np.random.Generator,
    mask_rate: float,
    mask_id: int,
    protected_ids: np.ndarray,
    random_ids: np.ndarray,
    continuation_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT 80/10/10 masking with a fixed number of predicted positions per row.

    Picks M = round(mask_rate * T) positions per row uniformly among the non-protected
    tokens (protected = special tokens such as the document separator, which are never
    predicted nor altered). Of those, 80% become `mask_id`, 10% a uniformly random id from
    `random_ids` and 10% stay unchanged. Returns (inputs (B, T), positions (B, M), labels
    (B, M)); labels are the original ids, or IGNORE_INDEX for slots that a row with fewer
    than M unprotected tokens could not fill.

    With ``continuation_ids`` (the ids of tokens that continue a word, e.g. WordPiece's
    ``##`` pieces), whole words are picked: every piece of a word takes the score of its first
    piece. M stays fixed, so the word that the M-th slot falls in may be picked in part; a
    row that starts inside a word treats its first piece as a word start.
    """
    B, T = tokens.shape
    M = masked_count(T, mask_rate)
    return _apply_masks(
        tokens,
        scores=rng.random((B, T)),
        action=lambda: rng.random((B, M)),
        replacements=lambda slots: random_ids[rng.integers(0, len(random_ids), size=int(slots.sum()))],
        mask_rate=mask_rate,
        mask_id=mask_id,
        protected_ids=protected_ids,
        continuation_ids=continuation_ids,
    )


def mask_tokens_from_uniforms(
    tokens: np.ndarray,
    uniforms: np.ndarray,
    *,
    mask_rate: float,
    mask_id: int,
    protected_ids: np.ndarray,
    random_ids: np.ndarray,
    continuation_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`mask_tokens` driven by per-row uniforms in [0, 1), ``(B, T + 2M)`` (see
    :func:`mask_uniforms`): row b's masks depend on row b's tokens and uniforms only, so a row
    is masked alike whichever batch (or rank) holds it."""
    B, T = tokens.shape
    M = masked_count(T, mask_rate)
    if uniforms.shape != (B, mask_uniforms(T, mask_rate)):
        raise ValueError(f"uniforms {uniforms.shape}, expected {(B, mask_uniforms(T, mask_rate))}")
    pick = uniforms[:, T + M :]
    return _apply_masks(
        tokens,
        scores=uniforms[:, :T].copy(),
        action=lambda: uniforms[:, T : T + M],
        replacements=lambda slots: random_ids[
            np.minimum((pick[slots] * len(random_ids)).astype(np.int64), len(random_ids) - 1)
        ],
        mask_rate=mask_rate,
        mask_id=mask_id,
        protected_ids=protected_ids,
        continuation_ids=continuation_ids,
    )


def mask_uniforms(block_size: int, mask_rate: float) -> int:
    """Uniforms one row's masks use: a score per position, then an action and a replacement draw
    per predicted slot."""
    return block_size + 2 * masked_count(block_size, mask_rate)


def _apply_masks(
    tokens: np.ndarray,
    *,
    scores: np.ndarray,
    action: Callable[[], np.ndarray],
    replacements: Callable[[np.ndarray], np.ndarray],
    mask_rate: float,
    mask_id: int,
    protected_ids: np.ndarray,
    continuation_ids: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masking of :func:`mask_tokens` from its random inputs: ``scores`` (B, T) in [0, 1)
    (modified in place), ``action()`` (B, M) in [0, 1), ``replacements(slots)`` the random ids of
    the slots that ``slots`` (a (B, M) bool array) marks, in row-major order."""
    B, T = tokens.shape
    M = masked_count(T, mask_rate)
    if continuation_ids is not None and len(continuation_ids):
        # Each position's word start: the last position at or before it that begins a word.
        starts = np.where(np.isin(tokens, continuation_ids), 0, np.arange(T))
        scores = np.take_along_axis(scores, np.maximum.accumulate(starts, axis=1), axis=1)
    protected = np.isin(tokens, protected_ids)
    scores[protected] = 2.0  # never among the M smallest unless the row runs out of tokens
    positions = np.argpartition(scores, M - 1, axis=1)[:, :M] if M < T else np.argsort(scores, axis=1)
    positions = np.sort(positions, axis=1)
    valid = np.take_along_axis(scores, positions, axis=1) < 1.0
    labels = np.where(valid, np.take_along_axis(tokens, positions, axis=1), IGNORE_INDEX)
    act = action()
    replacement = np.take_along_axis(tokens, positions, axis=1).copy()
    replacement[act < 0.8] = mask_id
    random_slot = (act >= 0.8) & (act < 0.9)
    replacement[random_slot] = replacements(random_slot)
    replacement = np.where(valid, replacement, np.take_along_axis(tokens, positions, axis=1))
    inputs = tokens.copy()
    np.put_along_axis(inputs, positions, replacement, axis=1)
    return inputs, positions.astype(np.int64), labels.astype(np.int64)


def word_continuation_ids(vocab: dict[str, int], *, model: str) -> np.ndarray:
    """Ids of the tokens that continue the word before them, for whole-word masking.

    ``model`` is the tokenizer model's type: ``WordPiece`` (pieces that start with ``##``) or
    ``BPE`` (byte-level: pieces that start with neither the space marker ``Ġ`` nor a character
    other than a letter or digit); any other type has none, which means token masking.
    """
    if model == "WordPiece":
        ids = [i for token, i in vocab.items() if token.startswith("##")]
    elif model == "BPE":
        ids = [i for token, i in vocab.items() if token[:1].isalnum() and not token.startswith("Ġ")]
    else:
        ids = []
    return np.asarray(sorted(ids), dtype=np.int64)
