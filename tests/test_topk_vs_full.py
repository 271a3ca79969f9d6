"""bench topk-vs-full: table shape, and each variant equals a direct evaluate call."""

import csv
import math

import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.topk_vs_full import COLUMNS, compare_variants, extremes, variant_names
from sentinel_vllm.evaluate import evaluate_composition
from sentinel_vllm.traces import _parse_record, write_traces
from synthetic import make_traces

PARAMS = {"n_estimators": 30, "max_depth_grid": (3, 5), "min_samples_split_grid": (2,)}


def test_variant_names_and_extremes():
    assert variant_names([5, 20], renorm=True) == [
        ("full", None), ("top5", 5), ("top20", 20), ("top5_renorm", 5), ("top20_renorm", 20)]
    traces = [_parse_record(r, "x") for r in make_traces(80, seed=3)]
    assert extremes(traces) == ("easy", "hard")


def test_variants_equal_direct_evaluate():
    traces = [_parse_record(r, "x") for r in make_traces(100, seed=4)]
    res = compare_variants(traces, ks=[5, 20, 50], renorm=False, classifier_params=PARAMS)
    assert [r.variant for r in res] == ["full", "top5", "top20", "top50"]
    assert [r.available for r in res] == [True, True, True, False]  # synthetic traces carry top5 and topk (k=20)
    for r in res[:3]:
        direct = evaluate_composition(traces, ("easy", "hard"), entropy=r.variant,
                                      classifier_params=PARAMS)
        assert r.median_aee == pytest.approx(direct.summary["median_aee"], abs=1e-12)
        assert r.spearman_rho == pytest.approx(direct.summary["spearman_rho"], abs=1e-12)
        assert r.brier == pytest.approx(direct.brier, abs=1e-12)
        assert r.ece == pytest.approx(direct.ece, abs=1e-12)
    assert math.isnan(res[3].median_aee)


def test_cli_writes_table(tmp_path, monkeypatch):
    p = tmp_path / "t.jsonl"
    write_traces(p, make_traces(60, seed=5))
    import sentinel_vllm.topk_vs_full as cmp

    orig = cmp.compare_variants
    monkeypatch.setattr(cmp, "compare_variants",
                        lambda *a, **kw: orig(*a, **{**kw, "classifier_params": PARAMS}))
    assert main(["bench", "topk-vs-full", str(p), "--k", "5,20", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "topk_vs_full.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == COLUMNS
    assert [r[0] for r in rows[1:]] == ["full", "top5", "top20", "top5_renorm", "top20_renorm"]
    assert [r[2] for r in rows[1:]] == ["True", "True", "True", "False", "False"]
    assert (tmp_path / "topk_vs_full.png").stat().st_size > 0
