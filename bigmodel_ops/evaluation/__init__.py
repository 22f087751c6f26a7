"""Scoring a classifier on the test split: the library of the ``evaluate`` stage
(:mod:`bigmodel_ops.pipeline.evaluate`).

Modules: :mod:`.predict` (probabilities of the classifier), :mod:`.metrics` (scikit-learn metrics
and the expected calibration error), :mod:`.curves` (ROC, precision-recall, reliability and
confusion rows for DVC plots, and the same as PNG), :mod:`.baseline` (TF-IDF + logistic
regression), :mod:`.tables` (per-class table, worst errors, predictions), :mod:`.latency` (CPU
latency and size on disk). Nothing is imported here, so importing one module stays cheap.
"""
