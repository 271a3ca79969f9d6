"""Active labelling: the design's probabilities, the weighted PPI++ estimate against ppi-python and
hand computations, its unbiasedness and coverage, plan files and the ``audit --suggest/--plan`` command."""

import itertools
import json
import math

import numpy as np
import pytest
from synthetic import make_traces

from sentinel_vllm.active_audit import (
    SliceDesign,
    active_interval,
    audit_design,
    check_plan,
    draw_probabilities,
    make_plan,
    plan_designs,
    plan_labels,
    read_plan,
    write_plan,
)
from sentinel_vllm.audit import wilson_interval
from sentinel_vllm.cli import main
from sentinel_vllm.sentinel_file import load_sentinel, resolve_sentinel_path
from sentinel_vllm.traces import write_traces

Z = 1.959963984540054


def test_draw_probabilities_hand_computed():
    # sqrt(p(1-p)) = 0.5, 0.3, 0, 0 (sum 0.8); q = 0.5 * that / 0.8 + 0.5 / 4
    q = draw_probabilities([0.5, 0.1, 0.0, 1.0], eta=0.5)
    assert q.tolist() == pytest.approx([0.4375, 0.3125, 0.125, 0.125], abs=1e-12)
    assert draw_probabilities([0.2, 0.9], eta=1.0).tolist() == [0.5, 0.5]
    assert draw_probabilities([1.0, 0.0, 1.0]).tolist() == pytest.approx([1 / 3] * 3)
    for bad, msg in [([], "no responses"), ([0.5, 1.2], r"in \[0, 1\]"), ([np.nan], "finite")]:
        with pytest.raises(ValueError, match=msg):
            draw_probabilities(bad)
    with pytest.raises(ValueError, match="eta"):
        draw_probabilities([0.5], eta=0.0)


def _example():
    rng = np.random.default_rng(3)
    p_all = rng.uniform(0.05, 0.95, 40)
    q = draw_probabilities(p_all)
    idx = rng.choice(40, 12, p=q)
    y = (rng.uniform(size=12) < p_all[idx]).astype(float)
    return p_all, q, idx, y


def test_estimate_and_wald_interval_equal_ppi_python_with_mean_one_weights():
    from ppi_py import ppi_mean_ci, ppi_mean_pointestimate

    p_all, q, idx, y = _example()
    N = p_all.size
    w = 1 / (N * q[idx])
    w = w / w.mean()  # ppi-python rescales its weights to mean 1; the design's do not need to
    sums = (N, p_all.sum(), (p_all**2).sum())
    est, lo, hi, lam = active_interval(y, p_all[idx], w, *sums, method="wald")
    assert 0 < lam < 1
    ref = float(np.atleast_1d(ppi_mean_pointestimate(y, p_all[idx], p_all, lam=lam, w=w))[0])
    assert est == pytest.approx(ref, abs=1e-12)
    rlo, rhi = (float(np.atleast_1d(v)[0]) for v in ppi_mean_ci(y, p_all[idx], p_all, alpha=0.05,
                                                                lam=lam, w=w))
    assert (lo, hi) == pytest.approx((rlo, rhi), abs=1e-9)
    # lam minimises var(w (y - lam p)) / n + lam^2 var(p) / N: the hand-computed minimiser
    wy, wf = w * y, w * p_all[idx]
    n = y.size
    hand = np.mean((wy - wy.mean()) * (wf - wf.mean())) / (np.var(wf) + n / N * np.var(p_all))
    assert lam == pytest.approx(hand, rel=1e-12)


def test_score_interval_is_the_inverted_variance():
    p_all, q, idx, y = _example()
    N, n = p_all.size, y.size
    w = 1 / (N * q[idx])
    est, lo, hi, lam = active_interval(y, p_all[idx], w, N, p_all.sum(), (p_all**2).sum())
    z = w * y - lam * w * p_all[idx]
    hajek = (w * y).sum() / w.sum()
    r = np.var(z) / (hajek * (1 - hajek))
    thetas = np.linspace(0, 1, 200001)
    inside = thetas[(est - thetas) ** 2 <= Z**2 * (r * thetas * (1 - thetas) / n
                                                 + lam**2 * np.var(p_all) / N)]
    assert (lo, hi) == pytest.approx((inside.min(), inside.max()), abs=1e-5)


