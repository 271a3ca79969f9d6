"""``sentinel-vllm fit``: collect (a stand-in for vLLM replaying real traces), choose, train,
report."""

import csv
import gzip
import json
import math
import os

import numpy as np
import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.fit import (
    FitPlan,
    auroc_by_benchmark,
    choose_recipe,
    fit,
    missing,
    report_lines,
    trace_path,
    training_slices,
)
from sentinel_vllm.protocol import ProtocolResult
from sentinel_vllm.sentinel_file import load_sentinel
from sentinel_vllm.traces import Trace, read_traces

ROOT = os.path.join(os.path.dirname(__file__), "..")
REAL = {0.0: os.path.join(ROOT, "data", "traces", "qwen2.5-coder-0.5b-t0.jsonl.gz"),
        1.0: os.path.join(ROOT, "data", "traces", "qwen2.5-coder-0.5b-t1.jsonl.gz")}
BENCH = "mawps,svamp,gsm8k,asdiv"


class Replay:
    """Stands in for vLLM: appends the real Qwen records of the wanted ids, in two batches."""

    def __init__(self, plan):
        from sentinel_vllm.collect import _trace_id, parse_benchmarks
        from sentinel_vllm.datasets import load_benchmark

        self.wanted = {_trace_id(s, p) for s in parse_benchmarks(plan.benchmarks)
                       for p in load_benchmark(s.name, n=plan.n, seed=plan.seed,
                                               difficulty=s.difficulty)}
        self.calls = []

    def __call__(self, temperature, path, stop_after=None):
        self.calls.append(temperature)
        from sentinel_vllm.collect import _existing_ids

        done = _existing_ids(path)
        with gzip.open(REAL[temperature], "rt") as fh:
            recs = [r for r in map(json.loads, fh) if r["id"] in self.wanted - done]
        with gzip.open(path, "at") as fh:
            for r in recs[:stop_after]:
                fh.write(json.dumps(r) + "\n")
        return {}


# the replayed fit trains 8 LOBO folds twice (fit and evaluate) and the band's nested folds:
# minutes on 2 cores even with the light forest below
slow = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def light_forest():
    """A smaller forest and grid for every SentinelClassifier of this module (fit, train and
    evaluate alike, so their numbers still match): the logic under test is the same."""
    from sentinel_vllm.classifier import SentinelClassifier

    kw = SentinelClassifier.__init__.__kwdefaults__
    saved = dict(kw)
    kw.update(n_estimators=30, max_depth_grid=(5,), min_samples_split_grid=(5,), cv=3)
    yield
    kw.clear()
    kw.update(saved)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    # two candidates keep the test to a few forest fits per fold on 2 cores
    plan = FitPlan(model="qwen2.5-coder-0.5b", out=str(d / "mine.onnx"), benchmarks=BENCH,
                   temperatures=(0.0, 1.0), n=20, seed=0, compositions=("extremes",))
    replay = Replay(plan)
    # an interrupted first run: half of T=0 is there, then the run stops
    os.makedirs(plan.dir)
    replay(0.0, trace_path(plan.dir, 0.0), stop_after=50)
    assert missing(plan) == {0.0: 30, 1.0: 80}
    lines = fit(plan, collector=replay)
    return plan, replay, lines


@slow
def test_resumes_where_the_collection_stopped(fitted):
    plan, replay, _ = fitted
    # after the stop at 50 of 80: both temperatures collected once more, nothing missing now
    assert replay.calls == [0.0, 0.0, 1.0]
    assert missing(plan) == {0.0: 0, 1.0: 0}
    for t in (0.0, 1.0):
        ids = [r.id for r in read_traces([trace_path(plan.dir, t)])]
        assert len(ids) == len(set(ids)) == 80

    def boom(*a):
        raise AssertionError("nothing is missing: vLLM must not start")

    assert fit(plan, collector=boom)[0] == "# sentinel-vllm fit"


