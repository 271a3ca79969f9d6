"""The band (95% interval of the true accuracy): math by hand, nesting, files, gauges, rules."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
from synthetic import MeanClassifier, make_traces

from sentinel_vllm.aggregate import Z_95, band_halfwidth, check_band, estimate_accuracy
from sentinel_vllm.band import (conformal_quantile, fit_band, halfwidth, nested_coverage,
                                nested_units, unit_score)
from sentinel_vllm.traces import read_traces, write_traces

PROMTOOL = shutil.which("promtool")


def test_conformal_quantile_by_hand():
    # N = 4: k = min(ceil(5 * 0.95), 4) = 4 -> the largest; level 0.5: k = ceil(2.5) = 3
    assert conformal_quantile([0.1, 0.3, 0.2, 0.05]) == (0.3, 4)
    assert conformal_quantile([0.1, 0.3, 0.2, 0.05], 0.5) == (0.2, 3)
    s = list(range(39))  # N = 39: k = ceil(40 * 0.95) = 38 -> the 38th smallest, 37
    assert conformal_quantile(s) == (37.0, 38)
    assert conformal_quantile(list(range(19)))[1] == 19  # ceil(20 * 0.95) = 19 exactly
    with pytest.raises(ValueError, match="at least one"):
        conformal_quantile([])


def test_fit_band_and_halfwidth_by_hand():
    rows = [{"unit": "a", "estimated": 0.50, "true": 0.60, "se": 0.02},   # 0.10 - 0.0392 = 0.0608
            {"unit": "b", "estimated": 0.30, "true": 0.28, "se": 0.03},   # 0.02 - 0.0588 < 0
            {"unit": "c", "estimated": 0.10, "true": 0.30, "se": 0.05}]   # 0.20 - 0.0980 = 0.1020
    band = fit_band(rows)
    assert band["q"] == pytest.approx(0.20 - Z_95 * 0.05) and band["rank"] == 3
    assert band["units"]["b"]["score"] == pytest.approx(0.02 - Z_95 * 0.03)
    assert fit_band(rows[1:2])["q"] == 0.0  # a negative score: q clipped at 0 (only wider)
    assert unit_score(0.3, 0.1, "conformal-quadrature") == \
        pytest.approx(math.sqrt(0.09 - (Z_95 * 0.1) ** 2))
    assert halfwidth(0.01, 0.1) == pytest.approx(0.1 + Z_95 * 0.01)
    assert halfwidth(0.01, 0.1, "conformal-quadrature") == \
        pytest.approx(math.hypot(0.1, Z_95 * 0.01))
    assert halfwidth(0.01, 0.1, "normal-units") == pytest.approx(Z_95 * math.hypot(0.1, 0.01))
    tau2 = np.mean([0.1 ** 2 - 0.02 ** 2, 0.02 ** 2 - 0.03 ** 2, 0.2 ** 2 - 0.05 ** 2])
    assert fit_band(rows, "normal-units")["q"] == pytest.approx(math.sqrt(tau2))


def test_estimate_with_band_by_hand():
    se = math.sqrt(0.25 + 0.09 + 0.09) / 3
    band = {"method": "conformal-linear", "q": 0.05}  # half-width 0.05 + 0.4285 (se 0.2186)
    e = estimate_accuracy([0.5, 0.9, 0.1], [True, None, False], band)
    assert (e.ci_low, e.ci_high) == pytest.approx((0.5 - 0.05 - Z_95 * se, 0.5 + 0.05 + Z_95 * se))
    assert e.interval == "band" and e.shift_halfwidth == 0.05
    assert e.sampling_halfwidth == pytest.approx(Z_95 * se)
    assert band_halfwidth(se, band) == pytest.approx(0.05 + Z_95 * se)
    hi = estimate_accuracy([0.95, 0.99], band={"method": "conformal-linear", "q": 0.2})
    assert hi.ci_high == 1.0  # clipped
    old = estimate_accuracy([0.5, 0.9, 0.1])
    assert old.interval == "sampling" and old.ci_low == pytest.approx(0.5 - Z_95 * se)
    for bad in ({"method": "conformal-abs", "q": 0.1}, {"method": "conformal-linear", "q": -1},
                {"method": "conformal-linear", "q": float("inf")}, [0.1]):
        with pytest.raises(ValueError):
            check_band(bad)


def test_nested_coverage_small_case():
    outer = [{"unit": "a@T0", "held_out": "a", "estimated": 0.5, "true": 0.62, "se": 0.01},
             {"unit": "a@T1", "held_out": "a", "estimated": 0.4, "true": 0.41, "se": 0.01},
             {"unit": "b@T0", "held_out": "b", "estimated": 0.2, "true": 0.30, "se": 0.0},
             {"unit": "c@T0", "held_out": "c", "estimated": 0.3, "true": 0.30, "se": 0.0}]
    inner = {"a": [{"unit": "b@T0", "estimated": 0.2, "true": 0.25, "se": 0.0}],   # q = 0.05
             "b": [{"unit": "a@T0", "estimated": 0.5, "true": 0.70, "se": 0.0}],   # q = 0.20
             "c": []}                                                              # q = inf
    cov = nested_coverage(outer, inner)
    # a@T0: |0.12| > 0.05 + 0.0196 -> miss; a@T1: 0.01 <= 0.0696 -> covered; b: 0.1 <= 0.2; c: inf
    assert [r["covered"] for r in cov["rows"]] == [False, True, True, True]
    assert cov["coverage"] == 0.75 and cov["misses"] == ["a@T0"]
    assert cov["rows"][0]["halfwidth"] == pytest.approx(0.05 + Z_95 * 0.01)
    assert (cov["rows"][3]["low"], cov["rows"][3]["high"]) == (0.0, 1.0)
    assert nested_coverage(outer, inner, "sampling")["misses"] == ["a@T0", "b@T0"]  # 0.01 <= 0.0196


def test_nested_units_never_judge_a_unit_by_its_own_benchmark(tmp_path):
    traces = make_traces(30, seed=1)
    for i, r in enumerate(traces):  # two temperatures: units are (slice, temperature)
        r["temperature"] = [0.0, 1.0][i % 2]
    write_traces(tmp_path / "t.jsonl", traces)
    tr = read_traces(str(tmp_path / "t.jsonl"))
    outer, inner = nested_units(tr, composition="all", classifier_factory=MeanClassifier)
    names = ("easy", "mid", "hard", "mixed")
    assert sorted(r["unit"] for r in outer) == sorted(f"{s}@T{t}" for s in names for t in (0, 1))
    for b, rows in inner.items():
        assert rows and all(r["held_out"] != b and b not in r["train"] for r in rows)
    # MeanClassifier: a unit's estimate is the accuracy of the training slices (hand-checkable)
    r = next(r for r in inner["easy"] if r["held_out"] == "mid")
    want = np.mean([t.correct for t in tr if t.slice in ("hard", "mixed")])
    assert r["estimated"] == pytest.approx(want) and set(r["train"]) == {"hard", "mixed"}


@pytest.fixture(scope="module")
def band_files(tmp_path_factory):
    """A sentinel trained with --band (two slices, extremes folds) and one without (older)."""
    from sentinel_vllm.cli import main

    d = tmp_path_factory.mktemp("band")
    write_traces(d / "t.jsonl", make_traces(60, seed=4))
    assert main(["train", str(d / "t.jsonl"), "--slices", "easy,hard", "--band",
                 "--out", str(d / "band.onnx")]) == 0
    assert main(["train", str(d / "t.jsonl"), "--slices", "easy,hard",
                 "--out", str(d / "old.onnx")]) == 0
    return d


def test_train_stores_band_and_old_file_loads(band_files, caplog):
    import sentinel_vllm.sentinel_file as sf

    meta = sf.load_sentinel(band_files / "band.onnx").metadata
    band = meta["band"]
    assert band["method"] == "conformal-linear" and band["n_units"] == 4 and band["rank"] == 4
    assert band["protocol"]["composition"] == "extremes"
    scores = [u["score"] for u in band["units"].values()]
    assert band["q"] == pytest.approx(max(max(scores), 0.0))
    assert band["nested"]["n_units"] == 4 and 0 <= band["nested"]["coverage"] <= 1
    with caplog.at_level("WARNING", logger="sentinel_vllm"):
        old = sf.load_sentinel(band_files / "old.onnx")
        sf.load_sentinel(band_files / "old.onnx")
    assert "band" not in old.metadata
    assert caplog.text.count("has no band metadata") == 1  # once per file


def test_bad_band_metadata_is_refused(band_files, tmp_path):
    import onnx

    import sentinel_vllm.sentinel_file as sf

    model = onnx.load(str(band_files / "band.onnx"))
    for prop in model.metadata_props:
        if prop.key == "sentinel":
            meta = json.loads(prop.value)
            meta["band"]["q"] = -0.5
            prop.value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(sf.SentinelFileError, match="bad band in metadata: band q"):
        sf.load_sentinel(tmp_path / "bad.onnx")


def _estimate_json(sentinel, traces, capsys):
    from sentinel_vllm.cli import main

    capsys.readouterr()
    assert main(["estimate", str(sentinel), str(traces), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_says_which_interval(band_files, capsys):
    new = _estimate_json(band_files / "band.onnx", band_files / "t.jsonl", capsys)
    old = _estimate_json(band_files / "old.onnx", band_files / "t.jsonl", capsys)
    assert new["interval"] == "band" and old["interval"] == "sampling" and old["band_q"] is None
    for s, e in new["slices"].items():
        o = old["slices"][s]
        assert e["estimate"] == pytest.approx(o["estimate"], abs=1e-12)  # --band: same forest
        assert e["ci_high"] - e["ci_low"] == pytest.approx(
            min(1, e["estimate"] + new["band_q"] + e["sampling_halfwidth"])
            - max(0, e["estimate"] - new["band_q"] - e["sampling_halfwidth"]), abs=1e-12)
        assert e["interval"] == "band" and o["interval"] == "sampling"


RULE_TEST = """rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}
    promql_expr_test:
{exprs}
"""


def test_estimate_json_gauges_and_recording_rule_agree(band_files, tmp_path, capsys):
    """Same data three ways: `estimate --json`, the per-process gauges, the fleet rule (promtool).

    The traffic of the 5m window is one batch of responses repeated each minute (so the
    window holds 5 copies): estimate and gauges see the 5 copies, the rules the counters.
    """
    from prometheus_client import CollectorRegistry

    from sentinel_vllm.sentinel_file import load_sentinel
    from sentinel_vllm.serving.api.metrics import SentinelMetrics

    sent = load_sentinel(band_files / "band.onnx")
    recs = [r for r in make_traces(8, seed=9) if r["slice"] in ("easy", "hard")]
    five = [{**r, "id": f"{r['id']}#{m}"} for m in range(5) for r in recs]
    write_traces(tmp_path / "five.jsonl", five)
    doc = _estimate_json(band_files / "band.onnx", tmp_path / "five.jsonl", capsys)
    from sentinel_vllm.cli.score import score_traces

    class A:
        skip_bad = False
    _, p, traces = score_traces(str(band_files / "band.onnx"),
                                read_traces(str(tmp_path / "five.jsonl")), A)
    reg = CollectorRegistry()
    m = SentinelMetrics(model="m", sentinel_id=sent.id, replica="r", registry=reg,
                        band=sent.metadata["band"])
    for t, pi in zip(traces, p):
        m.observe(t.slice, float(pi))
    assert reg.get_sample_value("sentinel_band_shift_halfwidth",
                                {"model_name": "m", "sentinel": sent.id, "interval": "band"}) \
        == doc["band_q"]
    series, exprs = [], []
    for s in ("easy", "hard"):
        lab = {"model": "m", "sentinel": sent.id, "replica": "r", "slice": s}
        e = doc["slices"][s]
        for name, key in (("sentinel_estimated_accuracy", "estimate"),
                          ("sentinel_estimated_accuracy_ci_low", "ci_low"),
                          ("sentinel_estimated_accuracy_ci_high", "ci_high")):
            assert reg.get_sample_value(name, lab) == pytest.approx(e[key], abs=1e-12), (s, name)
        ps_all = [pi for t, pi in zip(traces, p) if t.slice == s]
        ps = np.array(ps_all[: len(ps_all) // 5])  # one batch (the first of the five copies)
        fl = f'model_name="m",sentinel="{sent.id}",slice="{s}"'
        for name, per_min in (("sentinel_p_correct_count", len(ps)),
                              ("sentinel_p_correct_sum", ps.sum()),
                              ("sentinel_p_correct_variance_total", (ps * (1 - ps)).sum())):
            series.append(f"      - series: '{name}{{{fl}}}'\n"
                          f"        values: '0+{float(per_min)!r}x30'")
        for rule, key in (("mean5m", "estimate"), ("ci_low5m", "ci_low"), ("ci_high5m", "ci_high")):
            labels = fl + ("" if rule == "mean5m" else ',interval="band"')
            exprs.append(f'      - expr: abs(slice:sentinel_p_correct:{rule}{{slice="{s}"}} - '
                         f"{e[key]!r}) < bool 1e-9\n        eval_time: 10m\n        exp_samples:\n"
                         f"          - labels: '{{{labels}}}'\n            value: 1")
    series.append(f"      - series: 'sentinel_band_shift_halfwidth{{model_name=\"m\","
                  f"sentinel=\"{sent.id}\",interval=\"band\"}}'\n"
                  f"        values: '{doc['band_q']!r}x30'")
    assert all(len([t for t in traces if t.slice == s]) % 5 == 0 for s in ("easy", "hard"))
    if PROMTOOL is None:
        pytest.skip("promtool missing (apt-get install prometheus)")
    from pathlib import Path

    rules = Path(__file__).resolve().parents[1] / "deploy" / "monitoring" / "sentinel-rules.yml"
    (tmp_path / "t.yml").write_text(RULE_TEST.format(rules=rules, series="\n".join(series),
                                                     exprs="\n".join(exprs)))
    r = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "t.yml")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_default_sentinel_has_its_band_and_the_same_predictions():
    """Retrained with --band: the same forest (p_correct as before, to float precision) plus a
    band fitted on the 19 held-out units of the three trace files (benchmarks/RESULTS.md)."""
    from pathlib import Path

    from sentinel_vllm.cli.score import score_traces

    root = Path(__file__).resolve().parents[1]
    fix = json.loads((root / "tests" / "fixtures" / "default_p_before_band.json").read_text())
    want = fix["p_correct"]
    traces = [t for t in read_traces(str(root / fix["file"])) if t.id in want]

    class Args:
        skip_bad = False
    sent, p, got = score_traces("default", traces, Args)
    assert len(got) == len(want) == 24
    np.testing.assert_allclose(p, [want[t.id] for t in got], rtol=0, atol=1e-12)
    band = sent.metadata["band"]
    assert band["method"] == "conformal-linear" and band["n_units"] == 19 and band["rank"] == 19
    assert band["protocol"]["composition"] == "extremes"
    assert band["protocol"]["train_temperatures"] == [0.5]
    worst = max(band["units"], key=lambda u: band["units"][u]["score"])
    assert band["q"] == pytest.approx(band["units"][worst]["score"], abs=1e-12)
    assert band["nested"]["coverage"] >= 0.9


def test_demo_table_says_which_interval():
    import io

    from sentinel_vllm.aggregate import estimate_slices
    from sentinel_vllm.demo import print_table

    band = {"method": "conformal-linear", "q": 0.1, "n_units": 19}
    # p = 0.5, 0.7 twenty times each: se = sqrt(20 * 0.46) / 40 = 0.0758, half-width 0.2486
    est = estimate_slices(["a"] * 40, [0.5, 0.7] * 20, [True, False] * 20, band)
    out = io.StringIO()
    print_table(est, band, out)
    assert "95% band" in out.getvalue() and "[0.35, 0.85]" in out.getvalue()
    assert "0.100 + 1.96 se" in out.getvalue()
    out = io.StringIO()
    print_table(estimate_slices(["a"] * 40, [0.5, 0.7] * 20, [True, False] * 20), None, out)
    assert "95% sampling" in out.getvalue() and "[0.45, 0.75]" in out.getvalue()
    assert "sampling noise only" in out.getvalue()


def test_audit_says_which_interval():
    from sentinel_vllm.audit import audit_slice

    band = {"method": "conformal-linear", "q": 0.1}
    p = [0.5, 0.7] * 20
    labels = [True, False, None, None] * 10  # 20 labels
    a = audit_slice("a", p, labels, band)
    ref = estimate_accuracy(p, band=band)
    assert a.interval == "ppi++" and a.unlabelled_interval == "band"
    assert (a.unlabelled_ci_low, a.unlabelled_ci_high) == (ref.ci_low, ref.ci_high)
    assert audit_slice("a", p, labels).unlabelled_interval == "sampling"
    assert a.as_dict()["interval"] == "ppi++"


def test_train_band_warns_when_weaker_than_it_reads(tmp_path, capsys):
    """Two benchmarks: 2 units, q their largest score (level 2/3, not 0.95), and neither unit can be
    judged nested (one benchmark left); unlabelled --band-traces add no unit. Each is said."""
    from sentinel_vllm.cli import main

    recs = [r for r in make_traces(40, seed=4) if r["slice"] in ("easy", "hard")]
    write_traces(tmp_path / "t.jsonl", recs)
    write_traces(tmp_path / "u.jsonl", [{**r, "correct": None} for r in recs])
    assert main(["train", str(tmp_path / "t.jsonl"), "--band-traces", str(tmp_path / "u.jsonl"),
                 "--out", str(tmp_path / "s.onnx")]) == 0
    err = capsys.readouterr().err
    assert "none of their 80 traces is labelled" in err
    assert "only 2 held-out unit(s): q is their largest score, a level of 67%, not 95%" in err
    assert "2 of 2 unit(s) could not be judged nested" in err
    assert main(["train", str(tmp_path / "t.jsonl"), "--band", "--out", str(tmp_path / "s2.onnx")]) == 0
    assert "none of their" not in capsys.readouterr().err
