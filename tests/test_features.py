"""The 11 statistics against hand-computed values and scipy."""

import numpy as np
import pytest
from scipy import stats

from sentinel_vllm.features import (
    FEATURE_NAMES,
    compute_features,
    compute_features_batch,
)


def _as_dict(v):
    return dict(zip(FEATURE_NAMES, v))


def test_names_and_order():
    assert FEATURE_NAMES == ("mean", "std", "max", "q10", "q25", "q50", "q75", "q90",
                             "skewness", "kurtosis", "sum")


def test_hand_computed_four_values():
    f = _as_dict(compute_features([1.0, 2.0, 3.0, 10.0]))
    # mean 4; deviations -3,-2,-1,6; m2 = (9+4+1+36)/4 = 12.5; m3 = (-27-8-1+216)/4 = 45;
    # m4 = (81+16+1+1296)/4 = 348.5
    s = 12.5 ** 0.5
    assert f["mean"] == 4.0 and f["sum"] == 16.0 and f["max"] == 10.0
    assert f["std"] == pytest.approx(s, abs=1e-12)
    assert f["skewness"] == pytest.approx(45 / (s**3 + 1e-8), abs=1e-12)
    assert f["kurtosis"] == pytest.approx(348.5 / (12.5**2 + 1e-8), abs=1e-12)
    # linear quantiles, h = 3 * level: q10 -> 1 + 0.3; q25 -> 1.75; q50 -> 2.5; q75 -> 2.25 -> 4.75; q90 -> 2.7 -> 7.9
    assert [f[q] for q in ("q10", "q25", "q50", "q75", "q90")] == pytest.approx([1.3, 1.75, 2.5, 4.75, 7.9])


def test_matches_scipy_population_moments():
    x = np.random.default_rng(0).gamma(2.0, 0.5, size=333)
    f = _as_dict(compute_features(x))
    assert f["std"] == pytest.approx(np.std(x, ddof=0), rel=1e-12)
    assert f["skewness"] == pytest.approx(stats.skew(x, bias=True), rel=1e-6)
    assert f["kurtosis"] == pytest.approx(stats.kurtosis(x, fisher=False, bias=True), rel=1e-6)
    np.testing.assert_allclose([f["q10"], f["q90"]], np.quantile(x, [0.1, 0.9]), rtol=1e-12)


def test_edge_cases_defined():
    assert compute_features([]).tolist() == [0.0] * 11
    one = _as_dict(compute_features([0.7]))
    assert one == pytest.approx({"mean": 0.7, "std": 0.0, "max": 0.7, "q10": 0.7, "q25": 0.7,
                                 "q50": 0.7, "q75": 0.7, "q90": 0.7, "skewness": 0.0,
                                 "kurtosis": 0.0, "sum": 0.7})
    const = _as_dict(compute_features([2.0] * 5))
    assert const["std"] == 0.0 and const["skewness"] == 0.0 and const["kurtosis"] == 0.0
    assert const["sum"] == 10.0
    with pytest.raises(ValueError):
        compute_features([1.0, float("nan")])
    with pytest.raises(ValueError):
        compute_features([[1.0]])


def _reference(x):
    """The convention written out with numpy/scipy, independently of sentinel_vllm.features."""
    if len(x) == 0:
        return np.zeros(11)
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return np.array([x.mean(), sd, x.max(), *np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9]),
                     stats.moment(x, 3) / (sd**3 + 1e-8), stats.moment(x, 4) / (sd**4 + 1e-8),
                     x.sum()])


def test_batch_and_single_match_numpy_reference():
    rng = np.random.default_rng(3)
    lengths = np.array([0, 1, 2, 5, 17, 40])
    padded = np.full((len(lengths), 40), 123.0)  # padding must be ignored
    for i, n in enumerate(lengths):
        padded[i, :n] = rng.exponential(1.0, size=n)
    got = compute_features_batch(padded, lengths)
    for i, n in enumerate(lengths):
        ref = _reference(padded[i, :n])
        np.testing.assert_allclose(got[i], ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(compute_features(padded[i, :n]), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        compute_features_batch(padded, lengths + 1)
    padded[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        compute_features_batch(padded, lengths)
    padded[0, 0] = np.nan  # NaN in the padding is ignored
    assert compute_features_batch(padded[:2], lengths[:2]).shape == (2, 11)
    assert compute_features_batch(np.zeros((3, 0)), [0, 0, 0]).tolist() == [[0.0] * 11] * 3


def test_check_feature_matrix_is_the_shared_input_check(tmp_path):
    from sentinel_vllm.classifier import SentinelClassifier
    from sentinel_vllm.features import check_feature_matrix

    X = np.zeros((6, 11))
    X[4, 10] = np.inf
    with pytest.raises(ValueError, match=r"1 feature rows hold NaN/inf; first: row 4, feature 'sum'"):
        check_feature_matrix(X, 11)
    with pytest.raises(ValueError, match=r"shape \(n, 11\)"):
        check_feature_matrix(np.zeros((2, 3)), 11)
    with pytest.raises(ValueError, match=r"row 0, feature 2 = nan"):
        check_feature_matrix([[0.0, 1.0, np.nan]])  # another width: columns by index
    got = check_feature_matrix(np.asfortranarray(np.ones((3, 11), dtype=np.float32)))
    assert got.dtype == np.float64 and got.flags.c_contiguous
    # the estimator and the loaded file say the same thing about the same bad input
    rng = np.random.default_rng(0)
    clf = SentinelClassifier(n_estimators=5, max_depth_grid=(3,), min_samples_split_grid=(2,), cv=2)
    clf.fit(rng.normal(size=(40, 11)), np.r_[np.zeros(20), np.ones(20)])
    sent = clf.export_onnx(tmp_path / "s.onnx")
    from sentinel_vllm.sentinel_file import load_sentinel

    loaded = load_sentinel(tmp_path / "s.onnx")
    assert loaded.id == sent
    msgs = []
    for model in (clf.predict_proba, loaded.predict_proba):
        with pytest.raises(ValueError) as e:
            model(X)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
