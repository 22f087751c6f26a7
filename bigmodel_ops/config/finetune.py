"""The finetune section (with its LoRA sub-section)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from bigmodel_ops.config._base import Fraction, PositiveInt, _Strict

LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


class LoraParams(_Strict):
    """LoRA adapters (finetune.method: lora), through peft."""

    # Rank of the low-rank update of each targeted layer.
    rank: PositiveInt = 8
    # Scaling numerator: the update is multiplied by alpha / rank.
    alpha: float = Field(default=16.0, gt=0.0)
    # Dropout on the adapters' input.
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # Linear layers of the backbone's blocks that get adapters: attn.qkv / attn.proj (attention),
    # mlp.fc / mlp.proj (MLP), or any dotted suffix of a layer's name ("proj" = both projections).
    # An entry that matches no layer is refused before training.
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class FinetuneParams(_Strict):
    max_epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    # Peak learning rate of the backbone (linear warmup, then linear decay to 0). 2e-3 lets a
    # pretrained backbone move far from its weights: lower rates keep it near features that
    # carry little of the task (README, "What pretraining buys at this scale").
    lr: float = Field(default=2e-3, gt=0.0, le=1.0)
    # The classification head's learning rate is lr * head_lr_mult.
    head_lr_mult: float = Field(default=1.0, gt=0.0, le=1000.0)
    # Layer-wise LR decay: block i of n gets lr * layer_lr_decay ** (n - i), the embeddings
    # lr * layer_lr_decay ** (n + 1); 1.0 turns it off.
    layer_lr_decay: float = Field(default=1.0, gt=0.0, le=1.0)
    # AdamW weight decay of the Linear matrices (never norms, biases or embeddings).
    weight_decay: float = Field(default=0.01, ge=0.0)
    # Dropout of the backbone and of the head.
    dropout: Fraction = 0.1
    # Fraction of the optimizer steps spent warming the learning rate up.
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Numeric precision of fine-tuning and of the tune stage's trials: null = the active profile's
    # precision, as pretraining runs. On a CPU with AMX, bf16-mixed pretrains 1.3x as fast but
    # fine-tunes no faster, so a profile with precision: bf16-mixed may keep fine-tuning in
    # 32-true here (README, "Switching to the GPU-sized run").
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] | None = None
    # Batch training texts of similar length: each epoch's random order is cut into groups of 8
    # batches, each group sorted by length, its batches shuffled. A batch is padded to its
    # longest text, so this computes fewer padding tokens on texts of mixed lengths (README,
    # "Fine-tuning options"); false: plain shuffling. Validation is always batched by length.
    group_by_length: bool = True
    # Texts are truncated to this many tokens, [CLS] and [SEP] included (at most the model's block_size).
    max_length: int = Field(default=128, ge=2)
    # Which tokens of a longer text are kept: head (the first max_length), tail (the last ones,
    # after [CLS]) or head_tail (the first head_tokens and the last max_length - head_tokens).
    # Training, evaluation, serving and the compressed models all cut texts this way.
    truncation: Literal["head", "tail", "head_tail"] = "tail"
    # Tokens kept from the start of a long text with truncation: head_tail ([CLS] included).
    head_tokens: PositiveInt = 64
    # One vector per text for the head: cls (masked backbone), last (causal backbone), mean
    # (either: the mean of the real tokens), mean_max (either: the mean and the elementwise max
    # of the real tokens, concatenated), auto = cls for masked, last for causal. Checked against
    # the backbone's objective once the backbone is known.
    pooling: Literal["auto", "cls", "mean", "last", "mean_max"] = "auto"
    # Use the tune stage's best hyperparameters instead of the values above.
    use_tuned: bool = True
    # Freeze the pretrained backbone and train only the classification head.
    freeze_backbone: bool = False
    # Freeze the embeddings and the first k transformer blocks (0 = off; at most n_layer).
    freeze_layers: int = Field(default=0, ge=0)
    # Gradient-norm clipping; 0 turns it off.
    grad_clip: float = Field(default=1.0, ge=0.0)
    # Label smoothing of the training cross-entropy (val_loss stays the plain cross-entropy).
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Class weights of the training loss: none, balanced (n / (k * count) on the train split), or
    # one positive weight per label of prepare.labels, in that order.
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(gt=0.0)]] = "none"
    # Train the same architecture from random init (seeded) instead of the pretrained weights.
    from_scratch: bool = False
    # scratch: also train the from-scratch control with the same recipe and report its val
    # metrics (control_val_acc, ...) beside the pretrained classifier's; none: do not.
    control: Literal["none", "scratch"] = "none"
    # full: train every (unfrozen) weight; lora: LoRA adapters (peft), merged into the weights at
    # export, so the exported model is the same plain classifier.
    method: Literal["full", "lora"] = "full"
    lora: LoraParams = LoraParams()
    # Fine-tune this many times from different seeds (project.seed, then + 1000 per restart) and
    # keep the run with the best val_acc (the first of equals); the control gets as many tries.
    # Small labelled sets make single runs noisy: BERT's authors kept the best of several restarts
    # (README, "Fine-tuning options"). Each restart costs one more fine-tuning. Tune trials train once.
    restarts: PositiveInt = 1
    # What the restarts export: best (the run with the best val_acc), soup (the mean of every
    # run's weights, each at its best epoch: a "model soup", one model's inference cost) or
    # greedy_soup (runs join the mean best first, each only if the mean's val_acc does not drop).
    # soup and greedy_soup need restarts >= 2 (README, "Fine-tuning options").
    combine_restarts: Literal["best", "soup", "greedy_soup"] = "best"
    # Average the weights along each run, and validate and export the average: none, ema (an
    # exponential moving average, updated after every optimizer step with ema_decay) or swa (the
    # uniform mean of the weights after each step past the first swa_start of the steps). No
    # extra training; the best epoch is picked by the average's val_acc, and an epoch that ends
    # before the average starts exports the run's own weights (README, "Fine-tuning options").
    weight_averaging: Literal["none", "ema", "swa"] = "none"
    # ema: avg = ema_decay * avg + (1 - ema_decay) * weights; 0.9 spans about the last 10 steps.
    ema_decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    # swa: the fraction of the optimizer steps after which the weights join the mean (0.34 with 3
    # epochs: the second and third epochs, the setting measured in docs/pretraining-value.md).
    swa_start: float = Field(default=0.34, ge=0.0, lt=1.0)
    # Stop after this many epochs without a better val_acc; 0 or null = off. Either way the
    # best epoch's weights (by val_acc) are exported, not the last epoch's.
    early_stopping_patience: int | None = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneParams:
        if self.freeze_backbone and self.freeze_layers:
            raise ValueError(
                "freeze_backbone and freeze_layers are both set: freeze_backbone freezes everything, "
                "freeze_layers the embeddings and the first k blocks; keep one"
            )
        if self.truncation == "head_tail" and self.head_tokens >= self.max_length:
            raise ValueError(
                f"head_tokens ({self.head_tokens}) must be below max_length ({self.max_length}) with "
                "truncation: head_tail, to leave room for the end of the text"
            )
        if self.combine_restarts != "best" and self.restarts < 2:
            raise ValueError(
                f"combine_restarts: {self.combine_restarts} averages the weights of several runs, but "
                f"restarts is {self.restarts}; set restarts >= 2 or combine_restarts: best"
            )
        if self.from_scratch and self.control == "scratch":
            raise ValueError(
                "control: scratch compares with a from-scratch model, but from_scratch is already true"
            )
        return self
