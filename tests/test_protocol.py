"""Leave-one-benchmark-out protocol, extra feature sets and QuaPy slice estimators."""

import math

import numpy as np
import pytest
from synthetic import MeanClassifier

from sentinel_vllm.feature_sets import (
    FEATURE_SETS,
    TAIL,
    feature_names,
    feature_set_matrix,
    logprob_features,
    tail_features,
)
from sentinel_vllm.features import FEATURE_NAMES, compute_features
from sentinel_vllm.protocol import extremes_pair, lobo, summarise, trace_temperature
from sentinel_vllm.quantify import fit_quantifiers
from sentinel_vllm.traces import MissingSeriesError, Trace


def _traces(spec, temperature=None):
    """spec: slice -> list of correct flags; every response has the entropy [1, 2, 3]."""
    out = []
    for s, flags in spec.items():
        for i, c in enumerate(flags):
            extra = {"finish_reason": "stop"}
            if temperature is not None:
                extra["generation"] = {"temperature": temperature}
            out.append(Trace(f"{s}/{i}", s, bool(c), {"full": [1.0, 2.0, 3.0]}, None, extra))
    return out


SPEC = {"a": [1, 1, 1, 0], "b": [1, 0, 0, 0], "c": [1, 1], "d": [1, 1, 1, 1, 0]}


def test_summarise_hand_computed():
    rows = [{"unit": "a", "estimated": 0.5, "true": 0.4, "aee": 0.1},
            {"unit": "b", "estimated": 0.2, "true": 0.5, "aee": 0.3},
            {"unit": "c", "estimated": 0.4, "true": 0.6, "aee": 0.2}]
    s = summarise(rows)
    assert s["median_aee"] == pytest.approx(0.2)
    assert s["mean_aee"] == pytest.approx(0.2)
    assert s["worst_aee"] == pytest.approx(0.3) and s["worst_unit"] == "b"
    # ranks est (3, 1, 2), true (1, 2, 3): d = (2, -1, -1), rho = 1 - 6*6/(3*8) = -0.5
    assert s["spearman_rho"] == pytest.approx(-0.5)
    assert math.isnan(summarise([])["median_aee"])


def test_lobo_all_and_extremes_hand_computed():
    tr = _traces(SPEC)
    res = lobo(tr, classifier_factory=MeanClassifier)["pcc"]
    got = {r["held_out"]: r for r in res.rows}
    # hold out a: train b+c+d = (1 + 2 + 4) / 11
    assert got["a"]["estimated"] == pytest.approx(7 / 11)
    assert got["a"]["true"] == pytest.approx(0.75)
    assert got["a"]["train"] == ["b", "c", "d"]
    # hold out b: train a+c+d = 9 / 11, true 0.25
    assert got["b"]["aee"] == pytest.approx(9 / 11 - 0.25)
    # hold out c: a+b+d = 8 / 13 (true 1.0); hold out d: a+b+c = 6 / 10 (true 0.8)
    aees = sorted([abs(7 / 11 - 0.75), 9 / 11 - 0.25, 1.0 - 8 / 13, 0.8 - 6 / 10])
    assert res.summary["worst_aee"] == pytest.approx(aees[-1])
    assert res.summary["median_aee"] == pytest.approx((aees[1] + aees[2]) / 2)
    assert res.summary["mean_aee"] == pytest.approx(sum(aees) / 4)
    ext = lobo(tr, composition="extremes", classifier_factory=MeanClassifier)["pcc"]
    e = {r["held_out"]: r for r in ext.rows}
    # hold out a: others b 0.25, c 1.0, d 0.8 -> pair c + b: 3 / 6
    assert e["a"]["train"] == ["b", "c"] and e["a"]["estimated"] == pytest.approx(0.5)
    # hold out c: others a 0.75, b 0.25, d 0.8 -> pair d + b: 5 / 9
    assert e["c"]["train"] == ["b", "d"] and e["c"]["estimated"] == pytest.approx(5 / 9)
    assert ext.recipe == "extremes/paper"


