"""The decision rule prediction applies: a threshold chosen on validation data (Youden's J)."""

import numpy as np

from haven.trust.decision import apply, choose, youden_threshold


def test_youden_threshold_separates_a_separable_split():
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t = youden_threshold(p, y == 1)
    # every score of a positive lies at or above it, every negative's below: J = 1
    assert 0.3 < t <= 0.35


def test_threshold_moves_with_the_class_overlap():
    # positives score low for this model: argmax would miss most, the chosen cut-off does not
    p = np.array([0.01, 0.02, 0.03, 0.04, 0.2, 0.25, 0.3, 0.35])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t = youden_threshold(p, y == 1)
    assert 0.04 < t <= 0.2
    probs = np.stack([1 - p, p], axis=1)
    d = choose(probs, y, ["normal", "lesion"], 1, None)
    assert d["rule"] == "threshold" and d["chosen_on"] == "val"
    assert (apply(probs, d, ["normal", "lesion"]) == y).all()
    assert (probs.argmax(1) == y).mean() == 0.5  # what argmax would have done


def test_multiclass_and_one_class_splits_keep_argmax():
    probs = np.eye(3)[[0, 1, 2]]
    assert choose(probs, np.array([0, 1, 2]), ["a", "b", "c"], 1, None)["rule"] == "argmax"
    two = np.array([[0.8, 0.2], [0.7, 0.3]])
    d = choose(two, np.array([0, 0]), ["a", "b"], 1, None)
    assert d["rule"] == "argmax" and d["threshold"] is None
    assert (apply(two, d, ["a", "b"]) == two.argmax(1)).all()


def test_threshold_is_chosen_on_the_calibrated_probabilities_when_a_temperature_is_given():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    logit = (y - 0.5) * 2 + rng.normal(0, 1.5, 200)
    p = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - p, p], axis=1)
    plain, scaled = choose(probs, y, ["a", "b"], 1, None), choose(probs, y, ["a", "b"], 1, 3.0)
    assert scaled["calibrated"] and not plain["calibrated"]
    # the same ROC point, on another probability scale: temperature 3 pulls the cut-off to 0.5
    assert abs(scaled["threshold"] - 0.5) < abs(plain["threshold"] - 0.5)
