"""The sequence classifier: a pretrained backbone plus a classification head.

:class:`SequenceClassifier` wraps the pretrained :class:`~bigmodel_ops.model.TransformerLM` and adds
a dropout + Linear head over one pooled vector per text (:func:`pooling_for`): the ``[CLS]`` state
(position 0) for a masked (bidirectional) backbone, the last real token for a causal one (the only
position that has seen the whole text).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bigmodel_ops.model import TransformerLM


def pooling_for(objective: str) -> str:
    """'cls' for a masked (bidirectional) backbone, 'last' for a causal one."""
    return "cls" if objective == "masked" else "last"


class SequenceClassifier(nn.Module):
    """A pretrained backbone plus a classification head over one pooled vector per sequence.

    Inputs are right-padded: ``idx`` (B, T) token ids and ``lengths`` (B,) real-token counts.
    For a masked backbone the padding is hidden from attention with a key padding mask, so a
    text's logits do not depend on how much padding its batch has. A causal backbone gets no
    mask: its attention already never looks right, so right padding cannot reach the last real
    token (and a mask would switch off the causal flag in SelfAttention).
    """

    def __init__(self, backbone: TransformerLM, *, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.pooling = pooling_for(backbone.config.objective)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        if self.backbone.lm_head.weight is not self.backbone.wte.weight:
            # An untied LM head takes no part in classification: keep it out of the optimizer
            # (and out of DDP's unused-parameter check).
            self.backbone.lm_head.weight.requires_grad_(False)

    def pool(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The pooled representation (B, C)."""
        if self.pooling == "cls":
            T = idx.size(1)
            mask = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            h = self.backbone.hidden(idx, key_padding_mask=mask)  # (B, T, C)
            return h[:, 0]
        h = self.backbone.hidden(idx)  # (B, T, C)
        last = (lengths - 1).clamp(min=0)
        return h[torch.arange(idx.size(0), device=idx.device), last]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_labels)."""
        return self.head(self.dropout(self.pool(idx, lengths)))
