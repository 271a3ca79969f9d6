"""Slice estimates and the Poisson-binomial interval, against hand-computed numbers and simulation."""

import math

import numpy as np
import pytest

from sentinel_vllm.aggregate import Z_95, estimate_accuracy, estimate_slices, summary


def test_hand_computed_interval():
    e = estimate_accuracy([0.5, 0.9, 0.1], [True, None, False])
    se = math.sqrt(0.25 + 0.09 + 0.09) / 3
    assert e.estimate == pytest.approx(0.5)
    assert (e.ci_low, e.ci_high) == pytest.approx((0.5 - Z_95 * se, 0.5 + Z_95 * se))
    assert e.true == 0.5 and e.aee == 0.0 and e.n_labelled == 2 and e.n == 3


def test_interval_covers_simulated_accuracy():
    rng = np.random.default_rng(0)
    p = rng.beta(2, 2, size=400)
    e = estimate_accuracy(p)
    acc = (rng.random((4000, p.size)) < p).mean(1)   # accuracies of calibrated outcomes
    coverage = np.mean((acc >= e.ci_low) & (acc <= e.ci_high))
    assert 0.93 < coverage < 0.97


def test_errors_and_empty():
    with pytest.raises(ValueError):
        estimate_accuracy([0.5, 1.5])
    with pytest.raises(ValueError):
        estimate_accuracy([0.5], [True, False])
    assert math.isnan(estimate_accuracy([]).estimate)


def test_slices_and_summary():
    est = estimate_slices(["a", "a", "b", "b", "c"], [0.9, 0.8, 0.2, 0.3, 0.5], [1, 1, 0, 1, 0])
    assert list(est) == ["a", "b", "c"]
    assert est["a"].aee == pytest.approx(0.15) and est["b"].aee == pytest.approx(0.25)
    s = summary(est)
    assert s["median_aee"] == pytest.approx(0.25) and s["mean_aee"] == pytest.approx(0.3)
    # estimates (0.85, 0.25, 0.5) vs true (1, 0.5, 0): ranks (3,1,2) vs (3,2,1) -> rho = 0.5
    assert s["spearman_rho"] == pytest.approx(0.5)
