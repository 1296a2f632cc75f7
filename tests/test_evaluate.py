import numpy as np
import pytest

from haven.evaluate import compute_metrics


def test_metrics_on_known_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # predicts class 1 for samples 3,4,5,6 : one false positive, one false negative
    p1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    m = compute_metrics(y, probs, ["normal", "hemorrhage"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["per_class"]["hemorrhage"]["sensitivity"] == pytest.approx(0.75)
    assert m["per_class"]["hemorrhage"]["specificity"] == pytest.approx(0.75)
    # ROC AUC by hand: of 16 (neg, pos) pairs, only (0.6, 0.4) is mis-ordered
    assert m["roc_auc"] == pytest.approx(15 / 16)


def test_multiclass_auc_and_perfect_model():
    y = np.repeat(np.arange(3), 4)
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0
    assert np.trace(np.array(m["confusion_matrix"])) == 12


def test_auc_undefined_when_a_class_is_missing():
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1]] * 3)
    assert compute_metrics(y, probs, ["a", "b"])["roc_auc"] is None
