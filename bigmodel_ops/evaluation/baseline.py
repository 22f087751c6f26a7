"""The baseline of every evaluation: TF-IDF features + logistic regression (scikit-learn).

Trained on the train split and scored on the test split in the evaluate stage itself, so the
model's numbers always stand beside what a cheap bag-of-n-grams model reaches on the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_ops.errors import DataError


def baseline_proba(
    train_texts: list[str],
    train_ids: np.ndarray,
    test_texts: list[str],
    *,
    n_labels: int,
    settings: Any,
    seed: int = 0,
) -> np.ndarray:
    """(N_test, n_labels) probabilities of TF-IDF + logistic regression fitted on the train split.

    ``settings``: ``evaluate.baseline`` (ngram_max, C, sublinear_tf, min_df, max_features,
    max_iter). Classes absent from the train split get probability 0.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(np.unique(train_ids)) < 2:
        raise DataError("the train split holds a single label: the baseline (and the classifier) need two")
    model = make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, settings.ngram_max),
            sublinear_tf=settings.sublinear_tf,
            min_df=settings.min_df,
            max_features=settings.max_features,
        ),
        LogisticRegression(C=settings.C, max_iter=settings.max_iter, random_state=seed),
    )
    model.fit(train_texts, train_ids)
    probs = np.zeros((len(test_texts), n_labels))
    probs[:, model.classes_] = model.predict_proba(test_texts)
    return probs
