"""Slice estimators from the quantification literature (QuaPy), beside the paper's.

The paper's slice estimate is the mean calibrated P(correct) (probabilistic
classify-and-count, ``pcc``). QuaPy's aggregative methods correct for a change of
class prevalence between training and target; they assume the class-conditional
distribution of the classifier's output does not move (prior shift only), which
across benchmarks it does. They are offered as an ablation under the
leave-one-benchmark-out protocol (:mod:`sentinel_vllm.protocol`).

Every method is fitted on the training set's OUT-OF-FOLD calibrated P(correct)
and labels (so the misclassification rates are not in-sample) and applied to the
target slice's P(correct); the sentinel's forest is not refitted.

=========  ==========================================================
``pcc``    mean P(correct) (the paper's estimate; QuaPy's PCC)
``acc``    adjusted classify-and-count (threshold 0.5), QuaPy ``ACC``
``pacc``   probabilistic ACC, QuaPy ``PACC``
``emq``    EM of Saerens et al. (SLD), QuaPy ``EMQ``
``hdy``    Hellinger-distance mixture model, QuaPy ``HDy``
``kdey``   KDE mixture by maximum likelihood, QuaPy ``KDEyML``
=========  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ESTIMATORS", "fit_quantifiers"]

ESTIMATORS: tuple[str, ...] = ("pcc", "acc", "pacc", "emq", "hdy", "kdey")


def _fitted_stub():
    """A fitted scikit-learn classifier with ``classes_ = [0, 1]``: QuaPy checks that its
    classifier is fitted and reads ``classes_``; the posteriors come from the sentinel
    and never pass through this stub."""
    from sklearn.dummy import DummyClassifier

    return DummyClassifier().fit(np.zeros((2, 1)), [0, 1])


def _two_col(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 0.0, 1.0)
    return np.column_stack([1.0 - p, p])


def fit_quantifiers(p_train, y_train, names: Sequence[str] = ESTIMATORS,
                    random_state: int = 0) -> dict[str, Callable[[np.ndarray], float]]:
    """Fit slice estimators on (out-of-fold) P(correct) and labels.

    Parameters
    ----------
    p_train : array-like of float, shape (n,)
        Out-of-fold calibrated P(correct) of the training responses.
    y_train : array-like of {0, 1} or bool, shape (n,)
    names : sequence of str
        Subset of :data:`ESTIMATORS`.
    random_state : int

    Returns
    -------
    dict[str, callable]
        ``name -> f(p_target) -> estimated accuracy in [0, 1]`` (NaN for an empty target).

    Raises
    ------
    ValueError
        Unknown estimator name, or a training set with one class only.
    """
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; known: {', '.join(ESTIMATORS)}")
    y = np.asarray(y_train).astype(int)
    P = _two_col(p_train)
    if y.min() == y.max():
        raise ValueError("estimators need correct and incorrect training responses")
    out: dict[str, Callable[[np.ndarray], float]] = {}
    if "pcc" in names:
        out["pcc"] = lambda p: float(np.mean(p)) if len(p) else float("nan")
    quapy_names = [n for n in names if n != "pcc"]
    if not quapy_names:
        return out
    import warnings

    from quapy.method import aggregative as ag

    makers = {"acc": ag.ACC, "pacc": ag.PACC, "emq": ag.EMQ, "hdy": ag.HDy, "kdey": ag.KDEyML}
    for name in quapy_names:
        kw = {"random_state": random_state} if name == "kdey" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "emq":
                q = ag.EMQ(_fitted_stub(), fit_classifier=False, val_split=None, **kw)
            else:
                q = makers[name](_fitted_stub(), fit_classifier=False, **kw)
            if name == "acc":
                q.aggregation_fit((P[:, 1] >= 0.5).astype(int), y)
            else:
                q.aggregation_fit(P, y)
            if name == "emq":
                q.train_prevalence = np.array([1.0 - y.mean(), y.mean()])
        out[name] = _applier(q, crisp=name == "acc")
    return out


def _applier(q, crisp: bool) -> Callable[[np.ndarray], float]:
    def apply(p) -> float:
        import warnings

        p = np.asarray(p, dtype=np.float64)
        if p.size == 0:
            return float("nan")
        P = _two_col(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prev = q.aggregate((P[:, 1] >= 0.5).astype(int) if crisp else P)
        return float(np.clip(prev[1], 0.0, 1.0))

    return apply
