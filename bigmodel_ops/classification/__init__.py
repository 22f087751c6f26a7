"""Sequence classification on top of the pretrained transformer (the tune, finetune and evaluate stages).

One module per job, imported directly (this package imports nothing, so loading a served model
never pulls in Lightning, pydantic or peft):

- :mod:`.model`: :class:`~.model.SequenceClassifier`, the pretrained
  :class:`~bigmodel_ops.model.TransformerLM` plus a dropout + Linear head over one pooled vector per
  text (``cls`` / ``last`` / ``mean``; ``auto``: the ``[CLS]`` state for a masked backbone, the last
  real token for a causal one);
- :mod:`.metrics`: confusion matrix, accuracy, macro F1, per-class precision / recall;
- :mod:`.inputs`: labeled splits, tokenisation and :func:`~.inputs.collate` (no Lightning);
- :mod:`.training`: :class:`~.training.ClassifierModule` and :func:`~.training.fit_classifier`
  (Lightning): label smoothing, class weights, from-scratch init, assembling the pieces below;
- :mod:`.optimization`: per-layer learning rates (AdamW groups), the LR schedule, freezing;
- :mod:`.class_weights`: the cross-entropy class weights of ``finetune.class_weights``;
- :mod:`.early_stopping`: best-epoch tracking and early stopping;
- :mod:`.datamodule`: the train / val loaders, sharded by rank (Lightning);
- :mod:`.lora`: LoRA adapters through peft, merged into plain weights at export;
- :mod:`.export`: :func:`~.export.save_classifier` / :func:`~.export.load_classifier` (safetensors +
  config.json + tokenizer.json, never pickle) and :class:`~.export.TextClassifier` for inference.
"""
