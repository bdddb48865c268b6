"""GLUE metrics written from their definitions agree with scipy on random data and hand cases."""

import numpy as np
import pytest
from scipy import stats

from compress.data import metrics


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:20] = np.round(y[:20])  # ties
    x[10:30] = 1.0
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_matthews_binary_hand_case_and_multiclass():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
    tp, tn, fp, fn = 2, 2, 1, 0
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_corr(preds, labels) == pytest.approx(expected)
    assert metrics.matthews_corr([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert metrics.matthews_corr([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction


def test_accuracy_and_f1():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert metrics.accuracy(preds, labels) == 0.75
    assert metrics.f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert metrics.compute(("accuracy", "f1"), preds, labels)["accuracy"] == 75.0
