"""Writer of the sentinel ONNX graph from fitted scikit-learn parts.

Graph (input features: float64 of shape (n, n_features); outputs float64)::

    features -> Sub(mean) -> Div(scale)            StandardScaler, exactly sklearn's ops
             -> Cast(float32) -> Cast(float64)     sklearn's trees compare float32 inputs
             -> TreeEnsemble (ai.onnx.ml opset 5, double thresholds, SUM) -> Div(n_trees)
             -> p_forest (n,)                      RandomForest P(correct), sklearn's mean
             -> Clip(X_min_, X_max_) -> count(x_thr < x) -> Gather -> lerp
             -> p_correct (n,)                     IsotonicRegression.predict, exactly
             -> Concat(1 - p, p) -> probabilities (n, 2)

Why the graph is built by hand and not by skl2onnx: skl2onnx's
TreeEnsembleClassifier output is float32 (ai.onnx.ml opset <= 3), and a
steep isotonic segment amplifies that rounding beyond 1e-5; its isotonic
converter is off by up to 0.05. skl2onnx stays the reference for the forest:
``tests/test_onnx_graph.py`` checks this graph's forest against its conversion
within float32 tolerance. The opsets (IR 10, opset 21, ai.onnx.ml 5) set the
floors ``onnx>=1.16`` and ``onnxruntime>=1.21`` (first TreeEnsemble(5) kernel).
The isotonic part here reproduces scipy.interpolate.interp1d(kind="linear"), which
sklearn.isotonic.IsotonicRegression.predict calls after clipping:
i = clip(searchsorted(x, v, "left"), 1, m - 1), then
slope = (y[i] - y[i-1]) / (x[i] - x[i-1]); p = slope * (v - x[i-1]) + y[i-1].

The file format (metadata, loading, scoring) is :mod:`sentinel_vllm.sentinel_file`.

References: arXiv 2601.09001, Sec. 3.3 (classifier and calibration).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sentinel_vllm.sentinel_file import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_P,
    OUTPUT_PROBA,
    sentinel_id,
)

__all__ = ["build_sentinel_model", "write_sentinel"]


def _forest_arrays(forest) -> dict:
    """TreeEnsemble (ai.onnx.ml v5) attributes giving sum_t P_t(class 1) of a fitted forest.

    Per tree, the leaf weight is sklearn's ``DecisionTreeClassifier.predict_proba``
    column 1: ``value[leaf] / value[leaf].sum()`` (a zero sum divides by 1).
    """
    feat, split, tn, tl, fn, fl, roots, lw = [], [], [], [], [], [], [], []
    n_leaves = 0
    for est in forest.estimators_:
        t = est.tree_
        left, right = t.children_left, t.children_right
        is_leaf = left == -1
        val = t.value[:, 0, :].astype(np.float64)
        norm = val.sum(axis=1)
        norm[norm == 0.0] = 1.0
        w1 = val[:, 1] / norm
        node_ix = np.cumsum(~is_leaf) - 1 + len(feat)
        leaf_ix = np.cumsum(is_leaf) - 1 + n_leaves
        if is_leaf[0]:  # a one-leaf tree: a dummy node whose two branches reach the leaf
            roots.append(len(feat))
            feat.append(0), split.append(0.0)
            tn.append(int(leaf_ix[0])), tl.append(1), fn.append(int(leaf_ix[0])), fl.append(1)
        else:
            roots.append(int(node_ix[0]))
            for i in np.flatnonzero(~is_leaf):
                feat.append(int(t.feature[i]))
                split.append(float(t.threshold[i]))  # x <= threshold goes left (true)
                for child, ids, flags in ((left[i], tn, tl), (right[i], fn, fl)):
                    ids.append(int(leaf_ix[child] if is_leaf[child] else node_ix[child]))
                    flags.append(int(is_leaf[child]))
        lw.extend(w1[is_leaf].tolist())
        n_leaves += int(is_leaf.sum())
    return dict(feat=feat, split=split, tn=tn, tl=tl, fn=fn, fl=fl, roots=roots, lw=lw,
                n_leaves=n_leaves)


def build_sentinel_model(scaler, forest, isotonic, metadata: dict):
    """Build the sentinel ONNX graph from fitted scikit-learn parts.

    Parameters
    ----------
    scaler : sklearn.preprocessing.StandardScaler or None
    forest : sklearn.ensemble.RandomForestClassifier
        Binary, one output, fitted on the scaler's output.
    isotonic : sklearn.isotonic.IsotonicRegression or None
        Fitted on the forest's P(class 1) with ``out_of_bounds="clip"``; None
        for an uncalibrated sentinel.
    metadata : dict
        JSON-serialisable; must hold the keys of the schema (see :class:`Sentinel`).

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    ValueError
        A multi-output or non-binary forest, an isotonic model that does not
        clip, or thresholds that are not strictly increasing.
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    if getattr(forest, "n_outputs_", 1) != 1 or len(forest.classes_) != 2:
        raise ValueError("the sentinel forest must be a binary single-output classifier")
    n_feat = int(forest.n_features_in_)
    if len(metadata["feature_names"]) != n_feat:
        raise ValueError(f"{len(metadata['feature_names'])} feature names for a forest of "
                         f"{n_feat} features")
    inits, nodes = [], []

    def const(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(h.make_node(op, ins, [out], name=out + "_op", **kw))
        return out

    x = INPUT_NAME
    if scaler is not None:  # sklearn: X -= mean_; X /= scale_ (float64)
        if getattr(scaler, "with_mean", True) and scaler.mean_ is not None:
            x = node("Sub", [x, const("scaler_mean", scaler.mean_.astype(np.float64))], "centred")
        if getattr(scaler, "with_std", True) and scaler.scale_ is not None:
            x = node("Div", [x, const("scaler_scale", scaler.scale_.astype(np.float64))], "scaled")
    x = node("Cast", [x], "as_float32", to=TP.FLOAT)  # sklearn trees see float32 inputs
    x = node("Cast", [x], "tree_input", to=TP.DOUBLE)
    a = _forest_arrays(forest)
    nodes.append(h.make_node(
        "TreeEnsemble", [x], ["forest_sum"], name="forest", domain="ai.onnx.ml",
        aggregate_function=1, n_targets=1, post_transform=0, tree_roots=a["roots"],
        nodes_featureids=a["feat"], nodes_splits=nh.from_array(np.array(a["split"], np.float64)),
        nodes_modes=nh.from_array(np.zeros(len(a["feat"]), np.uint8)),  # BRANCH_LEQ
        nodes_truenodeids=a["tn"], nodes_trueleafs=a["tl"],
        nodes_falsenodeids=a["fn"], nodes_falseleafs=a["fl"],
        leaf_targetids=[0] * a["n_leaves"], leaf_weights=nh.from_array(np.array(a["lw"]))))
    x = node("Div", ["forest_sum", const("n_trees", np.array(float(len(forest.estimators_))))],
             "forest_p2d")  # sklearn: sum of tree probabilities, then / n_trees
    p = node("Reshape", [x, const("flat", np.array([-1], np.int64))], "p_forest")
    if isotonic is not None:
        p = _isotonic_nodes(p, isotonic, const, node)
    else:
        p = node("Identity", [p], "p_iso")
    node("Identity", [p], OUTPUT_P)
    q = node("Sub", [const("one", np.array(1.0)), OUTPUT_P], "p_wrong")
    cols = [node("Unsqueeze", [v, const(f"ax1_{v}", np.array([1], np.int64))], v + "_col")
            for v in (q, OUTPUT_P)]
    node("Concat", cols, OUTPUT_PROBA, axis=1)

    graph = h.make_graph(
        nodes, "sentinel",
        [h.make_tensor_value_info(INPUT_NAME, TP.DOUBLE, ["n", n_feat])],
        [h.make_tensor_value_info(OUTPUT_P, TP.DOUBLE, ["n"]),
         h.make_tensor_value_info(OUTPUT_PROBA, TP.DOUBLE, ["n", 2])],
        initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21),
                                               h.make_opsetid("ai.onnx.ml", 5)],
                         producer_name="sentinel-vllm", ir_version=10,
                         doc_string="Entropy Sentinel P(correct) (arXiv 2601.09001)")
    flat = {
        METADATA_KEY: json.dumps(metadata, sort_keys=True),
        "sentinel.schema_version": str(metadata["schema_version"]),
        "sentinel.entropy": str(metadata["entropy"]),
        "sentinel.k": "" if metadata["k"] is None else str(metadata["k"]),
        "sentinel.feature_names": ",".join(metadata["feature_names"]),
    }
    onnx.helper.set_model_props(model, flat)
    onnx.checker.check_model(model, full_check=True)
    return model


