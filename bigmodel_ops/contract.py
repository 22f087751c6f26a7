"""The tokenizer and model-folder contract shared by every stage.

The tokenize stage writes a ``tokenizer.json`` whose special tokens sit at fixed ids; the
pretrain stage exports a model folder; fine-tuning, tuning, evaluation and serving read both.
What they agree on lives here, once:

- special token ids: pad=0, unk=1, cls=2, sep=3, mask=4 (``sep`` also ends every document in
  the packed pretraining stream; the tokenizer's post-processor wraps a text as
  ``[CLS] text [SEP]`` for fine-tuning);
- a model folder holds ``model.safetensors`` (weights, never pickle), ``config.json`` and
  ``tokenizer.json``;
- :func:`load_tokenizer` is the one loader, and :func:`check_model_dir` the one completeness check;
- :class:`Truncation`: which tokens of a long text a classifier reads (its head, its tail, or both),
  the same in training, evaluation, serving and compression.

Imports neither Lightning nor pydantic nor MLflow: a served model depends on this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_ops.errors import BigModelOpsError, CheckpointError, DataError

SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
# Fixed ids, in the order of config.SpecialTokens.as_list(): every consumer may rely on them.
SPECIAL_IDS = {name: index for index, name in enumerate(SPECIAL_NAMES)}
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = (SPECIAL_IDS[name] for name in SPECIAL_NAMES)

TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
# In the finetune stage's control folder: {"trained": true|false} (the model files beside it if true).
CONTROL_FILE = "control.json"


def load_tokenizer(
    path: Path | str, *, max_length: int | None = None, error: type[BigModelOpsError] = DataError
) -> Any:
    """Load a ``tokenizers`` file; ``error`` (DataError by default) names the file when it is
    missing or not a tokenizer.

    Padding is off (batches are padded by the caller, to their longest row). With ``max_length``,
    texts are truncated to ``max_length`` tokens, special tokens included; without it they are
    left whole (:class:`Truncation` cuts them).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: tokenizer file not found (run the tokenize stage first)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as raised:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise error(f"{path}: not a valid tokenizers file: {raised}") from None
    tokenizer.no_padding()
    if max_length is not None:
        tokenizer.enable_truncation(max_length=max_length)
    else:
        tokenizer.no_truncation()
    return tokenizer


TRUNCATION_KEEPS = ("head", "tail", "head_tail")


@dataclass(frozen=True)
class Truncation:
    """Which tokens of a text longer than ``max_length`` (special tokens included) are kept.

    ``keep`` is ``head`` (the first ``max_length``), ``tail`` (the first token, ``[CLS]`` with the
    tokenize stage's tokenizers, then the last ``max_length - 1``, ``[SEP]`` included: a review's
    verdict is often at its end) or ``head_tail`` (the first ``head_tokens`` and the last
    ``max_length - head_tokens``). A text of at most ``max_length`` tokens is never changed.
    ValueError on a ``head_tokens`` that leaves no room for the tail.
    """

    max_length: int
    keep: str = "head"
    head_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {self.max_length}")
        if self.keep not in TRUNCATION_KEEPS:
            raise ValueError(f"truncation {self.keep!r} is not one of {list(TRUNCATION_KEEPS)}")
        if self.keep == "head_tail" and not 1 <= self.head_tokens < self.max_length:
            raise ValueError(
                f"head_tokens must be between 1 and max_length - 1 = {self.max_length - 1} with "
                f"truncation head_tail, got {self.head_tokens}"
            )

    @property
    def tokenizer_max_length(self) -> int | None:
        """The limit to set in the tokenizer itself (head only: the same cut, done while encoding);
        None: the tokenizer leaves texts whole and :meth:`apply` cuts them."""
        return self.max_length if self.keep == "head" else None

    def apply(self, ids: list[int]) -> list[int]:
        """``ids`` cut to at most ``max_length``."""
        if len(ids) <= self.max_length:
            return ids
        if self.keep == "head":
            return ids[: self.max_length]
        head = 1 if self.keep == "tail" else self.head_tokens
        return ids[:head] + ids[len(ids) - (self.max_length - head) :]

    def as_config(self) -> dict[str, Any]:
        """The keys a classifier's config.json stores."""
        return {"max_length": self.max_length, "truncation": self.keep, "head_tokens": self.head_tokens}

    @classmethod
    def from_config(cls, payload: dict[str, Any], *, source: Path | str) -> Truncation:
        """Read back :meth:`as_config` (a folder without ``truncation`` keeps the head);
        CheckpointError naming ``source`` on a bad value."""
        try:
            return cls(
                int(payload["max_length"]),
                str(payload.get("truncation", "head")),
                int(payload.get("head_tokens", 0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: invalid truncation settings: {error}") from None


def check_model_dir(directory: Path, *, what: str = "pretrained model", stage: str = "pretrain") -> None:
    """CheckpointError naming the path when a model folder is absent or incomplete, or when one of
    its files is a link that leads out of the folder (a tampered artifact must not make us read,
    or show in an error, a file elsewhere on the machine)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: {what} not found (run the {stage} stage first)")
    folder = directory.resolve()
    for name in MODEL_FILES:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the {what} folder")
        if not path.resolve().is_relative_to(folder):
            raise CheckpointError(f"{path}: a link that leads out of the {what} folder; refused")
