"""Hugging Face ``transformers`` classes for bigmodel_ops models that no stock architecture matches.

``bigmodel-ops export-hf`` copies this file into an export folder as ``modeling_bigmodel.py`` and
names its classes in config.json's ``auto_map``, so ``AutoModel*.from_pretrained(folder,
trust_remote_code=True)`` loads them. It is self-contained (torch and transformers only, never
bigmodel_ops) and computes exactly what :mod:`bigmodel_ops.model` and
:mod:`bigmodel_ops.classification.model` compute, with the same parameter names:

- :class:`BigModelModel`: the pre-LayerNorm transformer (fused qkv Linear, GELU tanh, learned
  positions, optional ALiBi, final LayerNorm), bidirectional (``objective: masked``) or causal;
  returns the final hidden states;
- :class:`BigModelForMaskedLM` / :class:`BigModelForCausalLM`: plus the (tied) LM head;
- :class:`BigModelForSequenceClassification`: plus the classification head (Linear with bias)
  over the ``cls``, ``last``, ``mean`` or ``mean_max`` pooled state (``config.pooling``).

Inputs are right-padded ``input_ids`` with ``attention_mask`` (1 = real token). As in
bigmodel_ops, a masked model hides padding from attention, a causal model needs no mask (it never
looks right), and pooling uses the real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

_V5 = int(transformers.__version__.split(".")[0]) >= 5


class BigModelConfig(PretrainedConfig):
    model_type = "bigmodel"

    def __init__(
        self,
        vocab_size: int = 4032,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        dropout: float = 0.0,
        bias: bool = False,
        objective: str = "masked",
        alibi: bool = False,
        pooling: str = "cls",
        layer_norm_eps: float = 1e-5,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size  # the padded embedding size
        self.block_size = block_size
        self.max_position_embeddings = block_size
        self.n_layer = n_layer
        self.num_hidden_layers = n_layer
        self.n_head = n_head
        self.num_attention_heads = n_head
        self.n_embd = n_embd
        self.hidden_size = n_embd
        self.dropout = dropout
        self.bias = bias
        self.objective = objective
        self.is_decoder = objective == "causal"
        self.alibi = alibi
        self.pooling = pooling
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)


class _SelfAttention(nn.Module):
    def __init__(self, config: BigModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.is_causal = config.objective == "causal"
        self.alibi = config.alibi

    def _alibi_bias(
        self, T: int, key_padding_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        # Computed here, not kept as a buffer: from_pretrained builds modules on the meta device
        # and would leave a non-persistent buffer uninitialised.
        n = self.n_head
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / n) for h in range(n)], device=device)
        pos = torch.arange(T, device=device)
        bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()
        if self.is_causal:
            bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        bias = bias.unsqueeze(0)
        if key_padding_mask is not None:
            bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return bias.to(dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        attn_mask = None
        if self.alibi:
            attn_mask = self._alibi_bias(T, key_padding_mask, q.dtype, q.device)
        elif key_padding_mask is not None:
            attn_mask = key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.is_causal and attn_mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class _MLP(nn.Module):
    def __init__(self, config: BigModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class _Block(nn.Module):
    def __init__(self, config: BigModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = _SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class BigModelPreTrainedModel(PreTrainedModel):
    config_class = BigModelConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["_Block"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(torch.bool)


class BigModelModel(BigModelPreTrainedModel):
    """The backbone: final-layer hidden states (``last_hidden_state``)."""

    def __init__(self, config: BigModelConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        # A causal model never looks right, so right padding needs no mask (as in bigmodel_ops).
        mask = None
        if self.config.objective == "masked" and attention_mask is not None:
            mask = _padding_mask(input_ids, attention_mask)
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.blocks:
            x = block(x, mask)
        return BaseModelOutput(last_hidden_state=self.ln_f(x))


class _WithLMHead(BigModelPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config: BigModelConfig) -> None:
        super().__init__(config)
        self.transformer = BigModelModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if self.config.objective == "causal":
                logits_, labels_ = logits[:, :-1], labels[:, 1:]
            else:
                logits_, labels_ = logits, labels
            loss = F.cross_entropy(
                logits_.float().reshape(-1, logits.size(-1)), labels_.reshape(-1), ignore_index=-100
            )
        return MaskedLMOutput(loss=loss, logits=logits)


class BigModelForMaskedLM(_WithLMHead):
    """Masked (bidirectional) backbone with its LM head: logits (B, T, vocab)."""


class BigModelForCausalLM(_WithLMHead):
    """Causal backbone with its LM head (for models GPT-2 cannot hold, e.g. ALiBi): logits (B, T, vocab).
    No KV cache: ``generate`` recomputes the prefix."""


class BigModelForSequenceClassification(BigModelPreTrainedModel):
    """Backbone + Linear head over the pooled state (``config.pooling``: cls, last, mean, or
    mean_max: the mean and the elementwise max of the real tokens, concatenated, so 2 x n_embd)."""

    def __init__(self, config: BigModelConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = BigModelModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout if hasattr(config, "classifier_dropout") else 0.0)
        width = 2 * config.n_embd if config.pooling == "mean_max" else config.n_embd
        self.head = nn.Linear(width, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
        mask = _padding_mask(input_ids, attention_mask)
        if self.config.pooling == "cls":
            pooled = h[:, 0]
        elif self.config.pooling in ("mean", "mean_max"):
            weights = mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            if self.config.pooling == "mean_max":
                peak = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(1)
                pooled = torch.cat([pooled, peak], dim=-1)
        else:  # last real token (right padding)
            last = (mask.sum(-1) - 1).clamp(min=0)
            pooled = h[torch.arange(h.size(0), device=h.device), last]
        logits = self.head(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


__all__ = [
    "BigModelConfig",
    "BigModelModel",
    "BigModelForMaskedLM",
    "BigModelForCausalLM",
    "BigModelForSequenceClassification",
]
