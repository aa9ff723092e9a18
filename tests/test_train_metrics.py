"""The trainer's own AUC and log loss equal scikit-learn's (ties, few distinct scores, tiny splits)."""

from __future__ import annotations

import numpy as np
import pytest

from embpress.train import log_loss, roc_auc

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n,levels", [(1000, None), (1000, 5), (50, 3), (20000, 300), (2, None)])
def test_auc_and_log_loss_equal_scikit_learn(n, levels):
    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.3).astype(np.float64)
    y[:2] = 0, 1
    p = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
    p = p * 0.5 + y * 0.2
    assert roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert log_loss(y, p) == pytest.approx(sk.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-12)


def test_auc_extremes():
    y = np.array([0.0, 0.0, 1.0, 1.0])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5
