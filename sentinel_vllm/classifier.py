"""The sentinel model: calibrated random forest (fit, predict_proba, ONNX export).

Authors' recipe (arXiv 2601.09001, Sec. 3.3; docs/method.md "Classifier and
calibration"): StandardScaler + RandomForest (100 trees), grid
``max_depth`` x ``min_samples_split`` selected by ROC-AUC with stratified CV,
``class_weight="balanced_subsample"``, then isotonic calibration. Calibration
here is fitted on the OUT-OF-FOLD P(correct) of the selected pipeline
(``cross_val_predict``) and the final pipeline is refit on all data: exactly
``CalibratedClassifierCV(method="isotonic", ensemble=False)``, one forest to
export instead of an ensemble of ``cv`` forests.

Loading and scoring an exported file: :func:`load_sentinel` (re-exported from
:mod:`sentinel_vllm.sentinel_file`); nothing here reads pickle or joblib files.
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Sequence

import numpy as np

from sentinel_vllm.features import FEATURE_NAMES, check_feature_matrix
from sentinel_vllm.onnx_graph import build_sentinel_model, write_sentinel
from sentinel_vllm.sentinel_file import (
    SCHEMA_VERSION,
    Sentinel,
    SentinelFileError,
    load_sentinel,
)
from sentinel_vllm.series import canonical

__all__ = ["SentinelClassifier", "Sentinel", "SentinelFileError", "load_sentinel"]


def _versions() -> dict:
    import onnx
    import onnxruntime
    import scipy
    import sklearn

    import sentinel_vllm

    return {"sentinel_vllm": sentinel_vllm.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class SentinelClassifier:
    """Calibrated random forest giving P(correct) from trajectory statistics.

    Parameters
    ----------
    n_estimators : int, default 100
    max_depth_grid : sequence of int or None, default (3, 5, 10)
    min_samples_split_grid : sequence of int, default (2, 5, 10)
    class_weight : {"balanced_subsample", "balanced", None}, default "balanced_subsample"
    calibrate : bool, default True
        Isotonic calibration on out-of-fold probabilities.
    cv : int, default 5
        Upper bound on the folds; the folds used are ``min(cv, minority class
        count)`` (as the authors' ``cv = min(5, minority count)``), stratified
        and shuffled with ``random_state``. Used for the grid and the calibration.
    random_state : int, default 0
    n_jobs : int, optional
        Passed to ``GridSearchCV`` and ``cross_val_predict``.

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
        StandardScaler + the selected RandomForestClassifier, refit on all data.
    isotonic_ : sklearn.isotonic.IsotonicRegression or None
    best_params_ : dict
    cv_auroc_ : float
        Mean CV ROC-AUC of the selected grid point.
    oof_auroc_ : float or None
    oof_proba_ : ndarray of float64, shape (n,), or None
        Calibrated out-of-fold P(correct) of the training responses (isotonic applied
        to the out-of-fold forest probabilities); what slice estimators beyond the
        mean (:mod:`sentinel_vllm.quantify`) are fitted on. None without calibration.
        ROC-AUC of the out-of-fold probabilities the calibration was fitted on.
    n_splits_ : int
    classes_ : ndarray of bool, ``[False, True]``
    n_features_in_ : int
    n_train_, n_correct_ : int

    Raises
    ------
    ValueError (from ``fit``)
        ``y`` not binary, only one class, or fewer than 2 samples of the minority
        class (no stratified split exists): no fallback, the message says which.
    """

    def __init__(self, *, n_estimators=100, max_depth_grid=(3, 5, 10),
                 min_samples_split_grid=(2, 5, 10), class_weight="balanced_subsample",
                 calibrate=True, cv=5, random_state=0, n_jobs=None):
        self.n_estimators = n_estimators
        self.max_depth_grid = max_depth_grid
        self.min_samples_split_grid = min_samples_split_grid
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.cv = cv
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X, y) -> "SentinelClassifier":
        """Select, fit and calibrate the forest.

        Parameters
        ----------
        X : array-like of float, shape (n, 11)
            Trajectory statistics, :data:`~sentinel_vllm.features.FEATURE_NAMES` order.
        y : array-like of bool or {0, 1}, shape (n,)
            True where the response was correct.

        Returns
        -------
        self
        """
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.isotonic import IsotonicRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        X = check_feature_matrix(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must have shape ({len(X)},); got {y.shape}")
        if y.dtype != bool:
            vals = set(np.unique(y).tolist())
            if not vals <= {0, 1}:
                raise ValueError(f"y must be bool or 0/1; found values {sorted(vals)[:5]}")
        y = y.astype(bool)
        n_pos = int(y.sum())
        minority = min(n_pos, len(y) - n_pos)
        if minority == 0:
            raise ValueError(f"y has one class only ({'all correct' if n_pos else 'all wrong'}, "
                             f"n={len(y)}): a sentinel needs correct and incorrect examples")
        if minority < 2:
            raise ValueError(f"only {minority} example of the minority class; stratified CV "
                             "(grid selection and calibration) needs at least 2")
        self.n_splits_ = int(min(self.cv, minority))
        folds = StratifiedKFold(self.n_splits_, shuffle=True, random_state=self.random_state)
        pipe = Pipeline([
            ("scaler", StandardScaler()),
            ("forest", RandomForestClassifier(
                n_estimators=self.n_estimators, class_weight=self.class_weight,
                random_state=self.random_state)),
        ])
        grid = {"forest__max_depth": list(self.max_depth_grid),
                "forest__min_samples_split": list(self.min_samples_split_grid)}
        search = GridSearchCV(pipe, grid, scoring="roc_auc", cv=folds, refit=True,
                              n_jobs=self.n_jobs).fit(X, y)
        self.pipeline_ = search.best_estimator_
        self.best_params_ = {k.split("__", 1)[1]: v for k, v in search.best_params_.items()}
        self.cv_auroc_ = float(search.best_score_)
        self.isotonic_ = None
        self.oof_auroc_ = None
        self.oof_proba_ = None
        if self.calibrate:
            from sklearn.base import clone

            oof = cross_val_predict(clone(self.pipeline_), X, y, cv=folds,
                                    method="predict_proba", n_jobs=self.n_jobs)[:, 1]
            self.oof_auroc_ = float(roc_auc_score(y, oof))
            self.isotonic_ = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
            self.isotonic_.fit(oof, y.astype(np.float64))
            self.oof_proba_ = self.isotonic_.predict(oof)
        self.classes_ = np.array([False, True])
        self.n_features_in_ = X.shape[1]
        self.n_train_, self.n_correct_ = len(y), n_pos
        return self

    def _check_fitted(self):
        if not hasattr(self, "pipeline_"):
            raise RuntimeError("SentinelClassifier is not fitted; call fit(X, y) first")

    def predict_proba(self, X) -> np.ndarray:
        """P(incorrect), P(correct).

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of float64, shape (n, 2), columns in ``classes_`` order ``[False, True]``.
        """
        self._check_fitted()
        X = check_feature_matrix(X, self.n_features_in_)
        proba = self.pipeline_.predict_proba(X)
        if self.isotonic_ is None:
            return proba
        p = self.isotonic_.predict(proba[:, 1])
        return np.column_stack([1.0 - p, p])

    def export_onnx(self, path, *, entropy: str = "full", k: int | None = None,
                    training_slices: Sequence[str] = (), extra_metadata: dict | None = None,
                    feature_names: Sequence[str] = FEATURE_NAMES) -> str:
        """Write the fitted sentinel as ONE self-contained ``.onnx`` file.

        Parameters
        ----------
        path : str or path-like
        entropy : str, default "full"
            Entropy series the features were computed from: ``"full"``,
            ``"topk"`` (give ``k``), ``"top<K>"``, ``"topk_renorm"``, ``"top<K>_renorm"``.
        k : int, optional
        training_slices : sequence of str
        extra_metadata : dict, optional
            JSON-serialisable keys added to the metadata (may not shadow schema keys).
        feature_names : sequence of str, default FEATURE_NAMES

        Returns
        -------
        str
            The file's id, ``"sentinel-<12 hex of its sha256>"``.

        Raises
        ------
        ValueError
            Unknown entropy kind, top-k without k, a reserved or non-JSON extra key,
            feature names that do not match the fitted width.
        """
        import json

        self._check_fitted()
        kind, kk = canonical(entropy, k)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "feature_names": [str(f) for f in feature_names],
            "entropy": kind,
            "k": kk,
            "training_slices": [str(s) for s in training_slices],
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "training": {"n": self.n_train_, "n_correct": self.n_correct_,
                         "calibrated": self.isotonic_ is not None,
                         "class_weight": self.class_weight, "n_estimators": self.n_estimators,
                         "best_params": self.best_params_, "cv_auroc": self.cv_auroc_,
                         "oof_auroc": self.oof_auroc_, "n_splits": self.n_splits_},
        }
        for key, val in (extra_metadata or {}).items():
            if key in meta:
                raise ValueError(f"extra_metadata key {key!r} is reserved by the sentinel schema")
            try:
                json.dumps(val)
            except TypeError as e:
                raise ValueError(f"extra_metadata[{key!r}] is not JSON-serialisable: {e}") from None
            meta[key] = val
        model = build_sentinel_model(self.pipeline_.named_steps["scaler"],
                                     self.pipeline_.named_steps["forest"], self.isotonic_, meta)
        return write_sentinel(model, path)