def test_lobo_temperatures_hold_out_the_benchmark_everywhere():
    tr = _traces(SPEC, 0.5) + _traces({"a": [0, 0], "b": [1, 1, 1, 0], "c": [0, 1]}, 0.0)
    res = lobo(tr, train_temperatures=[0.5], test_temperatures=[0.0],
               classifier_factory=MeanClassifier)["pcc"]
    got = {r["unit"]: r for r in res.rows}
    assert set(got) == {"a@T0", "b@T0", "c@T0"}
    # hold out b: train a, c, d at T 0.5 only = 9 / 11; true at T0 = 0.75
    assert got["b@T0"]["estimated"] == pytest.approx(9 / 11)
    assert got["b@T0"]["true"] == pytest.approx(0.75) and got["b@T0"]["n"] == 4
    assert res.recipe == "all/paper T0.5->T0"
    assert trace_temperature(tr[-1]) == 0.0
    with pytest.raises(ValueError, match="temperatures"):
        lobo(tr, train_temperatures=[1.0], classifier_factory=MeanClassifier)


def test_lobo_errors():
    with pytest.raises(ValueError, match="composition"):
        lobo(_traces(SPEC), composition="some", classifier_factory=MeanClassifier)
    with pytest.raises(ValueError, match="two benchmarks"):
        lobo(_traces({"a": [1, 0]}), classifier_factory=MeanClassifier)
    with pytest.raises(ValueError, match="one class only"):
        lobo(_traces({"a": [1, 0], "b": [1, 1], "c": [1]}), classifier_factory=MeanClassifier)
    with pytest.raises(ValueError, match="oof_proba_"):
        lobo(_traces(SPEC), estimators=["pcc", "acc"], classifier_factory=MeanClassifier)
    assert extremes_pair({"x": 0.2, "y": 0.9, "z": 0.5}) == ("y", "x")


def test_feature_sets_hand_computed():
    t = Trace("a/0", "a", True, {"full": [1.0, 2.0, 3.0, 4.0], "topk": [0.5, 0.5, 1.0, 2.0]}, 20,
              {"finish_reason": "length", "token_logprob": [-0.1, -2.0, None, -0.5]})
    X = feature_set_matrix([t], "all")
    names = feature_names("all")
    assert X.shape == (1, len(names)) and len(names) == 11 + 2 + 3 + 4 + 11
    row = dict(zip(names, X[0]))
    assert row["log_n_steps"] == pytest.approx(math.log(5))
    assert row["truncated"] == 1.0
    assert row[f"tail{TAIL}_mean"] == pytest.approx(2.5)
    assert row[f"tail{TAIL}_std"] == pytest.approx(math.sqrt(1.25))
    assert row[f"tail{TAIL}_max"] == 4.0
    assert row["logprob_mean"] == pytest.approx(-2.6 / 3)
    assert row["logprob_min"] == -2.0
    assert row["logprob_q10"] == pytest.approx(-2.0 + 0.2 * 1.5)  # sorted (-2, -0.5, -0.1), h = 0.2
    np.testing.assert_allclose(X[0, :11], compute_features([1, 2, 3, 4]))
    np.testing.assert_allclose([row[f"topk_{n}"] for n in FEATURE_NAMES],
                               compute_features([0.5, 0.5, 1.0, 2.0]))
    assert feature_names("paper") == FEATURE_NAMES
    # the tail is the last TAIL steps: 8..39 of 0..39
    np.testing.assert_allclose(tail_features(np.arange(40.0)),
                               [23.5, math.sqrt((32 ** 2 - 1) / 12), 39.0])
    np.testing.assert_allclose(tail_features([]), [0, 0, 0])
    np.testing.assert_allclose(logprob_features([None]), [0, 0, 0, 0])
    assert set(FEATURE_SETS) >= {"paper", "paper+length", "paper+tail", "paper+logprob", "paper+topk"}


def test_feature_sets_missing_inputs_are_named():
    t = Trace("a/0", "a", True, {"full": [1.0]}, None, {})
    with pytest.raises(MissingSeriesError, match="a/0"):
        feature_set_matrix([t], "paper+length")
    with pytest.raises(MissingSeriesError, match="token_logprob"):
        feature_set_matrix([t], "paper+logprob")
    with pytest.raises(ValueError, match="unknown feature set"):
        feature_set_matrix([t], "fancy")