@slow
def test_report_matches_evaluate_lobo(fitted, tmp_path):
    plan, _, lines = fitted
    files = [trace_path(plan.dir, t) for t in plan.temperatures]
    assert main(["evaluate", *files, "--protocol", "lobo", "--composition", "extremes",
                 "--feature-set", "paper,paper+length", "--seed", "0", "--no-plots",
                 "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "lobo_summary.csv") as fh:
        rows = {r["recipe"]: r for r in csv.DictReader(fh)
                if r["recipe"] in ("extremes/paper", "extremes/paper+length")}
    assert len(rows) == 2
    best = min(rows.values(), key=lambda r: (float(r["worst_aee"]), float(r["median_aee"])))
    assert f"chosen recipe: {best['recipe']} " in "\n".join(lines)
    for recipe, r in rows.items():
        want = (f"| {recipe} | 8 | {float(r['median_aee']):.3f} | {float(r['mean_aee']):.3f} "
                f"| {float(r['worst_aee']):.3f} ({r['worst_unit']}) |")
        assert want in lines
    aee = (f"LOBO AEE of the chosen recipe: median {float(best['median_aee']):.3f}, mean "
           f"{float(best['mean_aee']):.3f}, worst {float(best['worst_aee']):.3f}")
    assert aee in "\n".join(lines)


@slow
def test_written_file_is_the_chosen_recipe(fitted):
    plan, _, lines = fitted
    traces = read_traces([trace_path(plan.dir, t) for t in plan.temperatures])
    chosen = next(ln for ln in lines if ln.startswith("chosen recipe: ")).split()[2]
    meta = load_sentinel(plan.out).metadata
    assert meta["feature_set"] == chosen.split("/", 1)[1]
    # extremes: the highest- and lowest-accuracy benchmarks over both temperatures
    acc = {s: np.mean([t.correct for t in traces if t.slice == s]) for s in BENCH.split(",")}
    pair = sorted([max(acc, key=acc.get), min(acc, key=acc.get)])
    assert training_slices(traces, "extremes") == pair == meta["training_slices"]
    assert sorted(meta["training_composition"]["slices"]) == pair
    assert meta["training_composition"]["temperatures"] == ["0", "1"]
    assert meta["trained_for_model"] == "qwen2.5-coder-0.5b"
    # the band over the 8 collected units, by the chosen composition, is in the file and the report
    assert meta["band"]["n_units"] == 8 and meta["band"]["protocol"]["composition"] == "extremes"
    band = f"band: estimate +- ({meta['band']['q']:.3f} + 1.96 se) over 8 held-out units; judged"
    assert any(ln.startswith(band) for ln in lines), lines
    with open(os.path.join(plan.dir, "report.md")) as fh:
        assert fh.read().splitlines() == lines


def _result(aurocs):
    r = ProtocolResult("extremes/paper", "pcc")
    for i, (b, a) in enumerate(aurocs):
        r.rows.append({"unit": f"{b}@{i}", "held_out": b, "temperature": 0.0, "n": 10,
                       "estimated": 0.5, "true": 0.5, "aee": 0.0, "train": [], "auroc": a})
    r.summary = {"n_units": len(aurocs), "median_aee": 0.0, "mean_aee": 0.0, "worst_aee": 0.0,
                 "worst_unit": "x"}
    return r


def test_auroc_per_benchmark_and_weak_signal_warning():
    r = _result([("a", 0.8), ("a", 0.6), ("b", 0.55), ("c", float("nan"))])
    au = auroc_by_benchmark(r)
    assert au["a"] == pytest.approx(0.7) and au["b"] == pytest.approx(0.55)
    assert math.isnan(au["c"])
    text = "\n".join(report_lines(r, [r], ["a"], {}))
    assert "WARNING: weak entropy signal (held-out AUROC < 0.6) on b" in text
    assert "band: none stored" in text
    band = {"q": 0.1416, "n_units": 8, "nested": {"coverage": 0.875, "mean_halfwidth": 0.25}}
    assert report_lines(r, [r], ["a"], {"band": band})[-2] == (
        "band: estimate +- (0.142 + 1.96 se) over 8 held-out units; judged nested: coverage "
        "0.875, mean half-width 0.250")
    weak = "\n".join(report_lines(_result([("a", 0.52), ("b", 0.58)]), [], ["a"], {}))
    assert "the entropy signal is weak for this model (median held-out AUROC 0.550 < 0.6)" in weak


def test_one_class_is_a_clear_error():
    never = [Trace(f"{s}/{i}", s, False, {"full": [1.0, 2.0]}, None, {"finish_reason": "stop"})
             for s in "abc" for i in range(3)]
    with pytest.raises(ValueError, match="answered none of the 9 collected questions correctly"):
        choose_recipe(never)


def test_cli_checks_options_before_starting_vllm(capsys):
    assert main(["fit", "--model", "x", "--out", "o.onnx", "--benchmarks", "mawps,gsm8k"]) == 1
    assert "at least three" in capsys.readouterr().err
    assert main(["fit", "--model", "x", "--out", "o.onnx", "--temperatures", "0,hot"]) == 1
    assert "--temperatures" in capsys.readouterr().err
    assert main(["fit", "--model", "x", "--out", "o.onnx", "--feature-sets", "paper,nope"]) == 1
    assert "unknown or not servable ['nope']" in capsys.readouterr().err
    assert main(["fit", "--model", "x", "--out", "o.onnx", "--benchmarks", "mawps,gsm8k,nope"]) == 1
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    # found by a review: each was accepted, then failed (or misbehaved) after the collection
    bad = {("--temperatures", "nan"): "finite temperatures", ("--temperatures", "0,0.0"): "twice",
           ("--benchmarks", "gsm8k,gsm8k,gsm8k"): "three different",
           ("--feature-sets", "paper+tail"): "not servable ['paper+tail']",
           ("--out", "/nonexistent-dir/s.onnx"): "does not exist", ("--out", "/tmp"): "a directory",
           ("--max-tokens", "0"): "--max-tokens must be at least 1",
           ("--batch-size", "0"): "--batch-size must be at least 1",
           ("--gpu-memory-utilization", "2"): "(0, 1]",
           ("--kv-cache-memory-bytes", "-5"): "must be positive"}
    for (opt, val), why in bad.items():
        argv = ["fit", "--model", "x", "--out", "o.onnx", opt, val]
        if opt == "--out":
            argv = ["fit", "--model", "x", opt, val]
        assert main(argv) == 1, (opt, val)
        assert why in capsys.readouterr().err, (opt, val)
    assert not os.path.exists("/nonexistent-dir")


def test_held_out_auroc_is_roc_auc_of_the_unit():
    from sklearn.metrics import roc_auc_score

    from sentinel_vllm.protocol import _auroc

    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.2, 0.9, 0.4, 0.5, 0.6])
    assert _auroc(y, p) == pytest.approx(roc_auc_score(y, p)) == pytest.approx(5 / 6)
    assert math.isnan(_auroc(np.array([1, 1]), np.array([0.1, 0.2])))
