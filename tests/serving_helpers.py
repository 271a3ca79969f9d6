"""A tiny real ONNX sentinel for the serving tests (scikit-learn parts -> onnx_graph.build_sentinel_model)."""

import numpy as np

from sentinel_vllm.features import FEATURE_NAMES


def make_tiny_sentinel(path, *, entropy="full", k=None, seed=0):
    """Fit scaler + 5-tree forest + isotonic on synthetic data; write ``path``; return the parts.

    Correctness is made to depend on the mean entropy (column 0), so P(correct)
    falls with entropy.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.isotonic import IsotonicRegression
    from sklearn.preprocessing import StandardScaler

    from sentinel_vllm.onnx_graph import build_sentinel_model, write_sentinel
    from sentinel_vllm.sentinel_file import SCHEMA_VERSION

    rng = np.random.default_rng(seed)
    X = rng.gamma(2.0, 0.5, size=(200, len(FEATURE_NAMES)))
    y = rng.random(200) < 1.0 / (1.0 + np.exp(3.0 * (X[:, 0] - 1.0)))
    scaler = StandardScaler().fit(X)
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=seed)
    forest.fit(scaler.transform(X), y)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    iso.fit(forest.predict_proba(scaler.transform(X))[:, 1], y)
    meta = {"schema_version": SCHEMA_VERSION, "feature_names": list(FEATURE_NAMES),
            "entropy": entropy, "k": k, "training_slices": ["synthetic"]}
    sid = write_sentinel(build_sentinel_model(scaler, forest, iso, meta), path)
    return sid, scaler, forest, iso


def reference_p(parts, X):
    """scikit-learn's P(correct) for rows X, the oracle of the ONNX graph."""
    _, scaler, forest, iso = parts
    return iso.predict(forest.predict_proba(scaler.transform(np.asarray(X)))[:, 1])