def test_quantifiers_hand_computed():
    # positives: P = .9 .9 .9 .2 -> tpr 0.75, mean P 0.725; negatives: .1 .1 .1 .8 -> fpr 0.25, mean 0.275
    p = np.array([0.9, 0.9, 0.9, 0.2, 0.1, 0.1, 0.1, 0.8])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    q = fit_quantifiers(p, y)
    target = np.array([0.9, 0.9, 0.9, 0.1])
    assert q["pcc"](target) == pytest.approx(0.7)
    assert q["acc"](target) == pytest.approx((0.75 - 0.25) / (0.75 - 0.25), abs=1e-3)  # clipped at 1
    assert q["acc"](np.array([0.9, 0.9, 0.1, 0.1])) == pytest.approx(0.5, abs=1e-3)
    assert q["pacc"](target) == pytest.approx((0.7 - 0.275) / (0.725 - 0.275), abs=1e-3)
    for name in ("emq", "hdy", "kdey"):
        v = q[name](target)
        assert 0.0 <= v <= 1.0
    assert math.isnan(q["pcc"](np.array([])))
    with pytest.raises(ValueError, match="unknown estimator"):
        fit_quantifiers(p, y, ["magic"])
    with pytest.raises(ValueError, match="correct and incorrect"):
        fit_quantifiers(p, np.ones(8))


def test_lobo_real_classifier_on_synthetic_traces():
    from synthetic import make_traces

    recs = make_traces(n_per_slice=80, seed=3, with_topk=False)
    tr = [Trace(r["id"], r["slice"], r["correct"], r["entropy"], r["k"], {}) for r in recs]
    small = {"n_estimators": 20, "max_depth_grid": (3,), "min_samples_split_grid": (5,)}
    out = lobo(tr, estimators=["pcc", "pacc", "emq"], classifier_params=small)
    assert set(out) == {"pcc", "pacc", "emq"}
    pcc = out["pcc"]
    assert {r["held_out"] for r in pcc.rows} == {"easy", "mid", "hard", "mixed"}
    for res in out.values():
        assert all(0.0 <= r["estimated"] <= 1.0 for r in res.rows)
    # the synthetic entropy carries the latent confidence: held-out estimates track the truth
    assert pcc.summary["spearman_rho"] > 0.7
    assert pcc.summary["median_aee"] < 0.15


def test_evaluate_protocol_lobo_cli(tmp_path, capsys):
    import csv

    from synthetic import SLICES, make_traces

    from sentinel_vllm.cli import main
    from sentinel_vllm.traces import write_traces

    f = tmp_path / "t.jsonl"
    three = {k: v for k, v in SLICES.items() if k != "mixed"}
    write_traces(f, make_traces(30, seed=4, slices=three, with_topk=False))
    out = tmp_path / "lobo"
    assert main(["evaluate", str(f), "--protocol", "lobo", "--composition", "extremes",
                 "--out-dir", str(out)]) == 0
    with open(out / "lobo_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["recipe"] == "extremes/paper" and rows[0]["n_units"] == "3"
    assert rows[-1]["recipe"].startswith("paper protocol")
    with open(out / "lobo_units.csv", newline="") as fh:
        units = list(csv.DictReader(fh))
    assert len(units) == 3
    for u in units:
        assert float(u["aee"]) == pytest.approx(abs(float(u["estimated"]) - float(u["true"])), abs=1e-12)
    assert float(rows[0]["worst_aee"]) == pytest.approx(max(float(u["aee"]) for u in units))
    assert (out / "lobo.png").stat().st_size > 0 and "Leave-one-benchmark-out" in (out / "lobo.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(f), "--protocol", "lobo", "--train", "easy", "--out-dir", str(out)]) == 1
    assert "drop --train" in capsys.readouterr().err


def test_train_records_composition_and_temperatures(tmp_path):
    from synthetic import make_traces

    from sentinel_vllm.cli import main
    from sentinel_vllm.sentinel_file import load_sentinel
    from sentinel_vllm.traces import write_traces

    two = {"easy": (8.0, 2.0), "hard": (2.0, 7.0)}
    recs = ([{**r, "temperature": 0.0} for r in make_traces(30, seed=1, slices=two, with_topk=False)]
            + [{**r, "id": r["id"] + "b", "temperature": 1.0}
               for r in make_traces(30, seed=2, slices=two, with_topk=False)])
    f = tmp_path / "t.jsonl"
    write_traces(f, recs)
    out = tmp_path / "s.onnx"
    assert main(["train", str(f), "--temperatures", "0", "--out", str(out)]) == 0
    comp = load_sentinel(str(out)).metadata["training_composition"]
    assert comp["temperatures"] == ["0"]
    for s in ("easy", "hard"):
        want = sum(r["correct"] for r in recs if r["slice"] == s and r["temperature"] == 0.0)
        assert comp["slices"][s] == {"0": {"n": 30, "n_correct": want}}
