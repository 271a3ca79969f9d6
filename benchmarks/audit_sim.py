"""Audit simulation: PPI++ versus labels alone versus the unlabelled estimate, on real traces.

For every benchmark ``b`` of the traces, a sentinel is trained WITHOUT ``b``
(leave-one-benchmark-out, so its bias on ``b`` is the realistic one) and scores
all of ``b``'s responses. Then, for each audit size n and many random draws, n
responses are labelled (drawn with replacement: iid from ``b``'s empirical
distribution) and the slice accuracy (``b``'s accuracy over all its responses)
is estimated three ways:

* PPI++ (``sentinel_vllm.audit.ppi_interval``; unlabelled = all of ``b``'s responses), with
  the score-inverted interval the ``audit`` command uses and with ppi-python's Wald form,
* labels only, with the Wilson interval,
* the unlabelled estimate (mean P(correct); no interval that covers the bias).

Printed per n (pooled over benchmarks and draws): mean absolute error, mean
interval width and coverage of the 95% intervals, and the lowest per-benchmark
coverage.

With ``--sentinel S.onnx`` (or ``default``) one fixed sentinel scores every
benchmark instead: the deployed case, e.g. the embedded default (trained at
T = 0.5) on traffic at T = 0 or 1.0, where its bias is largest.

With ``--active`` it compares, on the same benchmarks and n, active labelling
(``sentinel_vllm.active_audit``: n draws favouring the responses the sentinel is least
sure of, the weighted PPI++ estimate and its score interval; at ``eta`` = the default
and ``--eta-alt``) with random labels (the PPI++ audit above): coverage, mean width and
their ratio; and the best ratio any design driven by the sentinel's score could reach,
computed exactly (no draws): the variance of the Hansen-Hurwitz estimate under draw
probabilities proportional to ``sqrt(E[(y - lam p)^2 | p])`` with ``E[y | p]`` the
benchmark's own isotonic calibration (fitted on all its labels: an oracle no audit has),
best ``lam``, against uniform draws at their best ``lam``.

Usage::

    python benchmarks/audit_sim.py data/traces/qwen2.5-coder-0.5b.jsonl.gz --draws 1000
    python benchmarks/audit_sim.py data/traces/qwen2.5-coder-0.5b-t1.jsonl.gz --sentinel default
    python benchmarks/audit_sim.py data/traces/qwen2.5-coder-0.5b-t0.jsonl.gz --sentinel default --active
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import numpy as np


def lobo_scores(traces, composition: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Benchmark -> (P(correct) from a sentinel trained without it, labels)."""
    from sentinel_vllm.classifier import SentinelClassifier
    from sentinel_vllm.protocol import extremes_pair
    from sentinel_vllm.traces import feature_matrix

    lab = [t for t in traces if t.correct is not None]
    X = feature_matrix(lab, "full")
    y = np.array([t.correct for t in lab], dtype=int)
    bench = np.array([t.slice for t in lab])
    out = {}
    for b in sorted(set(bench.tolist())):
        others = bench != b
        if composition == "extremes":
            acc = {s: y[bench == s].mean() for s in set(bench[others].tolist())}
            others &= np.isin(bench, extremes_pair(acc))
        clf = SentinelClassifier(random_state=seed).fit(X[others], y[others])
        out[b] = (clf.predict_proba(X[bench == b])[:, 1], y[bench == b])
    return out


