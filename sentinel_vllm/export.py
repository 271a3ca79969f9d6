"""The sentinel file: one self-contained ONNX graph, its metadata, and its loader.

Graph (input ``features``: float64 of shape (n, n_features); outputs float64)::

    features -> Sub(mean) -> Div(scale)            StandardScaler, exactly sklearn's ops
             -> Cast(float32) -> Cast(float64)     sklearn's trees compare float32 inputs
             -> TreeEnsemble (ai.onnx.ml opset 5, double thresholds, SUM) -> Div(n_trees)
             -> p_forest (n,)                      RandomForest P(correct), sklearn's mean
             -> Clip(X_min_, X_max_) -> count(x_thr < x) -> Gather -> lerp
             -> p_correct (n,)                     IsotonicRegression.predict, exactly
             -> Concat(1 - p, p) -> probabilities (n, 2)

Why not skl2onnx for the forest: its ``TreeEnsembleClassifier`` output is float32
(ai.onnx.ml opset <= 3), and a steep isotonic segment amplifies that rounding
beyond 1e-5; its isotonic converter does not reproduce scikit-learn either.
The isotonic part reproduces ``scipy.interpolate.interp1d(kind="linear")``, which
``sklearn.isotonic.IsotonicRegression.predict`` calls after clipping:
``i = clip(searchsorted(x, v, "left"), 1, m - 1)``, then
``slope = (y[i] - y[i-1]) / (x[i] - x[i-1]); p = slope * (v - x[i-1]) + y[i-1]``.

Metadata lives in ``ModelProto.metadata_props``: the whole dict as JSON under
the key ``"sentinel"``, plus flat copies ``sentinel.schema_version``,
``sentinel.entropy``, ``sentinel.k`` and ``sentinel.feature_names`` for tools
such as Netron. The format is ONNX only: no pickle or joblib is ever read.

References: arXiv 2601.09001, Sec. 3.3 (classifier and calibration); method.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sentinel_vllm.features import FEATURE_NAMES

__all__ = [
    "SCHEMA_VERSION",
    "INPUT_NAME",
    "OUTPUT_P",
    "OUTPUT_PROBA",
    "METADATA_KEY",
    "SentinelFileError",
    "Sentinel",
    "load_sentinel",
    "sentinel_id",
    "normalise_entropy",
    "DEFAULT_SENTINEL",
    "resolve_sentinel_path",
]

SCHEMA_VERSION = 1
INPUT_NAME = "features"
OUTPUT_P = "p_correct"
OUTPUT_PROBA = "probabilities"
METADATA_KEY = "sentinel"
_REQUIRED_META = ("schema_version", "feature_names", "entropy", "k")

#: The embedded default sentinel, addressable as ``"default"`` wherever a sentinel file is named.
DEFAULT_SENTINEL = Path(__file__).resolve().parent / "data" / "default.onnx"


def resolve_sentinel_path(arg) -> Path:
    """Path of a sentinel named by the user; ``"default"`` (or None) is the embedded one.

    Raises
    ------
    SentinelFileError
        ``"default"`` while no default sentinel ships with this install.
    """
    if arg is None or str(arg) == "default":
        if not DEFAULT_SENTINEL.is_file():
            raise SentinelFileError(
                "no default sentinel is bundled with this install "
                f"(expected {DEFAULT_SENTINEL}); train one with `sentinel-vllm train` and pass its .onnx path"
            )
        return DEFAULT_SENTINEL
    return Path(os.fspath(arg))


class SentinelFileError(ValueError):
    """A sentinel file is missing, unreadable, not ONNX, of the wrong schema, or
    does not match the features/entropy it is asked to score."""


def sentinel_id(data: bytes) -> str:
    """Identifier of a sentinel file: ``"sentinel-"`` + first 12 hex of its sha256.

    Parameters
    ----------
    data : bytes
        The file's content.

    Returns
    -------
    str
    """
    return "sentinel-" + hashlib.sha256(data).hexdigest()[:12]


def normalise_entropy(entropy: str, k: int | None = None) -> tuple[str, int | None]:
    """Canonical ``(kind, k)`` of an entropy series: ``("full", None)``,
    ``("topk", k)`` or ``("topk_renorm", k)``.

    ``"top20"`` equals ``("topk", 20)``; ``"topk"`` needs ``k``. Uses
    :func:`sentinel_vllm.traces.series_key` (the one home of series names).

    Raises
    ------
    ValueError
        Unknown name, a top-k kind without k, or a name whose k contradicts ``k``.
    """
    from sentinel_vllm.traces import series_key

    name, kk = series_key(entropy, k)
    if name == "full":
        return "full", None
    if kk is None:
        raise ValueError(f"entropy {entropy!r} needs k (the top-k size)")
    if k is not None and int(k) != int(kk):
        raise ValueError(f"entropy {entropy!r} says k={kk} but k={k} was given")
    return name, int(kk)


def _describe(entropy: str, k) -> str:
    return entropy if k is None else f"{entropy} (k={k})"


class Sentinel:
    """A loaded sentinel: an onnxruntime session and the file's metadata.

    Use :func:`load_sentinel` to make one. Thread-safe for scoring
    (``InferenceSession.run`` is).

    Attributes
    ----------
    id : str
        ``"sentinel-<12 hex of the file's sha256>"``.
    path : str
    metadata : dict
        feature_names (list of str), entropy (str), k (int or None),
        schema_version (int), training_slices (list), versions (dict of library
        versions), created (ISO 8601 UTC), training (dict), plus any extra keys.
    n_features : int
    """

    def __init__(self, session, metadata: dict, id: str, path: str):
        self._session = session
        self.metadata = metadata
        self.id = id
        self.path = path
        self.n_features = len(metadata["feature_names"])

    def __repr__(self) -> str:
        m = self.metadata
        return f"Sentinel({self.id}, entropy={_describe(m['entropy'], m['k'])}, path={self.path!r})"

    def _check_X(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (n, {self.n_features}) in the order "
                f"{self.metadata['feature_names']}; got shape {X.shape}"
            )
        bad = ~np.isfinite(X)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"{int(bad.any(axis=1).sum())} feature rows hold NaN/inf; first: row {r}, "
                f"feature {self.metadata['feature_names'][c]!r} = {X[r, c]}"
            )
        return np.ascontiguousarray(X)

    def predict_proba(self, X) -> np.ndarray:
        """P(incorrect), P(correct) per row.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features)
            Trajectory statistics in ``metadata["feature_names"]`` order.

        Returns
        -------
        ndarray of float64, shape (n, 2), columns ``[False, True]``.

        Raises
        ------
        ValueError
            Wrong shape or non-finite values (the message names the first).
        """
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros((0, 2))
        return self._check_p(self._session.run([OUTPUT_PROBA], {INPUT_NAME: X})[0])

    def p_correct(self, X) -> np.ndarray:
        """P(correct) per row: ndarray of float64, shape (n,). See :meth:`predict_proba`."""
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros(0)
        return self._check_p(self._session.run([OUTPUT_P], {INPUT_NAME: X})[0])

    def _check_p(self, p: np.ndarray) -> np.ndarray:
        """Refuse graph outputs that are not probabilities (a crafted or broken file)."""
        if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise SentinelFileError(
                f"sentinel {self.id} ({self.path}) returned values outside [0, 1]; "
                "the file is not a valid sentinel"
            )
        return p

    def check_compatible(self, feature_names: Sequence[str], entropy: str, k: int | None = None):
        """Refuse features or an entropy series the sentinel was not trained on.

        Parameters
        ----------
        feature_names : sequence of str
            Names and order of the columns that will be scored.
        entropy : str
            ``"full"``, ``"topk"`` (with ``k``), ``"top<K>"``, ``"topk_renorm"`` or
            ``"top<K>_renorm"``.
        k : int, optional

        Raises
        ------
        SentinelFileError
            Naming the mismatch (feature schema, entropy kind, or k).
        """
        want = list(self.metadata["feature_names"])
        got = list(feature_names)
        if got != want:
            missing = [f for f in want if f not in got]
            extra = [f for f in got if f not in want]
            detail = (f"missing {missing}, unexpected {extra}" if missing or extra
                      else "same names in another order")
            raise SentinelFileError(
                f"sentinel {self.id} expects features {want}; given {got} ({detail})"
            )
        try:
            kind = normalise_entropy(entropy, k)
        except ValueError as e:
            raise SentinelFileError(f"sentinel {self.id}: {e}") from None
        mine = (self.metadata["entropy"], self.metadata["k"])
        if kind != mine:
            raise SentinelFileError(
                f"sentinel {self.id} was trained on {_describe(*mine)} entropy; "
                f"given {_describe(*kind)} entropy"
            )


def _fail(path, why: str):
    raise SentinelFileError(f"{path}: {why}")


def _read_metadata(model, path) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        _fail(path, f"an ONNX file without '{METADATA_KEY}' metadata: not a sentinel file")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        _fail(path, f"'{METADATA_KEY}' metadata is not valid JSON ({e})")
    if not isinstance(meta, dict):
        _fail(path, f"'{METADATA_KEY}' metadata must be a JSON object")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        _fail(path, f"sentinel metadata lacks {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        _fail(path, f"sentinel schema_version {meta['schema_version']!r}; this sentinel-vllm "
                    f"reads version {SCHEMA_VERSION} (retrain or upgrade)")
    names = meta["feature_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        _fail(path, f"feature_names must be a non-empty list of str, got {names!r}")
    try:
        meta["entropy"], meta["k"] = normalise_entropy(meta["entropy"], meta["k"])
    except (ValueError, TypeError) as e:
        _fail(path, f"bad entropy kind in metadata: {e}")
    return meta


def _check_graph(model, meta, path) -> None:
    from onnx import TensorProto

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        _fail(path, f"expected one input {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    n = len(meta["feature_names"])
    if tt.elem_type != TensorProto.DOUBLE or len(dims) != 2 or dims[1] != n:
        _fail(path, f"input {INPUT_NAME!r} must be float64 of shape (n, {n}); found elem_type "
                    f"{tt.elem_type}, dims {dims}")
    outs = {o.name for o in g.output}
    if not {OUTPUT_P, OUTPUT_PROBA} <= outs:
        _fail(path, f"outputs must include {OUTPUT_P!r} and {OUTPUT_PROBA!r}; found {sorted(outs)}")


def load_sentinel(
    path,
    *,
    feature_names: Sequence[str] | None = None,
    entropy: str | None = None,
    k: int | None = None,
    intra_op_num_threads: int | None = None,
) -> Sentinel:
    """Load a sentinel ``.onnx`` file and open an onnxruntime session on it.

    Parameters
    ----------
    path : str or path-like
    feature_names, entropy, k : optional
        If ``entropy`` is given, :meth:`Sentinel.check_compatible` is run with
        these (``feature_names`` defaults to :data:`~sentinel_vllm.features.FEATURE_NAMES`).
    intra_op_num_threads : int, optional
        onnxruntime threads per call (1 is fastest for single requests).

    Returns
    -------
    Sentinel

    Raises
    ------
    SentinelFileError
        (a ``ValueError``) for a missing or unreadable file, a pickle/joblib
        file, a file that is not ONNX, an ONNX file without sentinel metadata or
        with another schema, or a mismatch with ``feature_names``/``entropy``/``k``.
    """
    is_default = path is None or str(path) == "default"
    p = resolve_sentinel_path(path)
    if not p.exists():
        _fail(p, "no such sentinel file")
    if p.is_dir():
        _fail(p, "is a directory, not a sentinel .onnx file")
    try:
        data = p.read_bytes()
    except OSError as e:
        _fail(p, f"cannot read sentinel file ({e.strerror or e})")
    if not data:
        _fail(p, "empty file, not an ONNX sentinel")
    if data[:1] == b"\x80" or data[:2] == b"PK":
        _fail(p, "looks like a pickle/joblib/zip file; sentinel files are ONNX only and "
                 "sentinel-vllm never loads pickles (export with SentinelClassifier.export_onnx)")
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        _fail(p, f"not an ONNX file ({type(e).__name__}: {e})")
    if not model.graph.node:
        _fail(p, "not an ONNX sentinel (no graph)")
    meta = _read_metadata(model, p)
    _check_graph(model, meta, p)
    import onnxruntime as ort

    so = ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    try:
        sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        _fail(p, f"onnxruntime cannot load it ({type(e).__name__}: {e})")
    sent = Sentinel(sess, meta, sentinel_id(data), str(p))
    if is_default:
        import logging

        logging.getLogger("sentinel_vllm").warning(
            "using the embedded default sentinel %s, trained on %s traces of %s: estimates for "
            "another model are unvalidated (check AUROC on 100-200 labelled responses first)",
            sent.id, meta.get("trained_for_model", "an unknown model"),
            "+".join(meta.get("training_slices") or []) or "unknown slices")
    if entropy is not None:
        sent.check_compatible(FEATURE_NAMES if feature_names is None else feature_names, entropy, k)
    return sent


# --------------------------------------------------------------------------- writing


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
