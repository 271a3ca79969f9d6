"""Scoring latency: the ONNX sentinel (onnxruntime) against scikit-learn predict_proba.

Both score the same fitted sentinel (StandardScaler + RandomForest + isotonic)
on the same rows, interleaved call by call so machine noise hits both alike.
Cases: one request (batch 1, onnxruntime with intra_op_num_threads=1, the
serving configuration) and a batch (default 256 rows). Medians with the
interquartile range, in milliseconds; the ratio is sklearn / onnxruntime
(> 1 means onnxruntime is faster). Target (issue 6): >= 10x for one request.

Usage::

    python benchmarks/bench_scoring.py [--batch 256] [--repeats 300] [--full-grid]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np


def synthetic(n, seed):
    """Entropy-like features and labels: P(correct) = sigmoid(3 - 3 * mean entropy)."""
    from sentinel_vllm.features import compute_features

    rng = np.random.default_rng(seed)
    X = np.empty((n, 11))
    for i in range(n):
        s = np.exp(rng.uniform(np.log(0.05), np.log(3.0)))
        X[i] = compute_features(rng.gamma(1.5, s / 1.5, size=int(rng.integers(5, 200))))
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-(3.0 - 3.0 * X[:, 0])))
    return X, y


def time_pair(fa, fb, rows, repeats):
    """Interleaved timings (seconds) of fa(rows) and fb(rows); a warm-up call each first."""
    fa(rows), fb(rows)
    ta, tb = np.empty(repeats), np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fa(rows)
        t1 = time.perf_counter()
        fb(rows)
        t2 = time.perf_counter()
        ta[i], tb[i] = t1 - t0, t2 - t1
    return ta, tb


def fmt(t):
    q1, med, q3 = np.percentile(t * 1e3, [25, 50, 75])
    return f"{med:8.3f} [{q1:.3f}-{q3:.3f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--full-grid", action="store_true",
                    help="the authors' 3x3 grid (slower fit); default: max_depth=10, split=2")
    args = ap.parse_args(argv)

    import onnxruntime
    import sklearn

    from sentinel_vllm.classifier import SentinelClassifier, load_sentinel

    X, y = synthetic(args.n_train, seed=0)
    grid = {} if args.full_grid else dict(max_depth_grid=(10,), min_samples_split_grid=(2,))
    t0 = time.perf_counter()
    clf = SentinelClassifier(**grid, random_state=0).fit(X, y)
    fit_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.onnx")
        sid = clf.export_onnx(path)
        size = os.path.getsize(path)
        one = load_sentinel(path, intra_op_num_threads=1)
        multi = load_sentinel(path)
    Xq, _ = synthetic(max(args.batch, 64), seed=1)
    forest = clf.pipeline_.named_steps["forest"]
    print(f"# bench_scoring  {datetime.date.today()}  {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, scikit-learn "
          f"{sklearn.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"# sentinel {sid}: {forest.n_estimators} trees, best {clf.best_params_}, "
          f"{sum(e.tree_.node_count for e in forest.estimators_)} nodes, isotonic "
          f"{len(clf.isotonic_.X_thresholds_)} thresholds, file {size / 1e6:.2f} MB, "
          f"fit {fit_s:.1f} s on {args.n_train} rows")
    print(f"# max |onnx - sklearn| on the batch: "
          f"{np.abs(one.predict_proba(Xq) - clf.predict_proba(Xq)).max():.2e}")
    print("# median [IQR] ms per call, interleaved; ratio = sklearn / onnxruntime")
    print("| case | rows | sklearn predict_proba (ms) | onnxruntime (ms) | ratio |")
    print("|---|---|---|---|---|")
    cases = [("one request, ort 1 thread", Xq[:1], one),
             ("batch, ort 1 thread", Xq[: args.batch], one),
             ("batch, ort default threads", Xq[: args.batch], multi)]
    for name, rows, sent in cases:
        ta, tb = time_pair(clf.predict_proba, sent.predict_proba, rows, args.repeats)
        print(f"| {name} | {len(rows)} | {fmt(ta)} | {fmt(tb)} | "
              f"{np.median(ta) / np.median(tb):6.1f}x |")
    sess = one._session
    ta, tb = time_pair(lambda r: sess.run(["p_correct"], {"features": r}),
                       one.p_correct, Xq[:1], args.repeats)
    print(f"# one request, onnxruntime alone (not interleaved with sklearn): raw session.run "
          f"{np.median(ta) * 1e6:.0f} us, Sentinel.p_correct (with input checks) "
          f"{np.median(tb) * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
