"""The transformer language model: one module, two objectives.

A pre-norm transformer in the style of nanoGPT. The same blocks serve as a causal
decoder (next-token prediction, GPT-style) and as a bidirectional encoder (masked
LM, BERT-style); the only difference is the `is_causal` flag given to
`scaled_dot_product_attention`, so no T x T mask is ever built in Python and the
flash / memory-efficient kernels apply on GPU.

The fine-tuning classifier (bigmodel_ops.classification) reuses `TransformerLM.hidden`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel_ops.contract import CONFIG_FILE, WEIGHTS_FILE
from bigmodel_ops.errors import CheckpointError

IGNORE_INDEX = -100
EXPORT_FORMAT = "bigmodel_ops.model/1"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4000  # tokenizer vocabulary; the embedding is padded to a multiple of 64
    block_size: int = 128  # longest context the position embedding covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256  # must be divisible by n_head
    dropout: float = 0.0  # on attention, residual and embedding outputs; 0 for pretraining speed
    bias: bool = False  # biases in Linear and LayerNorm; False is slightly faster and no worse
    objective: Literal["causal", "masked"] = "causal"
    tie_embeddings: bool = True  # the LM head shares the token embedding matrix
    # ALiBi (Press et al. 2022): a per-head linear distance penalty on the attention scores.
    # A small masked LM needs it: with learned absolute positions alone it must first learn to
    # route its neighbours into the [MASK] position and sits at the unigram plateau meanwhile.
    # False in old exported configs, which therefore load unchanged.
    alibi: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.objective not in ("causal", "masked"):
            raise ValueError(f"objective must be 'causal' or 'masked', got {self.objective!r}")

    @property
    def padded_vocab_size(self) -> int:
        # Multiples of 64 keep the embedding and LM-head matmuls on fast tensor-core shapes.
        return math.ceil(self.vocab_size / 64) * 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)


# Named sizes. tiny: unit tests; mini: the CPU profile; small: a bigger CPU run; gpt2-124m / bert-base: GPU runs.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=2, n_head=4, n_embd=128, block_size=128),  # the CPU profile: learns in minutes
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=128),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768, block_size=512),
}


def config_from_preset(name: str, *, vocab_size: int, objective: str, **overrides) -> ModelConfig:
    """Build a ModelConfig from a named preset; overrides whose value is None are ignored."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    values = dict(PRESETS[name], vocab_size=vocab_size, objective=objective)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.is_causal = config.objective == "causal"
        self.alibi = config.alibi
        if config.alibi:
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / config.n_head) for h in range(config.n_head)])
            self.register_buffer("alibi_slopes", slopes, persistent=False)

    def _alibi_bias(self, T: int, key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive scores (1 or B, nh, T, T): -slope * |i - j|, -inf on future keys (causal) and padding."""
        pos = torch.arange(T, device=self.alibi_slopes.device)
        bias = -self.alibi_slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()
        if self.is_causal:
            bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        bias = bias.unsqueeze(0)
        if key_padding_mask is not None:
            bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return bias.to(dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        attn_mask = None
        if self.alibi:
            # A float mask: on GPU this leaves the flash kernel for the memory-efficient one.
            attn_mask = self._alibi_bias(T, key_padding_mask, q.dtype)
        elif key_padding_mask is not None:
            # (B, T) True = real token -> (B, 1, 1, T), broadcast over heads and queries.
            attn_mask = key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.is_causal and attn_mask is None,  # ALiBi's bias carries the causal mask
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # Scaled init of residual projections (GPT-2): keeps the residual stream's variance flat in depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, *, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states (B, T, C) for token ids idx (B, T).

        key_padding_mask (B, T), True for real tokens, hides padding from attention; it is
        only needed for padded batches (fine-tuning), never for packed pretraining windows.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and mean cross-entropy loss.

        causal: targets (B, T) are the next tokens; logits (B, T, V) for every position.
        masked: targets (B, T) hold the original id at masked positions and IGNORE_INDEX
        elsewhere; with targets given, the LM head runs only at masked positions and
        logits are (M, V). If no position is masked, the loss is 0 (not NaN).
        masked with positions (B, M): a fixed number of predicted positions per row and
        targets (B, M) their original ids (IGNORE_INDEX for unused slots). The gather has a
        static shape, so unlike boolean indexing it needs no host sync (matters on GPU and
        under torch.compile); logits are (B, M, V). All slots ignored gives loss NaN-free 0.
        """
        h = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(h), None
        if positions is not None:
            if self.config.objective != "masked":
                raise ValueError("positions are only meaningful for the masked objective")
            picked = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))  # (B, M, C)
            logits = self.lm_head(picked)  # (B, M, V)
            flat_targets = targets.reshape(-1)
            losses = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                flat_targets,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            # A mean that stays 0 (not NaN) when every slot is ignored.
            count = (flat_targets != IGNORE_INDEX).sum().clamp(min=1)
            return logits, losses / count
        if self.config.objective == "masked":
            selected = targets != IGNORE_INDEX  # (B, T)
            h = h[selected]  # (M, C): the head's matmul is ~15% of the full-sequence cost
            targets = targets[selected]  # (M,)
            logits = self.lm_head(h)  # (M, V)
            if targets.numel() == 0:
                return logits, logits.sum() * 0.0
            return logits, F.cross_entropy(logits.float(), targets)
        logits = self.lm_head(h)  # (B, T, V)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the matrices of Linear layers; never norms, biases or embeddings.

    A tied LM head shares its tensor with the token embedding and so is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings
    }
    decay, no_decay = [], []
    for param in model.parameters():  # yields each shared tensor once
        if param.requires_grad:
            (decay if id(param) in decay_ids else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def save_pretrained(model: TransformerLM, directory: Path | str, *, extra: dict | None = None) -> Path:
    """Write model.safetensors + config.json into directory (which must exist).

    safetensors' save_model handles the tied embedding / LM-head weights.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    save_model(model, str(directory / WEIGHTS_FILE))
    payload = {"format": EXPORT_FORMAT, "config": model.config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    return directory


def read_exported_config(directory: Path | str) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the whole config.json of an exported model; CheckpointError if absent or bad."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model config not found")
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{path}: unknown model format {payload.get('format')!r}")
        return ModelConfig.from_dict(payload["config"]), payload
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config: {error}") from None


def load_pretrained(directory: Path | str, *, dropout: float | None = None) -> TransformerLM:
    """Load an exported model from safetensors (never pickle).

    Raises CheckpointError when the files are missing or the weights do not match the config.
    """
    directory = Path(directory)
    config, _ = read_exported_config(directory)
    if dropout is not None:
        config = replace(config, dropout=dropout)
    return load_weights(TransformerLM(config), directory, what="model")


def load_weights(module: nn.Module, directory: Path, *, what: str) -> nn.Module:
    """Fill module from directory/model.safetensors (strict; never pickle).

    CheckpointError names the file when it is missing or does not match directory/config.json.
    """
    from safetensors.torch import load_model

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: {what} weights not found")
    try:
        load_model(module, str(weights), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights}: weights do not match {directory / CONFIG_FILE}: {error}") from None
    except Exception as error:  # noqa: BLE001 - safetensors' SafetensorError: not a safetensors file
        raise CheckpointError(
            f"{weights}: not a valid safetensors file ({error}); weights are only read from safetensors, "
            "never unpickled"
        ) from None
    return module
