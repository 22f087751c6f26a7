"""Hyperparameter search for fine-tuning (Optuna): :mod:`.study`."""
