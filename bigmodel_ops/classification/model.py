"""The sequence classifier: a pretrained backbone plus a classification head.

:class:`SequenceClassifier` wraps the pretrained :class:`~bigmodel_ops.model.TransformerLM` and adds
a dropout + Linear head over one pooled vector per text. Pooling (:data:`POOLINGS`):

- ``cls``: the ``[CLS]`` state (position 0); masked (bidirectional) backbones only;
- ``last``: the last real token, the only position of a causal backbone that has seen the whole
  text; causal backbones only;
- ``mean``: the mean of the real tokens' states (padding excluded); either objective;
- ``mean_max``: the mean and the elementwise max of the real tokens' states, concatenated (2C: the
  head also sees the strongest evidence anywhere in the text, as ULMFiT's concat pooling does);
  either objective;
- ``auto`` (:func:`pooling_for`): ``cls`` for a masked backbone, ``last`` for a causal one.

The served model imports this module: no Lightning, pydantic or peft here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bigmodel_ops.model import TransformerLM

# The poolings that fit each backbone objective.
POOLINGS: dict[str, tuple[str, ...]] = {
    "masked": ("cls", "mean", "mean_max"),
    "causal": ("last", "mean", "mean_max"),
}


def pooled_size(n_embd: int, pooling: str) -> int:
    """The width of the pooled vector the head reads (C, or 2C for ``mean_max``)."""
    return 2 * n_embd if pooling == "mean_max" else n_embd


def pooling_for(objective: str) -> str:
    """'cls' for a masked (bidirectional) backbone, 'last' for a causal one (what ``auto`` means)."""
    return "cls" if objective == "masked" else "last"


def resolve_pooling(pooling: str, objective: str) -> str:
    """The concrete pooling for a backbone objective; ValueError when it does not fit it."""
    if pooling == "auto":
        return pooling_for(objective)
    valid = POOLINGS.get(objective, ())
    if pooling not in valid:
        raise ValueError(
            f"pooling {pooling!r} does not fit a {objective} backbone (valid: auto, {', '.join(valid)})"
        )
    return pooling


class SequenceClassifier(nn.Module):
    """A pretrained backbone plus a classification head over one pooled vector per sequence.

    Inputs are right-padded: ``idx`` (B, T) token ids and ``lengths`` (B,) real-token counts.
    For a masked backbone the padding is hidden from attention with a key padding mask, so a
    text's logits do not depend on how much padding its batch has. A causal backbone gets no
    mask: its attention already never looks right, so right padding cannot reach a real token
    (and a mask would switch off the causal flag in SelfAttention); ``mean`` pooling averages only
    the real positions.
    """

    def __init__(
        self, backbone: TransformerLM, *, num_labels: int, dropout: float = 0.1, pooling: str = "auto"
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.pooling = resolve_pooling(pooling, backbone.config.objective)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(pooled_size(backbone.config.n_embd, self.pooling), num_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        if self.backbone.lm_head.weight is not self.backbone.wte.weight:
            # An untied LM head takes no part in classification: keep it out of the optimizer
            # (and out of DDP's unused-parameter check).
            self.backbone.lm_head.weight.requires_grad_(False)

    def pool(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The pooled representation (B, C), or (B, 2C) with ``mean_max``."""
        T = idx.size(1)
        mask = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T) True = real
        masked = self.backbone.config.objective == "masked"
        h = self.backbone.hidden(idx, key_padding_mask=mask if masked else None)  # (B, T, C)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling in ("mean", "mean_max"):
            weights = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
            mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, C)
            if self.pooling == "mean":
                return mean
            peak = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(1)  # (B, C)
            return torch.cat([mean, peak], dim=-1)  # (B, 2C)
        last = (lengths - 1).clamp(min=0)
        return h[torch.arange(idx.size(0), device=idx.device), last]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_labels)."""
        return self.head(self.dropout(self.pool(idx, lengths)))
