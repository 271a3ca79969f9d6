"""SentinelClassifier: the authors' recipe against scikit-learn references and a
generator whose P(correct | features) is known."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from sentinel_vllm.classifier import SentinelClassifier
from sentinel_vllm.features import compute_features


def entropy_data(n, seed):
    """Trajectories of per-step entropy (nats) and labels with a KNOWN P(correct | features).

    Each response has T ~ U{5..59} steps of Gamma(1.5, s/1.5) entropy, s ~ LogU(0.05, 3);
    it is correct with probability p = sigmoid(3 - 3 * mean_t H_t). ``mean`` is
    feature 0, so p is exactly P(correct | the 11 features).
    """
    rng = np.random.default_rng(seed)
    X = np.empty((n, 11))
    for i in range(n):
        s = np.exp(rng.uniform(np.log(0.05), np.log(3.0)))
        X[i] = compute_features(rng.gamma(1.5, s / 1.5, size=int(rng.integers(5, 60))))
    p = 1.0 / (1.0 + np.exp(-(3.0 - 3.0 * X[:, 0])))
    y = rng.random(n) < p
    return X, y, p


SMALL = dict(n_estimators=30, max_depth_grid=(3, 10), min_samples_split_grid=(2, 10))


@pytest.fixture(scope="module")
def data():
    return entropy_data(1200, seed=1)


@pytest.fixture(scope="module")
def fitted(data):
    X, y, _ = data
    return SentinelClassifier(**SMALL, random_state=3).fit(X, y)


def test_calibration_equals_calibratedclassifiercv_ensemble_false(data, fitted):
    # The documented equivalence: OOF isotonic + refit on all data is sklearn's
    # CalibratedClassifierCV(method="isotonic", ensemble=False) with the same folds.
    X, y, _ = data
    folds = StratifiedKFold(fitted.n_splits_, shuffle=True, random_state=3)
    ref = CalibratedClassifierCV(clone(fitted.pipeline_), method="isotonic", cv=folds,
                                 ensemble=False).fit(X, y)
    Xt, _, _ = entropy_data(500, seed=2)
    np.testing.assert_allclose(fitted.predict_proba(Xt), ref.predict_proba(Xt), rtol=0, atol=1e-12)
    assert fitted.predict_proba(Xt).dtype == np.float64
    np.testing.assert_allclose(fitted.predict_proba(Xt).sum(axis=1), 1.0, atol=1e-15)


def test_grid_selects_best_cv_auroc(data, fitted):
    X, y, _ = data
    folds = StratifiedKFold(fitted.n_splits_, shuffle=True, random_state=3)
    scores = {}
    for d in SMALL["max_depth_grid"]:
        for m in SMALL["min_samples_split_grid"]:
            est = clone(fitted.pipeline_).set_params(forest__max_depth=d,
                                                     forest__min_samples_split=m)
            scores[(d, m)] = cross_val_score(est, X, y, cv=folds, scoring="roc_auc").mean()
    best = max(scores, key=scores.get)
    assert (fitted.best_params_["max_depth"], fitted.best_params_["min_samples_split"]) == best
    assert fitted.cv_auroc_ == pytest.approx(scores[best], abs=1e-12)
    forest = fitted.pipeline_.named_steps["forest"]
    assert forest.n_estimators == 30 and forest.class_weight == "balanced_subsample"
    assert fitted.n_splits_ == 5 and fitted.n_train_ == 1200 and fitted.n_correct_ == int(y.sum())


def test_uncalibrated_is_the_pipeline(data):
    X, y, _ = data
    clf = SentinelClassifier(n_estimators=10, max_depth_grid=(5,), min_samples_split_grid=(2,),
                             calibrate=False, class_weight=None).fit(X[:400], y[:400])
    assert clf.isotonic_ is None
    np.testing.assert_array_equal(clf.predict_proba(X[400:]), clf.pipeline_.predict_proba(X[400:]))
    assert clf.pipeline_.named_steps["forest"].class_weight is None


def test_tracks_known_probability():
    """Held-out AUROC near the Bayes AUROC and calibrated p near the true p.

    Bounds, from the generator: the oracle (true p) reaches AUROC ~0.90 on these
    2,000 held-out rows (chance 0.5). Both AUROCs are on the same rows, so their
    difference has a standard error well under the single-AUROC 0.008; the model
    may lose at most 0.03 to the oracle. Isotonic steps fitted on 2,000 rows err
    by a few hundredths each: mean |p_hat - p| < 0.05 (measured 0.028), and the
    mean p_hat (the slice's estimated accuracy) within 0.02 of the mean true p
    (measured 0.002; the uncalibrated balanced forest is off by 0.09 per row).
    """
    X, y, _ = entropy_data(2000, seed=10)
    Xt, yt, pt = entropy_data(2000, seed=11)
    clf = SentinelClassifier(n_estimators=60, max_depth_grid=(3, 5), min_samples_split_grid=(2,),
                             random_state=0).fit(X, y)
    p = clf.predict_proba(Xt)[:, 1]
    oracle = roc_auc_score(yt, pt)
    auc = roc_auc_score(yt, p)
    assert oracle > 0.85
    assert auc > oracle - 0.03
    assert np.mean(np.abs(p - pt)) < 0.05
    assert abs(p.mean() - pt.mean()) < 0.02
    # calibration is what brings the level there
    raw = clf.pipeline_.predict_proba(Xt)[:, 1]
    assert np.mean(np.abs(p - pt)) < np.mean(np.abs(raw - pt))


@pytest.mark.parametrize(
    "y, match",
    [
        (np.ones(50, bool), "one class only.*all correct"),
        (np.zeros(50, int), "one class only.*all wrong"),
        (np.r_[np.ones(49), 0].astype(int), "at least 2"),
        (np.r_[np.zeros(25), np.full(25, 2)], "bool or 0/1"),
        (np.r_[np.zeros(25), np.ones(24)], r"shape \(50,\)"),
    ],
)
def test_degenerate_labels_raise(y, match):
    X = np.random.default_rng(0).normal(size=(50, 11))
    with pytest.raises(ValueError, match=match):
        SentinelClassifier(n_estimators=5).fit(X, y)


def test_bad_inputs_raise(fitted):
    X = np.zeros((10, 11))
    X[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 feature rows hold NaN/inf; first: row 3, feature .q25."):
        SentinelClassifier().fit(X, np.r_[np.zeros(5), np.ones(5)])
    with pytest.raises(ValueError, match=r"shape \(n, 11\)"):
        fitted.predict_proba(np.zeros((3, 10)))
    with pytest.raises(RuntimeError, match="not fitted"):
        SentinelClassifier().predict_proba(np.zeros((1, 11)))


def test_minority_of_two_uses_two_folds():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 11))
    y = np.zeros(40, bool)
    y[[3, 17]] = True
    clf = SentinelClassifier(n_estimators=5, max_depth_grid=(3,), min_samples_split_grid=(2,))
    clf.fit(X, y)
    assert clf.n_splits_ == 2
    assert clf.predict_proba(X).shape == (40, 2)