def test_uniform_design_without_the_sentinel_is_wilson():
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1.0])
    p = np.linspace(0.1, 0.8, 8)
    est, lo, hi, lam = active_interval(y, p, np.ones(8), 50, 20.0, 10.0, lam=0.0)
    assert (est, lo, hi) == pytest.approx((3 / 8, *wilson_interval(3, 8)), abs=1e-12)
    # all labels equal: lam = 0 and Wilson's interval widened by Kish's design effect
    w = np.array([0.5, 2.0, 1.0, 1.0])
    est, lo, hi, lam = active_interval(np.zeros(4), p[:4], w, 50, 20.0, 10.0)
    deff = np.mean(w**2) / np.mean(w) ** 2
    assert lam == 0.0 and est == 0.0 and lo == 0.0
    assert hi == pytest.approx(Z**2 * deff / 4 / (1 + Z**2 * deff / 4), abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        active_interval([1.0], [0.5], [1.0], 10, 5.0, 3.0)
    with pytest.raises(ValueError, match="method"):
        active_interval(y, p, np.ones(8), 50, 20.0, 10.0, method="exact")


def test_estimate_is_unbiased_over_the_design():
    """Exact expectation over every ordered pair of draws (n = 2), any lam: the slice's accuracy
    (a population where no estimate needs clipping to [0, 1])."""
    p = np.array([0.8, 0.2, 0.7, 0.3, 0.6])
    y = np.array([1, 0, 1, 0, 1.0])
    q = draw_probabilities(p)
    N = p.size
    for lam in (0.4, 0.7, 1.0):
        ests = {(i, j): active_interval(y[[i, j]], p[[i, j]], 1 / (N * q[[i, j]]), N, p.sum(),
                                        (p**2).sum(), lam=lam)[0]
                for i, j in itertools.product(range(N), repeat=2)}
        assert all(0 < v < 1 for v in ests.values())
        mean = sum(q[i] * q[j] * v for (i, j), v in ests.items())
        assert mean == pytest.approx(0.6, abs=1e-12)


def test_coverage_on_a_biased_sentinel():
    """The sentinel is off by 0.25 on this population; 400 audits of 40 draws cover its accuracy."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.95, 300)
    y = (rng.uniform(size=300) < truth).astype(float)
    p = np.clip(truth + 0.25, 0, 1)
    q = draw_probabilities(p)
    cover = []
    for _ in range(400):
        idx = rng.choice(300, 40, p=q)
        _, lo, hi, _ = active_interval(y[idx], p[idx], 1 / (300 * q[idx]), 300, p.sum(), (p**2).sum())
        cover.append(lo <= y.mean() <= hi)
    assert 0.92 <= np.mean(cover) <= 0.99


def test_plan_round_trip_and_audit_design(tmp_path):
    ids = [f"a/{i}" for i in range(6)] + [f"b/{i}" for i in range(4)]
    slices = ["a"] * 6 + ["b"] * 4
    p = [0.9, 0.2, 0.5, 0.7, 0.1, 0.4, 0.3, 0.6, 0.8, 0.5]
    plan = make_plan("sentinel-x", slices, ids, p, 5, seed=7, traces=["t.jsonl"])
    again = make_plan("sentinel-x", slices, ids, p, 5, seed=7)
    assert plan["slices"] == again["slices"]  # the seed decides the draws
    assert plan["slices"]["a"]["q"] == pytest.approx(draw_probabilities(p[:6]).tolist())
    assert all(len(d["draws"]) == 5 for d in plan["slices"].values())
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    with pytest.raises(FileExistsError):
        write_plan(path, plan)  # never replaced
    assert read_plan(path) == plan
    draws = plan["slices"]["a"]["draws"]
    labels = {i: i in ("a/0", "a/3") for i in draws}
    est = audit_design("a", plan_designs(plan)["a"], labels)
    q = np.array(plan["slices"]["a"]["q"])
    at = [ids.index(i) for i in draws]
    ref = active_interval([float(labels[i]) for i in draws], np.array(p)[at], 1 / (6 * q[at]),
                          6, sum(p[:6]), sum(v * v for v in p[:6]))
    assert (est.estimate, est.ci_low, est.ci_high, est.lam) == pytest.approx(ref, abs=1e-12)
    assert (est.n, est.n_labelled, est.unlabelled) == (6, 5, pytest.approx(sum(p[:6]) / 6))
    assert plan_labels(plan, labels) == sorted(set(plan["slices"]["b"]["draws"]))
    with pytest.raises(ValueError, match="1 labelled id.*not drawn by the plan"):
        plan_labels(plan, {**labels, "zz": True})
    with pytest.raises(ValueError, match="not unique"):
        make_plan("s", ["a", "a"], ["x", "x"], [0.5, 0.5], 2, seed=0)


def test_check_plan_errors(tmp_path):
    good = make_plan("s", ["a"] * 3, ["x", "y", "z"], [0.2, 0.5, 0.9], 2, seed=1)
    for mutate, msg in [(lambda d: d.update(format="x"), "not an active-labelling plan"),
                        (lambda d: d.update(version=2), "version 2"),
                        (lambda d: d["slices"]["a"].update(q=[0.5, 0.5, 0.5]), "sum to 1"),
                        (lambda d: d["slices"]["a"].update(p=[0.5]), "one length"),
                        (lambda d: d["slices"]["a"].update(draws=["w"]), "'w' is not in its population")]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=msg):
            check_plan(bad)
    (tmp_path / "p.json").write_text("{oops")
    with pytest.raises(ValueError, match="not JSON"):
        read_plan(tmp_path / "p.json")
    assert SliceDesign.of([0.5, 0.25], []).p_sum2 == pytest.approx(0.3125)


def test_audit_cli_suggest_then_plan(tmp_path, capsys):
    recs = make_traces(60, seed=5)
    traffic = tmp_path / "traffic.jsonl"
    write_traces(traffic, [{**r, "correct": None} for r in recs])
    plan = tmp_path / "plan.json"
    base = ["audit", "default", "--traces", str(traffic)]
    assert main([*base, "--suggest", "15", "--plan", str(plan), "--seed", "3"]) == 0
    ids = capsys.readouterr().out.split()
    saved = read_plan(plan)
    assert len(ids) == 4 * 15 and ids == [i for d in saved["slices"].values() for i in d["draws"]]
    assert saved["seed"] == 3 and saved["sentinel"].startswith("sentinel-")
    assert main([*base, "--suggest", "15", "--plan", str(plan)]) == 1  # never replaced
    assert "exists" in capsys.readouterr().err
    truth = {r["id"]: r["correct"] for r in recs}
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "correct": truth[i]}) + "\n" for i in set(ids)))
    assert main([*base, "--labels", str(labels), "--plan", str(plan), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    designs = plan_designs(saved)
    band = load_sentinel(resolve_sentinel_path("default")).metadata["band"]
    for o in out:
        ref = audit_design(o["slice"], designs[o["slice"]], truth, band)
        assert o == ref.as_dict() and o["n"] == 60 and o["n_labelled"] == 15
    # traffic that grew since the plan: the new responses are outside the design, the result is the same
    more = tmp_path / "more.jsonl"
    write_traces(more, [{**r, "id": "new-" + r["id"], "correct": None} for r in recs[:7]])
    assert main(["audit", "default", "--traces", str(traffic), str(more), "--labels", str(labels),
                 "--plan", str(plan), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == out and "7 response(s) of the traces are not in the plan" in cap.err
    # labels the plan did not draw; a plan for another sentinel; other traces
    other = next(r["id"] for r in recs if r["id"] not in ids)
    (tmp_path / "extra.jsonl").write_text(labels.read_text() + json.dumps({"id": other, "correct": True}))
    assert main([*base, "--labels", str(tmp_path / "extra.jsonl"), "--plan", str(plan)]) == 1
    assert "were not drawn by the plan" in capsys.readouterr().err
    alien = tmp_path / "alien.json"
    alien.write_text(json.dumps({**saved, "sentinel": "sentinel-000000000000"}))
    assert main([*base, "--labels", str(labels), "--plan", str(alien)]) == 1
    assert "made with sentinel-000000000000" in capsys.readouterr().err
    fewer = tmp_path / "fewer.jsonl"
    write_traces(fewer, [{**r, "correct": None} for r in recs[1:]])
    assert main(["audit", "default", "--traces", str(fewer), "--labels", str(labels), "--plan", str(plan)]) == 1
    assert "not in these traces" in capsys.readouterr().err
    for extra, msg in [(["--labels", str(labels), "--suggest", "3", "--plan", "x"], "give one of them"),
                       (["--suggest", "3"], "needs --plan"), ([], "give --labels")]:
        assert main([*base, *extra]) == 1
        assert msg in capsys.readouterr().err
    assert not math.isnan(out[0]["estimate"])


def test_audit_design_unlabelled_interval_is_the_files_band():
    """The planned audit's unlabelled column carries the same interval as ``estimate``: the band
    (q + 1.96 se, clipped) with band metadata, sampling noise without; se from the design's sums."""
    p = [0.9, 0.2, 0.5, 0.7]
    design = SliceDesign.of(p, [])
    se = math.sqrt(0.09 + 0.16 + 0.25 + 0.21) / 4  # sum p(1-p) by hand; 1.96 se = 0.4129
    samp = audit_design("a", design, {})
    assert samp.unlabelled_interval == "sampling"
    assert (samp.unlabelled_ci_low, samp.unlabelled_ci_high) == pytest.approx(
        (0.575 - Z * se, 0.575 + Z * se), abs=1e-12)
    band = {"method": "conformal-linear", "q": 0.1, "level": 0.95, "n_units": 19}
    b = audit_design("a", design, {}, band)
    assert b.unlabelled_interval == "band" and b.unlabelled == pytest.approx(0.575)
    assert (b.unlabelled_ci_low, b.unlabelled_ci_high) == pytest.approx(
        (0.575 - 0.1 - Z * se, 1.0), abs=1e-12)  # 0.575 + 0.513 > 1: clipped


def test_audit_cli_plan_shows_the_band_as_estimate(tmp_path, capsys):
    recs = make_traces(40, seed=9)
    traffic = tmp_path / "traffic.jsonl"
    write_traces(traffic, recs)
    plan = tmp_path / "plan.json"
    base = ["audit", "default", "--traces", str(traffic)]
    assert main([*base, "--suggest", "10", "--plan", str(plan), "--seed", "1"]) == 0
    ids = set(capsys.readouterr().out.split())
    truth = {r["id"]: r["correct"] for r in recs}
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "correct": truth[i]}) + "\n" for i in ids))
    assert main([*base, "--labels", str(labels), "--plan", str(plan), "--json"]) == 0
    audited = json.loads(capsys.readouterr().out)
    assert main(["estimate", "default", str(traffic), "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["interval"] == "band" and len(audited) == len(est["slices"]) == 4
    for o in audited:
        e = est["slices"][o["slice"]]
        assert o["unlabelled_interval"] == "band"
        assert (o["unlabelled"], o["unlabelled_ci_low"], o["unlabelled_ci_high"]) == pytest.approx(
            (e["estimate"], e["ci_low"], e["ci_high"]), abs=1e-9)
