"""The 11 trajectory statistics of a response's per-step entropy.

The one definition used by training, the kernel and torch paths, serving and
evaluation (docs/method.md, "Trajectory statistics"; arXiv 2601.09001 Sec. 3.2).

Names and order (:data:`FEATURE_NAMES`)::

    mean, std, max, q10, q25, q50, q75, q90, skewness, kurtosis, sum

Convention (identical everywhere in this project), for a trajectory
``x_1..x_T`` of entropies in nats:

* ``mean = sum / T``; ``sum = sum_t x_t`` (accumulated entropy, "SEA");
* ``std`` is the POPULATION standard deviation (``ddof = 0``): ``sigma = sqrt(m2)``
  with central moments ``m_j = mean((x - mean)^j)``;
* ``skewness = m3 / (sigma^3 + 1e-8)``; ``kurtosis = m4 / (sigma^4 + 1e-8)``,
  NOT excess (a normal sample gives about 3). The ``1e-8`` is the authors'
  guard; it makes a constant trajectory give 0 for both. (The authors mix a
  Bessel-corrected sigma with population moments; we use population moments
  throughout, which differs from their numbers by a factor that tends to 1.)
* quantiles by linear interpolation between order statistics (numpy's default,
  ``method="linear"``): ``q = x_(h)`` with ``h = (T - 1) * level``;
* ``max`` is the largest value.

Defined values: ``T = 0`` gives all 11 features 0.0; ``T = 1`` gives
``mean = max = q* = sum = x_1`` and ``std = skewness = kurtosis = 0``.
Non-finite values (NaN, inf) are rejected by :func:`compute_features`; the
kernel paths drop flagged steps before they reach these statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "FEATURE_NAMES",
    "QUANTILE_LEVELS",
    "EPS",
    "compute_features",
    "compute_features_batch",
    "check_feature_matrix",
    "features_from_moments",
]

FEATURE_NAMES: tuple[str, ...] = (
    "mean",
    "std",
    "max",
    "q10",
    "q25",
    "q50",
    "q75",
    "q90",
    "skewness",
    "kurtosis",
    "sum",
)
QUANTILE_LEVELS: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75, 0.90)
EPS = 1e-8
N_FEATURES = len(FEATURE_NAMES)


def features_from_moments(n, total, m2, m3, m4, vmax, quantiles) -> np.ndarray:
    """Assemble the 11 features from a trajectory's summary quantities.

    The single place where the moment formulas live; :func:`compute_features_batch`
    (and through it :func:`compute_features` and the kernel's final gather) calls it.

    Parameters
    ----------
    n : array-like of int, shape (batch,)
        Trajectory length ``T``.
    total : array-like of float, shape (batch,)
        ``sum_t x_t`` (nats).
    m2, m3, m4 : array-like of float, shape (batch,)
        Population central moments ``mean((x - mean)^j)``.
    vmax : array-like of float, shape (batch,)
    quantiles : array-like of float, shape (batch, 5)
        Linear-interpolation quantiles at :data:`QUANTILE_LEVELS`.

    Returns
    -------
    ndarray of float64, shape (batch, 11)
        Columns in :data:`FEATURE_NAMES` order; rows with ``n == 0`` are zeros.
    """
    n = np.asarray(n, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    m2 = np.maximum(np.asarray(m2, dtype=np.float64), 0.0)
    m3 = np.asarray(m3, dtype=np.float64)
    m4 = np.maximum(np.asarray(m4, dtype=np.float64), 0.0)
    q = np.asarray(quantiles, dtype=np.float64).reshape(n.shape[0], len(QUANTILE_LEVELS))
    safe_n = np.where(n > 0, n, 1.0)
    sigma = np.sqrt(m2)
    out = np.empty((n.shape[0], N_FEATURES), dtype=np.float64)
    out[:, 0] = total / safe_n
    out[:, 1] = sigma
    out[:, 2] = np.asarray(vmax, dtype=np.float64)
    out[:, 3:8] = q
    out[:, 8] = m3 / (sigma**3 + EPS)
    out[:, 9] = m4 / (sigma**4 + EPS)
    out[:, 10] = total
    out[n <= 0] = 0.0
    return out


def check_feature_matrix(X, n_features: int | None = None,
                         feature_names: Sequence[str] | None = None) -> np.ndarray:
    """The input check of every model that reads feature rows (estimator and sentinel file).

    Parameters
    ----------
    X : array-like of float, shape (n, n_features)
    n_features : int, optional
        Required width; any width when None.
    feature_names : sequence of str, optional
        Column names, for the messages (default: :data:`FEATURE_NAMES` when the width is 11).

    Returns
    -------
    ndarray of float64, C-contiguous, shape (n, n_features)

    Raises
    ------
    ValueError
        Not two-dimensional, the wrong width, or a NaN/inf (the message counts the rows
        and names the first row and feature).
    """
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2 or (n_features is not None and X.shape[1] != n_features):
        want = "(n, n_features)" if n_features is None else f"(n, {n_features})"
        order = f" in the order {list(feature_names)}" if feature_names is not None else ""
        raise ValueError(f"features must have shape {want}{order}; got shape {X.shape}")
    bad = ~np.isfinite(X)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        names = list(feature_names) if feature_names is not None else (
            list(FEATURE_NAMES) if X.shape[1] == N_FEATURES else None)
        col = repr(names[c]) if names is not None else str(int(c))
        raise ValueError(f"{int(bad.any(axis=1).sum())} feature rows hold NaN/inf; first: "
                         f"row {r}, feature {col} = {X[r, c]}")
    return X


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"entropy trajectory has non-finite values at steps {bad}")


def compute_features(trajectory: Iterable[float]) -> np.ndarray:
    """The 11 statistics of one entropy trajectory.

    The batch of one of :func:`compute_features_batch` (one code path for training,
    evaluation and serving).

    Parameters
    ----------
    trajectory : array-like of float, shape (T,)
        Per-step entropies in nats, ``T >= 0``.

    Returns
    -------
    ndarray of float64, shape (11,)
        In :data:`FEATURE_NAMES` order (see the module docstring for the convention).

    Raises
    ------
    ValueError
        If the trajectory is not one-dimensional or has a non-finite value.
    """
    if not isinstance(trajectory, (np.ndarray, list, tuple)):
        trajectory = list(trajectory)
    x = np.asarray(trajectory, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"trajectory must be 1-D, got shape {x.shape}")
    return compute_features_batch(x[None, :], [x.size])[0]


def compute_features_batch(padded, lengths) -> np.ndarray:
    """The 11 statistics of many trajectories stored as a padded matrix.

    Moments from masked sums; quantiles by :func:`numpy.nanquantile` (linear
    interpolation) over the rows with the padding set to NaN.

    Parameters
    ----------
    padded : array-like of float, shape (batch, max_len)
        Row ``i`` holds trajectory ``i`` in its first ``lengths[i]`` entries;
        the rest is ignored.
    lengths : array-like of int, shape (batch,)

    Returns
    -------
    ndarray of float64, shape (batch, 11)
        Row ``i`` is :func:`compute_features` of ``padded[i, :lengths[i]]``.

    Raises
    ------
    ValueError
        On shape mismatch, a length outside ``[0, max_len]`` or a non-finite value
        inside a trajectory.
    """
    x = np.asarray(padded, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.int64)
    if x.ndim != 2 or n.shape != (x.shape[0],):
        raise ValueError(f"padded must be (batch, max_len) and lengths (batch,), got {x.shape}, {n.shape}")
    if (n < 0).any() or (n > x.shape[1]).any():
        raise ValueError("lengths must lie in [0, max_len]")
    mask = np.arange(x.shape[1])[None, :] < n[:, None]
    _check_finite(x[mask])
    safe_n = np.maximum(n, 1)
    total = np.where(mask, x, 0.0).sum(1)
    d = np.where(mask, x - (total / safe_n)[:, None], 0.0)
    m2, m3, m4 = ((d**j).sum(1) / safe_n for j in (2, 3, 4))
    vmax = np.where(n > 0, np.where(mask, x, -np.inf).max(1, initial=-np.inf), 0.0)
    q = np.zeros((x.shape[0], len(QUANTILE_LEVELS)))
    some = n > 0
    if some.any():
        q[some] = np.nanquantile(np.where(mask, x, np.nan)[some], QUANTILE_LEVELS, axis=1).T
    return features_from_moments(n, total, m2, m3, m4, vmax, q)
