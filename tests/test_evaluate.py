"""Evaluation metrics against hand-computed values; the protocol on synthetic traces."""

import numpy as np
import pytest
from synthetic import make_traces

from sentinel_vllm.evaluate import (
    brier_score,
    evaluate_composition,
    expected_calibration_error,
    statistic_auroc,
)
from sentinel_vllm.traces import Trace, _parse_record


def test_ece_and_brier_hand_computed():
    p, y = [0.05, 0.15, 0.95, 0.95], [0, 1, 1, 0]
    # bins: [0.0,0.1): |0-0.05| w .25; [0.1,0.2): |1-0.15| w .25; [0.9,1]: |0.5-0.95| w .5
    assert expected_calibration_error(p, y) == pytest.approx(0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.45)
    assert brier_score(p, y) == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.95**2) / 4)


def test_ece_uses_the_reliability_curve_bins():
    """ECE is computed on the bins of sklearn's calibration_curve, the curve plotted beside it."""
    from sklearn.calibration import calibration_curve

    # 0.1 sits on a bin edge: sklearn puts it in [0, 0.1], a floor(p * 10) binning in [0.1, 0.2)
    p, y = np.array([0.1, 0.15]), np.array([1, 0])
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.9 + 0.5 * 0.15)
    rng = np.random.default_rng(0)
    p = np.round(rng.uniform(size=500), 1)  # many values on edges
    y = (rng.uniform(size=500) < p).astype(int)
    frac, conf = calibration_curve(y, p, n_bins=10, strategy="uniform")
    edges = np.linspace(0.0, 1.0, 11)  # sklearn's "uniform" bins: (edge_b, edge_b+1], first closed
    counts = [np.sum((p > lo) & (p <= hi)) if b else np.sum(p <= hi)
              for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    counts = np.array([c for c in counts if c])
    assert len(counts) == len(frac)
    assert expected_calibration_error(p, y) == pytest.approx(
        np.sum(counts / len(p) * np.abs(frac - conf)), rel=1e-12)
    assert np.isnan(expected_calibration_error([], []))


def test_statistic_auroc_orientation():
    tr = [Trace(str(i), "s", i % 2 == 0, {"full": [0.1 if i % 2 == 0 else 2.0, 1.0 + i * 1e-3]})
          for i in range(20)]
    a = statistic_auroc(tr)
    assert a["max"]["auroc"] == 1.0 and a["max"]["direction"] == "lower_is_correct"
    assert a["mean"]["auroc"] == 1.0
    # sum = first + second; second grows with i, first separates: still perfectly separating
    assert a["sum"]["auroc"] == 1.0


def test_composition_tracks_true_accuracy():
    traces = [_parse_record(r, "syn") for r in make_traces(500, seed=1)]
    res = evaluate_composition(traces, ["easy", "hard"], random_state=0,
                               classifier_params={"n_estimators": 60})
    assert set(res.slices) == {"easy", "mid", "hard", "mixed"}
    assert res.seen == {"easy": True, "mid": False, "hard": True, "mixed": False}
    # held-out 20% of training slices, all of the others
    assert res.slices["easy"].n == 100 and res.slices["mid"].n == 500
    for s, e in res.slices.items():
        assert e.aee < 0.06, (s, e)
    assert res.summary["median_aee"] < 0.05
    assert res.summary["spearman_rho"] == 1.0
    assert res.summary_unseen["n_slices"] == 2
    assert res.ece < 0.1 and 0.1 < res.brier < 0.25
    with pytest.raises(ValueError, match="not in the traces"):
        evaluate_composition(traces, ["nope"])


def test_sweep_skips_untrainable_compositions():
    from sentinel_vllm.evaluate import sweep

    recs = make_traces(60, seed=3, slices={"easy": (8.0, 2.0), "hard": (2.0, 7.0)})
    recs += [{"id": f"perfect/{i}", "slice": "perfect", "correct": True,
              "entropy": {"full": [0.1, 0.2 + i * 1e-3]}} for i in range(30)]
    traces = [_parse_record(r, "syn") for r in recs]
    with pytest.warns(UserWarning, match=r"skipped 1 composition.*perfect \("):
        res = sweep(traces, classifier_params={"n_estimators": 20, "max_depth_grid": (3,),
                                               "min_samples_split_grid": (2,)})
    assert sorted("+".join(r.train_slices) for r in res) == [
        "easy", "easy+hard", "easy+perfect", "hard", "hard+perfect"]
