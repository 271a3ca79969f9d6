"""The ONNX sentinel: parity with predict_proba, metadata, refusals, no pickles."""

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from sklearn.ensemble import RandomForestClassifier
from sklearn.isotonic import IsotonicRegression

from sentinel_vllm import onnx_graph
from sentinel_vllm import sentinel_file as export
from sentinel_vllm.features import FEATURE_NAMES
from sentinel_vllm.classifier import SentinelClassifier, SentinelFileError, load_sentinel
from test_classifier import entropy_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fitted():
    X, y, _ = entropy_data(1500, seed=5)
    clf = SentinelClassifier(n_estimators=100, max_depth_grid=(10,), min_samples_split_grid=(2,),
                             random_state=0).fit(X, y)
    return clf, X


@pytest.fixture(scope="module")
def onnx_file(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("sent") / "s.onnx"
    sid = fitted[0].export_onnx(path, entropy="topk", k=20, training_slices=["gsm8k", "math"],
                                extra_metadata={"note": "test"})
    return path, sid


def parity_rows(clf, X, n=10_000, seed=0):
    """Random rows plus rows at tree thresholds, out of range and extreme."""
    rng = np.random.default_rng(seed)
    lo, hi = X.min(0), X.max(0)
    span = hi - lo
    rows = [X[rng.integers(0, len(X), 3000)],                      # training rows
            X[rng.integers(0, len(X), 2000)] * rng.normal(1, 0.05, (2000, 11)),
            rng.uniform(lo - span, hi + span, (2000, 11))]         # in and out of range
    scaler = clf.pipeline_.named_steps["scaler"]
    forest = clf.pipeline_.named_steps["forest"]
    at = X[rng.integers(0, len(X), 2000)].copy()                   # one feature at a split
    for i in range(len(at)):
        t = forest.estimators_[rng.integers(len(forest.estimators_))].tree_
        node = rng.choice(np.flatnonzero(t.children_left != -1))
        f = t.feature[node]
        at[i, f] = t.threshold[node] * scaler.scale_[f] + scaler.mean_[f]
    rows.append(at)
    ext = np.zeros((n - 9000, 11))
    ext[:] = rng.choice([0.0, -1e30, 1e30, 1e-300, -5.0, 1e6], size=ext.shape)
    rows.append(ext)
    return np.vstack(rows)


def test_parity_10000_rows_with_isotonic(fitted, onnx_file):
    clf, X = fitted
    Xt = parity_rows(clf, X)
    assert Xt.shape == (10_000, 11) and clf.isotonic_ is not None
    sent = load_sentinel(onnx_file[0])
    ref = clf.predict_proba(Xt)
    got = sent.predict_proba(Xt)
    assert got.dtype == np.float64 and got.shape == (10_000, 2)
    diff = np.abs(got - ref).max()
    assert diff <= 1e-5            # the contract
    assert diff <= 1e-10           # the construction is exact up to summation order
    np.testing.assert_array_equal(sent.p_correct(Xt), got[:, 1])
    # the parity rows do exercise the calibration's range and many distinct outputs
    assert len(np.unique(ref[:, 1])) > 100 and ref[:, 1].min() < 0.1 < 0.9 < ref[:, 1].max()


def test_parity_uncalibrated_unbalanced(tmp_path):
    X, y, _ = entropy_data(400, seed=7)
    clf = SentinelClassifier(n_estimators=20, max_depth_grid=(None,), min_samples_split_grid=(2,),
                             calibrate=False, class_weight=None).fit(X, y)
    clf.export_onnx(tmp_path / "u.onnx")
    Xt = parity_rows(clf, X, n=10_000, seed=1)
    np.testing.assert_allclose(load_sentinel(tmp_path / "u.onnx").predict_proba(Xt),
                               clf.predict_proba(Xt), rtol=0, atol=1e-12)


def _isotonic_session(iso):
    inits, nodes = [], []

    def const(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(h.make_node(op, ins, [out], **kw))
        return out

    out = onnx_graph._isotonic_nodes("p", iso, const, node)
    g = h.make_graph(nodes, "iso", [h.make_tensor_value_info("p", TP.DOUBLE, ["n"])],
                     [h.make_tensor_value_info(out, TP.DOUBLE, ["n"])], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda v: sess.run(None, {"p": np.asarray(v, np.float64)})[0]


@pytest.mark.parametrize("case, n", [("one_x", 10), ("constant_y", 10), ("small", 40),
                                     ("large", 4000)])
def test_isotonic_graph_matches_sklearn_at_thresholds(case, n):
    rng = np.random.default_rng(n)
    x = rng.random(n)
    y = (rng.random(n) < x).astype(float)
    if case == "one_x":
        x[:] = 0.3                                   # one threshold: constant prediction
    if case == "constant_y":
        y[:] = 1.0                                   # two thresholds, flat
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(x, y)
    assert (len(iso.X_thresholds_) == 1) == (case == "one_x")
    assert case != "large" or len(iso.X_thresholds_) > 50
    xt = iso.X_thresholds_
    probe = np.concatenate([
        xt, np.nextafter(xt, -np.inf), np.nextafter(xt, np.inf),
        (xt[:-1] + xt[1:]) / 2, [-1.0, 0.0, 1.0, 2.0, xt.min() - 1e-12, xt.max() + 1e-12],
        rng.random(10_000) * 1.2 - 0.1])
    got = _isotonic_session(iso)(probe)
    ref = iso.predict(probe)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)


def test_isotonic_graph_refuses_bad_calibrators():
    iso = IsotonicRegression(out_of_bounds="nan").fit([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="clip"):
        _isotonic_session(iso)
    iso = IsotonicRegression(out_of_bounds="clip").fit([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    iso.X_thresholds_ = np.array([0.0, 0.5, 0.5, 1.0])
    iso.y_thresholds_ = np.array([0.0, 0.2, 0.8, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        _isotonic_session(iso)


def test_one_leaf_trees_and_no_scaler():
    # 1 positive in 6 rows: many bootstrap samples are pure, so trees are single leaves
    X = np.arange(66, dtype=float).reshape(6, 11)
    y = np.array([0, 0, 0, 1, 0, 0])
    rf = RandomForestClassifier(n_estimators=40, random_state=0).fit(X, y)
    assert any(e.tree_.node_count == 1 for e in rf.estimators_)
    meta = {"schema_version": 1, "feature_names": list(FEATURE_NAMES), "entropy": "full", "k": None}
    sess = ort.InferenceSession(onnx_graph.build_sentinel_model(None, rf, None, meta)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    Xt = np.random.default_rng(0).uniform(-10, 80, (500, 11))
    got = sess.run(["probabilities"], {"features": Xt})[0]
    np.testing.assert_allclose(got, rf.predict_proba(Xt), rtol=0, atol=1e-12)


def test_metadata_and_id(fitted, onnx_file):
    path, sid = onnx_file
    data = path.read_bytes()
    assert sid == "sentinel-" + hashlib.sha256(data).hexdigest()[:12]
    sent = load_sentinel(path)
    assert sent.id == sid
    m = sent.metadata
    assert m["feature_names"] == list(FEATURE_NAMES)
    assert (m["entropy"], m["k"], m["schema_version"]) == ("topk", 20, 1)
    assert m["training_slices"] == ["gsm8k", "math"] and m["note"] == "test"
    assert {"scikit-learn", "onnx", "onnxruntime", "numpy"} <= set(m["versions"])
    assert re.match(r"\d{4}-\d\d-\d\dT", m["created"])
    assert m["training"]["calibrated"] is True and m["training"]["n"] == 1500
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["sentinel"])["k"] == 20
    assert props["sentinel.entropy"] == "topk" and props["sentinel.k"] == "20"
    assert props["sentinel.feature_names"] == ",".join(FEATURE_NAMES)


def test_check_compatible(onnx_file):
    sent = load_sentinel(onnx_file[0])
    sent.check_compatible(FEATURE_NAMES, "topk", 20)
    sent.check_compatible(list(FEATURE_NAMES), "top20")
    load_sentinel(onnx_file[0], entropy="top20")
    swapped = list(FEATURE_NAMES)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    cases = [
        ((swapped, "topk", 20), "another order"),
        ((FEATURE_NAMES[:10], "topk", 20), r"missing \['sum'\]"),
        ((list(FEATURE_NAMES) + ["nll"], "topk", 20), r"unexpected \['nll'\]"),
        ((FEATURE_NAMES, "full", None), r"trained on topk \(k=20\) entropy; given full"),
        ((FEATURE_NAMES, "topk", 5), r"given topk \(k=5\)"),
        ((FEATURE_NAMES, "top20_renorm", None), "given topk_renorm"),
        ((FEATURE_NAMES, "topk", None), "needs k"),
    ]
    for args, match in cases:
        with pytest.raises(SentinelFileError, match=match):
            sent.check_compatible(*args)
    with pytest.raises(SentinelFileError, match="given full"):
        load_sentinel(onnx_file[0], entropy="full")


def _rewrite(src, dst, edit):
    m = onnx.load(str(src))
    edit(m)
    onnx.save(m, str(dst))
    return dst


def _set_meta(key, value):
    def edit(m):
        for p in m.metadata_props:
            if p.key == key:
                p.value = value
    return edit


def _meta_with(**changes):
    def edit(m):
        for p in m.metadata_props:
            if p.key == "sentinel":
                d = json.loads(p.value)
                d.update(changes)
                p.value = json.dumps(d)
    return edit


def test_refusals(onnx_file, tmp_path):
    good = onnx_file[0]
    data = good.read_bytes()
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "garbage.onnx").write_bytes(b"\x0fthis is not onnx at all \xff\xfe" * 10)
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"forest": 1}))
    (tmp_path / "model.joblib").write_bytes(b"PK\x03\x04zip")
    cases = {
        tmp_path / "missing.onnx": "no such sentinel file",
        tmp_path: "is a directory",
        tmp_path / "empty.onnx": "empty file",
        tmp_path / "garbage.onnx": "not an ONNX",
        tmp_path / "trunc.onnx": "not an ONNX",
        tmp_path / "model.pkl": "never loads pickles",
        tmp_path / "model.joblib": "ONNX only",
        _rewrite(good, tmp_path / "nometa.onnx", lambda m: m.ClearField("metadata_props")):
            "without 'sentinel' metadata",
        _rewrite(good, tmp_path / "json.onnx", _set_meta("sentinel", "{not json")):
            "not valid JSON",
        _rewrite(good, tmp_path / "v9.onnx", _meta_with(schema_version=9)): "schema_version 9",
        _rewrite(good, tmp_path / "names.onnx", _meta_with(feature_names=["a", "b"])):
            r"shape \(n, 2\)",
        _rewrite(good, tmp_path / "kind.onnx", _meta_with(entropy="varentropy")):
            "bad entropy kind",
        _rewrite(good, tmp_path / "lacks.onnx", _meta_with(k=None)): "needs k",
        _rewrite(good, tmp_path / "f32.onnx",
                 lambda m: m.graph.input[0].type.tensor_type.__setattr__("elem_type", TP.FLOAT)):
            "must be float64",
        _rewrite(good, tmp_path / "out.onnx", lambda m: m.graph.output.pop()):
            "outputs must include",
    }
    for path, match in cases.items():
        with pytest.raises(SentinelFileError, match=match) as e:
            load_sentinel(path)
        assert isinstance(e.value, ValueError) and str(path) in str(e.value)


def test_topk_k_is_checked_at_load(onnx_file, tmp_path):
    """topk_k (the k of a topk group's series) must be an int >= 1; the message names the file."""
    good = onnx_file[0]
    for i, bad in enumerate([0, 20.7, "abc", -3, True, 20.0, [20]]):
        path = _rewrite(good, tmp_path / f"tk{i}.onnx", _meta_with(topk_k=bad))
        with pytest.raises(SentinelFileError, match="topk_k in metadata must be an integer >= 1") as e:
            load_sentinel(path)
        assert str(path) in str(e.value) and repr(bad) in str(e.value)
    ok = _rewrite(good, tmp_path / "tk_ok.onnx", _meta_with(topk_k=10))
    assert load_sentinel(ok).metadata["topk_k"] == 10
    assert load_sentinel(_rewrite(good, tmp_path / "tk_none.onnx", _meta_with(topk_k=None)))


def test_scoring_input_checks(onnx_file):
    sent = load_sentinel(onnx_file[0], intra_op_num_threads=1)
    with pytest.raises(ValueError, match=r"shape \(n, 11\)"):
        sent.predict_proba(np.zeros(11))
    bad = np.zeros((4, 11))
    bad[2, 10] = np.inf
    with pytest.raises(ValueError, match="row 2, feature 'sum'"):
        sent.p_correct(bad)
    assert sent.predict_proba(np.zeros((0, 11))).shape == (0, 2)
    assert sent.p_correct(np.zeros((0, 11))).shape == (0,)


def test_export_argument_errors(fitted, tmp_path):
    clf = fitted[0]
    with pytest.raises(ValueError, match="needs k"):
        clf.export_onnx(tmp_path / "a.onnx", entropy="topk")
    with pytest.raises(ValueError, match="k=20 but k=5"):
        clf.export_onnx(tmp_path / "a.onnx", entropy="top20", k=5)
    with pytest.raises(ValueError, match="reserved"):
        clf.export_onnx(tmp_path / "a.onnx", extra_metadata={"entropy": "x"})
    with pytest.raises(ValueError, match="JSON"):
        clf.export_onnx(tmp_path / "a.onnx", extra_metadata={"x": object()})
    with pytest.raises(ValueError, match="12 feature names"):
        clf.export_onnx(tmp_path / "a.onnx", feature_names=list(FEATURE_NAMES) + ["nll"])
    with pytest.raises(RuntimeError, match="not fitted"):
        SentinelClassifier().export_onnx(tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


PICKLE_LOADERS = re.compile(
    r"^\s*(import|from)\s+(c?pickle|joblib|cloudpickle|dill|shelve)\b"
    r"|\b(pickle|joblib|cloudpickle|dill)\.loads?\("
    r"|allow_pickle\s*=\s*True|read_pickle\(|torch\.load\(",
    re.M,
)


def test_nothing_in_the_package_loads_pickle_or_joblib():
    files = [f for d in ("sentinel_vllm", "kernels") for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 5
    hits = [f"{f.relative_to(ROOT)}:{m.group(0).strip()}"
            for f in files for m in PICKLE_LOADERS.finditer(f.read_text())]
    assert hits == []
    # the pattern itself does catch the forms it is meant to catch
    for src in ("import pickle", "from joblib import load", "x = joblib.load(p)",
                "np.load(f, allow_pickle=True)", "torch.load(path)"):
        assert PICKLE_LOADERS.search(src), src


def test_outputs_outside_unit_interval_are_refused():
    from sentinel_vllm.sentinel_file import Sentinel, SentinelFileError

    class FakeSession:
        def run(self, names, feeds):
            n = len(feeds["features"])
            return [np.full((n, 2), 14.5)] if names == ["probabilities"] else [np.full(n, 14.5)]

    meta = {"feature_names": list(FEATURE_NAMES), "entropy": "full", "k": None}
    sent = Sentinel(FakeSession(), meta, "sentinel-fake", "fake.onnx")
    with pytest.raises(SentinelFileError, match="outside \\[0, 1\\]"):
        sent.p_correct(np.ones((2, 11)))
    with pytest.raises(SentinelFileError, match="outside \\[0, 1\\]"):
        sent.predict_proba(np.ones((2, 11)))