def sentinel_scores(traces, sentinel: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Benchmark -> (P(correct) from one fixed sentinel file, labels)."""
    from sentinel_vllm.cli.score import score_traces

    lab = [t for t in traces if t.correct is not None]
    _, p, _ = score_traces(sentinel, lab)
    bench = np.array([t.slice for t in lab])
    y = np.array([t.correct for t in lab], dtype=int)
    return {b: (p[bench == b], y[bench == b]) for b in sorted(set(bench.tolist()))}


def simulate(scores, ns, draws: int, seed: int) -> list[dict]:
    """One row per (benchmark, n) with errors, widths and coverage of the three estimates."""
    from sentinel_vllm.audit import ppi_interval, wilson_interval

    rng = np.random.default_rng(seed)
    rows = []
    for b, (p, y) in scores.items():
        true = y.mean()
        for n in ns:
            r = {"benchmark": b, "n": n, "true": true, "ppi_err": [], "ppi_w": [], "ppi_cov": [],
                 "wald_w": [], "wald_cov": [],
                 "lab_err": [], "lab_w": [], "lab_cov": [], "unl_err": abs(p.mean() - true)}
            for _ in range(draws):
                idx = rng.integers(0, len(y), n)
                est, lo, hi, _ = ppi_interval(y[idx], p[idx], p)
                r["ppi_err"].append(abs(est - true))
                r["ppi_w"].append(hi - lo)
                r["ppi_cov"].append(lo <= true <= hi)
                _, wlo_, whi_, _ = ppi_interval(y[idx], p[idx], p, method="wald")
                r["wald_w"].append(whi_ - wlo_)
                r["wald_cov"].append(wlo_ <= true <= whi_)
                k = int(y[idx].sum())
                wlo, whi = wilson_interval(k, n)
                r["lab_err"].append(abs(k / n - true))
                r["lab_w"].append(whi - wlo)
                r["lab_cov"].append(wlo <= true <= whi)
            rows.append({key: (float(np.mean(v)) if isinstance(v, list) else v) for key, v in r.items()})
    return rows


def simulate_active(scores, ns, draws: int, seed: int, etas) -> list[dict]:
    """One row per (benchmark, n): coverage and width of active labelling at each ``eta`` and of
    random labels (PPI++), each design with its own draws."""
    from sentinel_vllm.active_audit import active_interval, draw_probabilities
    from sentinel_vllm.audit import ppi_interval

    rng = np.random.default_rng(seed)
    rows = []
    for b, (p, y) in scores.items():
        true, N, sums = y.mean(), len(y), (len(y), float(p.sum()), float((p * p).sum()))
        qs = {eta: draw_probabilities(p, eta) for eta in etas}
        for n in ns:
            r = {"benchmark": b, "n": n, "rand_w": [], "rand_cov": []}
            for _ in range(draws):
                idx = rng.integers(0, N, n)
                _, lo, hi, _ = ppi_interval(y[idx], p[idx], p)
                r["rand_w"].append(hi - lo)
                r["rand_cov"].append(lo <= true <= hi)
                for eta, q in qs.items():
                    idx = rng.choice(N, n, p=q)
                    _, lo, hi, _ = active_interval(y[idx], p[idx], 1 / (N * q[idx]), *sums)
                    r.setdefault(f"act{eta}_w", []).append(hi - lo)
                    r.setdefault(f"act{eta}_cov", []).append(lo <= true <= hi)
            rows.append({k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in r.items()})
    return rows


def oracle_ratio(p, y) -> float:
    """sqrt(variance of the best sentinel-driven design / variance of uniform draws), both at their
    best lam (per-draw Hansen-Hurwitz variance; the lam^2 var(p) / N term is left out of both)."""
    from sklearn.isotonic import IsotonicRegression

    y = y.astype(float)
    m = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y).predict(p)
    lams = np.linspace(0, 1, 101)

    def var(r, q):
        return float((r * r / (len(r) ** 2 * q)).sum() - r.mean() ** 2)

    uni = min(var(y - lam * p, np.full(len(y), 1 / len(y))) for lam in lams)
    best = min(var(y - lam * p, (s := np.sqrt(np.maximum(m * (1 - 2 * lam * p) + (lam * p) ** 2, 1e-12))) / s.sum())
               for lam in lams)
    return math.sqrt(best / uni) if uni > 0 else float("nan")


def print_active(scores, rows, ns, etas) -> None:
    e0 = etas[0]
    print("\n| n | active coverage (min) | active width | random coverage (min) | random width "
          "| active / random width | " + " | ".join(f"eta={e} coverage (min) / width ratio" for e in etas[1:])
          + " |")
    print("|---|---|---|---|---|---|" + "---|" * (len(etas) - 1))
    for n in ns:
        rs = [r for r in rows if r["n"] == n]
        m = functools.partial(_agg, np.mean, rs)
        lo = functools.partial(_agg, np.min, rs)
        alt = " | ".join(f"{m(f'act{e}_cov'):.3f} ({lo(f'act{e}_cov'):.3f}) / {m(f'act{e}_w') / m('rand_w'):.3f}"
                         for e in etas[1:])
        print(f"| {n} | {m(f'act{e0}_cov'):.3f} ({lo(f'act{e0}_cov'):.3f}) | {m(f'act{e0}_w'):.3f} "
              f"| {m('rand_cov'):.3f} ({lo('rand_cov'):.3f}) | {m('rand_w'):.3f} "
              f"| {m(f'act{e0}_w') / m('rand_w'):.3f} | {alt} |")
    print("\nper benchmark: AUROC of P(correct), width ratio active/random at each n, best design (oracle):")
    from sklearn.metrics import roc_auc_score

    ratios = []
    for b, (p, y) in scores.items():
        auc = roc_auc_score(y, p) if 0 < y.mean() < 1 else float("nan")
        wr = " ".join(f"n={r['n']}:{r[f'act{e0}_w'] / r['rand_w']:.3f}" for r in rows if r["benchmark"] == b)
        ratios.append(oracle_ratio(p, y))
        print(f"  {b:14s} acc={y.mean():.3f} auroc={auc:.2f}  {wr}  oracle={ratios[-1]:.3f}")
    print(f"  mean oracle ratio (best sentinel-driven design / uniform): {np.nanmean(ratios):.3f}")


def _agg(fn, rs, key) -> float:
    return float(fn([r[key] for r in rs]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--n", default="25,50,100,200")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--composition", default="extremes", choices=("all", "extremes"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sentinel", default=None,
                    help="score with this sentinel file ('default': the embedded one) instead of LOBO")
    ap.add_argument("--cache", default=None, help=".npz to keep the sentinels' scores in (reused when present)")
    ap.add_argument("--active", action="store_true",
                    help="compare active labelling with random labels (and the best sentinel-driven design)")
    ap.add_argument("--eta-alt", default="0.2", help="other eta values of the active design to show (comma list)")
    args = ap.parse_args(argv)
    from sentinel_vllm.traces import read_traces

    t0 = time.time()
    traces = read_traces(args.traces)
    import os

    if args.sentinel:
        scores = sentinel_scores(traces, args.sentinel)
    elif args.cache and os.path.exists(args.cache):
        z = np.load(args.cache)
        scores = {k[2:]: (z[k], z["y_" + k[2:]]) for k in z.files if k.startswith("p_")}
    else:
        scores = lobo_scores(traces, args.composition, args.seed)
        if args.cache:
            np.savez(args.cache, **{f"p_{b}": v[0] for b, v in scores.items()},
                     **{f"y_{b}": v[1] for b, v in scores.items()})
    ns = [int(v) for v in args.n.split(",")]
    if args.active:
        from sentinel_vllm.active_audit import ETA

        etas = [ETA] + [float(v) for v in args.eta_alt.split(",") if v]
        rows = simulate_active(scores, ns, args.draws, args.seed, etas)
        print(f"# audit_sim --active  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  "
              f"traces={','.join(args.traces)}  sentinel: {args.sentinel or 'LOBO'}  draws={args.draws} "
              f"per benchmark and n and design  eta={etas}  ({time.time() - t0:.0f} s)")
        print_active(scores, rows, ns, etas)
        return 0
    rows = simulate(scores, ns, args.draws, args.seed)
    print(f"# audit_sim  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  traces={','.join(args.traces)}  "
          f"sentinel: {args.sentinel or f'leave-one-benchmark-out ({args.composition})'}  draws={args.draws} per benchmark and n  "
          f"benchmarks={len(scores)}  ({time.time() - t0:.0f} s)")
    print("| n | PPI++ abs err | PPI++ width | PPI++ coverage (min over benchmarks) "
          "| PPI++ Wald width | PPI++ Wald coverage (min) | labels-only abs err "
          "| Wilson width | Wilson coverage (min) | unlabelled abs err | width PPI++/Wilson |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        rs = [r for r in rows if r["n"] == n]
        m = functools.partial(_agg, np.mean, rs)
        lo = functools.partial(_agg, np.min, rs)
        print(f"| {n} | {m('ppi_err'):.3f} | {m('ppi_w'):.3f} | {m('ppi_cov'):.3f} ({lo('ppi_cov'):.3f}) "
              f"| {m('wald_w'):.3f} | {m('wald_cov'):.3f} ({lo('wald_cov'):.3f}) "
              f"| {m('lab_err'):.3f} | {m('lab_w'):.3f} | {m('lab_cov'):.3f} ({lo('lab_cov'):.3f}) "
              f"| {m('unl_err'):.3f} | {m('ppi_w') / m('lab_w'):.2f} |")
    print("\nper benchmark (PPI++ coverage at each n):")
    for b in scores:
        cov = " ".join(f"n={r['n']}:{r['ppi_cov']:.3f}" for r in rows if r["benchmark"] == b)
        print(f"  {b:12s} true={scores[b][1].mean():.3f} unlabelled={scores[b][0].mean():.3f}  {cov}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