def _isotonic_nodes(p, iso, const, node) -> str:
    """Append ``IsotonicRegression.predict`` (clip + scipy ``interp1d`` linear) to the graph."""
    if getattr(iso, "out_of_bounds", None) != "clip":
        raise ValueError("the isotonic calibrator must use out_of_bounds='clip'")
    xt = np.asarray(iso.X_thresholds_, np.float64)
    yt = np.asarray(iso.y_thresholds_, np.float64)
    if len(xt) == 1:  # sklearn: constant prediction
        zero = node("Mul", [p, const("iso_zero", np.array(0.0))], "iso_zero_p")
        return node("Add", [zero, const("iso_y0", yt[:1])], "p_iso")
    if not np.all(np.diff(xt) > 0):
        raise ValueError("isotonic X_thresholds_ must be strictly increasing (sklearn's are)")
    v = node("Clip", [p, const("iso_lo", np.array(float(iso.X_min_))),
                      const("iso_hi", np.array(float(iso.X_max_)))], "iso_v")
    # searchsorted(xt, v, "left") = number of thresholds strictly below v
    v2 = node("Unsqueeze", [v, const("ax1", np.array([1], np.int64))], "iso_v2")
    below = node("Less", [const("iso_x", xt[None, :]), v2], "iso_below")
    cnt = node("ReduceSum", [node("Cast", [below], "iso_below_i", to=7),
                             const("ax1b", np.array([1], np.int64))], "iso_count", keepdims=0)
    hi = node("Clip", [cnt, const("i1", np.array(1, np.int64)),
                       const("im", np.array(len(xt) - 1, np.int64))], "iso_hi_i")
    lo = node("Sub", [hi, const("i_one", np.array(1, np.int64))], "iso_lo_i")
    xf, yf = const("iso_xt", xt), const("iso_yt", yt)
    x_lo, x_hi = node("Gather", [xf, lo], "x_lo"), node("Gather", [xf, hi], "x_hi")
    y_lo, y_hi = node("Gather", [yf, lo], "y_lo"), node("Gather", [yf, hi], "y_hi")
    slope = node("Div", [node("Sub", [y_hi, y_lo], "dy"), node("Sub", [x_hi, x_lo], "dx")],
                 "slope")
    off = node("Mul", [slope, node("Sub", [v, x_lo], "v_off")], "lerp")
    return node("Add", [off, y_lo], "p_iso")


def write_sentinel(model, path) -> str:
    """Serialise a sentinel ModelProto to ``path`` (atomically) and return its id.

    Returns
    -------
    str
        :func:`sentinel_id` of the bytes written.
    """
    data = model.SerializeToString()
    p = Path(os.fspath(path))
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
    return sentinel_id(data)
