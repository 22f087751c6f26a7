"""Sequence classification on top of the pretrained transformer.

Shared by the tune, finetune and evaluate stages; one module per job:

- :mod:`.model`: :class:`SequenceClassifier`, the pretrained :class:`~bigmodel_ops.model.TransformerLM`
  plus a dropout + Linear head over one pooled vector per text: the ``[CLS]`` state (position 0)
  for a masked (bidirectional) backbone, the last real token for a causal one (the only position
  that has seen the whole text);
- :mod:`.metrics`: :func:`confusion_matrix` and :func:`metrics_from_confusion` (accuracy, macro F1,
  per-class precision / recall);
- :mod:`.data`: input checks and tokenisation: :func:`check_pretrained_dir`,
  :func:`read_labeled_split`, :func:`load_splits` (labeled Parquet -> token ids, with the
  pretrained model's tokenizer), :func:`collate` and :class:`ClassificationDataModule`;
- :mod:`.training`: :class:`ClassifierModule` (Lightning: AdamW, linear warmup + linear decay,
  optional frozen backbone, val loss / accuracy / macro F1 per epoch), :class:`MetricsLogger`,
  :func:`build_trainer` and :func:`fit_classifier`;
- :mod:`.export`: :func:`save_classifier` writes safetensors + config.json + tokenizer.json,
  :func:`load_classifier` reads them back (never pickle) into a :class:`TextClassifier` used by
  the evaluate stage and the MLflow pyfunc model (serving.py).

Token ids follow the tokenizer contract of the tokenize stage: pad=0, unk=1, cls=2, sep=3,
mask=4, and a ``[CLS] $A [SEP]`` post-processor.

Every public name is re-exported here, so ``from bigmodel_ops.classification import X`` works for
any of them. The submodules import each other in one direction only (model, metrics <- data <-
training, export), so there is no import cycle.
"""

from bigmodel_ops.classification.data import (
    CLS_ID,
    LABELED_COLUMNS,
    PAD_ID,
    SPLITS,
    TOKENIZER_FILE,
    ClassificationDataModule,
    TokenizedSplit,
    check_pretrained_dir,
    collate,
    effective_max_length,
    load_splits,
    load_tokenizer,
    read_labeled_split,
    tokenize_texts,
)
from bigmodel_ops.classification.export import (
    CLASSIFIER_FORMAT,
    TextClassifier,
    load_classifier,
    read_classifier_config,
    save_classifier,
)
from bigmodel_ops.classification.metrics import confusion_matrix, metrics_from_confusion
from bigmodel_ops.classification.model import SequenceClassifier, pooling_for
from bigmodel_ops.classification.training import (
    ClassifierModule,
    HyperParams,
    MetricsLogger,
    build_classifier,
    build_trainer,
    fit_classifier,
    linear_warmup_decay,
    resolve_precision,
)

__all__ = [
    "CLASSIFIER_FORMAT",
    "CLS_ID",
    "LABELED_COLUMNS",
    "PAD_ID",
    "SPLITS",
    "TOKENIZER_FILE",
    "ClassificationDataModule",
    "ClassifierModule",
    "HyperParams",
    "MetricsLogger",
    "SequenceClassifier",
    "TextClassifier",
    "TokenizedSplit",
    "build_classifier",
    "build_trainer",
    "check_pretrained_dir",
    "collate",
    "confusion_matrix",
    "effective_max_length",
    "fit_classifier",
    "linear_warmup_decay",
    "load_classifier",
    "load_splits",
    "load_tokenizer",
    "metrics_from_confusion",
    "pooling_for",
    "read_classifier_config",
    "read_labeled_split",
    "resolve_precision",
    "save_classifier",
    "tokenize_texts",
]
