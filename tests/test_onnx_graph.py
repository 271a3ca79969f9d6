"""The hand-built sentinel graph (sentinel_vllm.onnx_graph) against skl2onnx and the version floors.

Why the shipped graph is built by hand (docs/method.md, "Classifier and calibration"):
skl2onnx's forest outputs float32 and its isotonic conversion is off by up to 0.05, while
the sentinel must equal scikit-learn to 1e-5. skl2onnx is still the reference for what it
does exactly: the forest, up to float32 rounding, which this test checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import make_tiny_sentinel

from sentinel_vllm.features import FEATURE_NAMES
from sentinel_vllm.onnx_graph import build_sentinel_model
from sentinel_vllm.sentinel_file import DEFAULT_SENTINEL, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]


def _fitted(seed=0, n_estimators=30):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    X = rng.gamma(2.0, 0.5, size=(400, len(FEATURE_NAMES)))
    y = rng.random(400) < 1.0 / (1.0 + np.exp(3.0 * (X[:, 0] - 1.0)))
    pipe = Pipeline([("scaler", StandardScaler()),
                     ("forest", RandomForestClassifier(n_estimators=n_estimators, max_depth=6,
                                                       random_state=seed))]).fit(X, y)
    return pipe, X


def _run(model, X, output):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run([output], {name: X})[0]


def test_forest_equals_skl2onnx_within_float32():
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType

    pipe, X = _fitted()
    meta = {"schema_version": SCHEMA_VERSION, "feature_names": list(FEATURE_NAMES),
            "entropy": "full", "k": None}
    ours = build_sentinel_model(pipe.named_steps["scaler"], pipe.named_steps["forest"], None, meta)
    p_ours = _run(ours, X, "p_correct")
    theirs = skl2onnx.convert_sklearn(
        pipe, initial_types=[("X", FloatTensorType([None, len(FEATURE_NAMES)]))],
        options={id(pipe.named_steps["forest"]): {"zipmap": False}}, target_opset=21)
    proba = _run(theirs, X.astype(np.float32), "probabilities")
    p_sklearn = pipe.predict_proba(X)[:, 1]

    assert proba.dtype == np.float32  # skl2onnx: float32 out, whatever the input
    assert p_ours.dtype == np.float64
    np.testing.assert_allclose(p_ours, proba[:, 1], rtol=0, atol=2e-6)  # float32 tolerance
    # ours is scikit-learn's number itself, skl2onnx's only to float32
    np.testing.assert_allclose(p_ours, p_sklearn, rtol=0, atol=1e-12)
    assert np.abs(proba[:, 1] - p_sklearn).max() > 0  # the rounding is there to see


def _floor(spec: str, package: str) -> tuple[int, ...]:
    for dep in spec:
        m = re.fullmatch(rf"{package}\s*>=\s*([\d.]+)", dep.strip())
        if m:
            return tuple(int(v) for v in m.group(1).split("."))
    raise AssertionError(f"no '{package}>=' floor in {spec}")


def _graph_versions(model) -> tuple[int, int, int]:
    ops = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return model.ir_version, ops["ai.onnx"], ops["ai.onnx.ml"]


#: First onnxruntime release with a kernel for TreeEnsemble (ai.onnx.ml opset 5):
#: microsoft/onnxruntime PR 22333, released in 1.21.0 (it also implements opset 21, IR 10).
ORT_FIRST_TREE_ENSEMBLE_V5 = (1, 21)


@pytest.mark.parametrize("which", ["default", "fresh"])
def test_graph_passes_checker_and_pyproject_floors_cover_it(which, tmp_path):
    import onnx

    path = DEFAULT_SENTINEL if which == "default" else tmp_path / "s.onnx"
    if which == "default" and not path.is_file():
        pytest.skip("no embedded default sentinel in this install")
    if which == "fresh":
        make_tiny_sentinel(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ir, opset, ml = _graph_versions(model)
    assert (ir, opset, ml) == (10, 21, 5)

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    onnx_floor = _floor(deps, "onnx")
    # onnx's own table: (release, IR, ai.onnx opset, ai.onnx.ml opset, training opset)
    first = min(
        (tuple(int(v) for v in rel.split(".")) for rel, r_ir, r_op, r_ml, *_ in
         onnx.helper.VERSION_TABLE if r_ir >= ir and r_op >= opset and r_ml >= ml),
    )
    assert onnx_floor >= first[: len(onnx_floor)], (
        f"pyproject says onnx>={onnx_floor}, but IR {ir} / opset {opset} / ai.onnx.ml {ml} "
        f"needs onnx>={first}")
    assert _floor(deps, "onnxruntime")[:2] >= ORT_FIRST_TREE_ENSEMBLE_V5


def test_floor_check_can_fail():
    """The floor lookup refuses an onnx release too old for the graph (1.15: IR 9, opset 20)."""
    import onnx

    too_old = [r for r in onnx.helper.VERSION_TABLE if r[0] == "1.15.0"][0]
    assert too_old[1] < 10 and too_old[2] < 21 and too_old[3] < 5
    with pytest.raises(AssertionError):
        _floor(["onnx"], "onnx")
