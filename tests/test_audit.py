"""Audit: PPI++ intervals, Wilson intervals, labels IO and the `audit` command (hand-computed values)."""

import json
import math

import numpy as np
import pytest
from synthetic import make_traces

from sentinel_vllm.audit import (
    audit_slice,
    audit_slices,
    ppi_interval,
    read_labels,
    wilson_interval,
)
from sentinel_vllm.cli import main
from sentinel_vllm.traces import write_traces

Z = 1.959963984540054


def test_wilson_hand_computed():
    k, n = 5, 20
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half, abs=1e-9)
    assert lo == pytest.approx(0.1119, abs=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_ppi_hand_computed():
    y = np.array([1, 0, 1, 1, 0, 1.0])
    pl = np.array([0.8, 0.2, 0.6, 0.9, 0.4, 0.7])
    pu = np.array([0.5, 0.7, 0.3, 0.9, 0.6, 0.4, 0.2, 0.8])
    n, N = len(y), len(pu)
    # PPI++ lam for a mean: cov(y, P_lab) / ((1 + n/N) var(P_all)) (population cov, ddof=1 var)
    cov = np.mean((y - y.mean()) * (pl - pl.mean()))
    lam = min(1.0, max(0.0, cov / ((1 + n / N) * np.var(np.concatenate([pl, pu]), ddof=1))))
    est = lam * pu.mean() + np.mean(y - lam * pl)
    se = math.sqrt(np.var(lam * pu) / N + np.var(y - lam * pl) / n)
    got = ppi_interval(y, pl, pu, method="wald")
    assert got[3] == pytest.approx(lam, rel=1e-9)
    assert got[0] == pytest.approx(est, rel=1e-9)
    assert got[1] == pytest.approx(max(0.0, est - Z * se), rel=1e-6)
    assert got[2] == pytest.approx(min(1.0, est + Z * se), rel=1e-6)
    # score form: the thetas with (est - theta)^2 <= Z^2 (r theta (1 - theta) / n + lam^2 var(pu) / N)
    r = np.var(y - lam * pl) / np.var(y)
    thetas = np.linspace(0, 1, 200001)
    inside = thetas[(est - thetas) ** 2 <= Z**2 * (r * thetas * (1 - thetas) / n
                                                 + lam**2 * np.var(pu) / N)]
    sc = ppi_interval(y, pl, pu)
    assert sc[0] == pytest.approx(est, rel=1e-9)
    assert sc[1] == pytest.approx(inside.min(), abs=1e-5) and sc[2] == pytest.approx(inside.max(), abs=1e-5)
    # labels all equal: lam = 0 and the score form is exactly Wilson's interval
    zero = ppi_interval(np.zeros(5), np.array([0.1, 0.2, 0.1, 0.1, 0.3]), pu)
    assert zero[3] == 0.0 and zero[0] == 0.0
    assert zero[1:3] == pytest.approx(wilson_interval(0, 5), abs=1e-12)
    with pytest.raises(ValueError, match="method"):
        ppi_interval(y, pl, pu, method="exact")
    with pytest.raises(ValueError, match="at least 2"):
        ppi_interval(y[:1], pl[:1], pu)
    with pytest.raises(ValueError, match="unlabelled"):
        ppi_interval(y, pl, pu[:0])


def test_audit_slice_cases():
    p = [0.9, 0.1, 0.8, 0.3, 0.5]
    one = audit_slice("s", p, [True, None, None, None, None])
    assert one.n == 5 and one.n_labelled == 1 and math.isnan(one.estimate)
    assert one.labels_only == 1.0 and one.unlabelled == pytest.approx(0.52)
    full = audit_slice("s", p, [True, False, True, False, False])
    assert full.estimate == pytest.approx(0.4) and full.lam == 0.0
    assert (full.ci_low, full.ci_high) == pytest.approx(wilson_interval(2, 5))
    part = audit_slice("s", p, [True, False, True, None, None])
    assert part.n_labelled == 3 and 0.0 <= part.ci_low <= part.estimate <= part.ci_high <= 1.0
    assert part.as_dict()["slice"] == "s"
    with pytest.raises(ValueError, match="scores"):
        audit_slice("s", p, [True])
    with pytest.raises(ValueError, match="not in the traffic"):
        audit_slices(["a"], [0.5], ["x/1"], {"x/2": True})
    with pytest.raises(ValueError, match=r"labelled id 'x/1' matches 2 responses"):
        audit_slices(["a", "a", "a"], [0.5, 0.6, 0.7], ["x/1", "x/2", "x/1"], {"x/1": True})


def test_read_labels_errors(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text('{"id": "a/1", "correct": true}\n\n{"id": "a/2", "correct": false}\n')
    assert read_labels(f) == {"a/1": True, "a/2": False}
    for text, msg in [('{"id": "a/1"}', "needs 'id' and 'correct'"), ("{nope", "not JSON"),
                      ('{"id": "a", "correct": 1}', "true or false"),
                      ('{"id": "a", "correct": true}\n{"id": "a", "correct": false}', "both"),
                      ("\n", "no labels")]:
        f.write_text(text + "\n")
        with pytest.raises(ValueError, match=msg):
            read_labels(f)


def test_audit_cli_json(tmp_path, capsys):
    recs = make_traces(60, seed=5)
    traffic = tmp_path / "traffic.jsonl"
    write_traces(traffic, [{**r, "correct": None} for r in recs])
    labelled = [r for r in recs if int(r["id"].split("/")[1]) < 20]   # 20 labels per slice
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": r["id"], "correct": r["correct"]}) + "\n"
                              for r in labelled))
    assert main(["audit", "default", "--traces", str(traffic), "--labels", str(labels), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["slice"] for o in out] == ["easy", "mid", "hard", "mixed"]
    for o in out:
        assert o["n"] == 60 and o["n_labelled"] == 20
        k = sum(r["correct"] for r in labelled if r["slice"] == o["slice"])
        assert o["labels_only"] == pytest.approx(k / 20)
        assert (o["labels_ci_low"], o["labels_ci_high"]) == pytest.approx(wilson_interval(k, 20))
        assert o["ci_low"] <= o["estimate"] <= o["ci_high"]
        assert set(o) >= {"estimate", "ci_low", "ci_high", "unlabelled", "lam"}
    (tmp_path / "bad.jsonl").write_text('{"id": "nope/1", "correct": true}\n')
    assert main(["audit", "default", "--traces", str(traffic), "--labels",
                 str(tmp_path / "bad.jsonl")]) == 1
    assert "not in the traffic" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["audit", "default", "--traces", str(traffic), "--labels",
                 str(tmp_path / "empty.jsonl")]) == 1
    assert "no labels" in capsys.readouterr().err
    again = tmp_path / "again.jsonl"        # the same ids in a second file (another temperature)
    write_traces(again, [{**r, "correct": None} for r in recs])
    assert main(["audit", "default", "--traces", str(traffic), str(again), "--labels",
                 str(labels)]) == 1
    err = capsys.readouterr().err
    assert f"labelled id {labelled[0]['id']!r} matches 2 responses" in err
