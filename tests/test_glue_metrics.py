"""GLUE metrics: hand-made cases with known answers, then agreement with sklearn / scipy."""

import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from mosaicbert_jax.glue import metrics


def test_accuracy_known():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert metrics.accuracy([2, 2, 1], [2, 2, 1]) == 1.0


def test_f1_known():
    # tp=1, fp=1, fn=1: precision 1/2, recall 1/2.
    assert metrics.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    # tp=2, fp=0, fn=1: precision 1, recall 2/3 -> 0.8.
    assert metrics.f1_binary([1, 1, 0, 0], [1, 1, 1, 0]) == pytest.approx(0.8)
    # No positive predicted: F1 of the positive class is 0 (sklearn's zero_division=0).
    assert metrics.f1_binary([0, 0, 0], [1, 0, 1]) == 0.0


def test_matthews_known():
    # tp=6, tn=3, fp=1, fn=2: (6*3 - 1*2) / sqrt(7 * 8 * 4 * 5).
    preds = [1] * 6 + [0] * 3 + [1] + [0] * 2
    labels = [1] * 6 + [0] * 3 + [0] + [1] * 2
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(16 / math.sqrt(1120))
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)
    # Constant predictions carry no information: 0 (as sklearn), not NaN.
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_pearson_known():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # centred x = [-1.5, -.5, .5, 1.5], y = [-1.5, .5, -.5, 1.5]: 4 / 5.
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


def test_spearman_known():
    # A monotone but nonlinear relation ranks perfectly.
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    # Ties take the average rank: ranks x = [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    np.testing.assert_array_equal(metrics.average_ranks(np.array([3, 1, 3, 2, 3])),
                                  [4, 1, 4, 2, 4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    assert metrics.accuracy(preds, labels) == pytest.approx(
        sklearn.metrics.accuracy_score(labels, preds))
    assert metrics.f1_binary(preds, labels) == pytest.approx(sklearn.metrics.f1_score(labels,
                                                                                       preds))
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, preds))
    three = rng.integers(0, 3, 200)
    guess = np.where(rng.random(200) < 0.5, three, rng.integers(0, 3, 200))
    assert metrics.matthews_corrcoef(guess, three) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(three, guess))
    # Scores on a 0.2 grid, so both inputs have many ties.
    scores = np.round(rng.uniform(0, 5, 300) * 5) / 5
    predicted = np.round((scores + rng.normal(0, 1.0, 300)) * 5) / 5
    assert metrics.pearson(predicted, scores) == pytest.approx(
        scipy.stats.pearsonr(predicted, scores)[0])
    assert metrics.spearman(predicted, scores) == pytest.approx(
        scipy.stats.spearmanr(predicted, scores)[0])


def test_compute_metrics_names_and_errors():
    assert metrics.compute_metrics(("accuracy", "f1"), [1, 0], [1, 1]) == {"accuracy": 0.5,
                                                                           "f1": 2 / 3}
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.compute_metrics(("bleu",), [1], [1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metrics.accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])
