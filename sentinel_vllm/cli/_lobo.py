"""``sentinel-vllm evaluate --protocol lobo``: leave-one-benchmark-out tables and plot.

Writes into ``--out-dir``: ``lobo_units.csv`` (per recipe, estimator and held-out
unit: estimated, true, AEE, training benchmarks), ``lobo_summary.csv`` (per recipe
and estimator: median, mean and worst AEE, Spearman rho), ``lobo.md`` (both tables
beside the paper's own two-benchmark protocol) and ``lobo.png``; with ``--band``,
``band_units.csv`` / ``band_summary.csv`` (the 95% interval of each unit's true accuracy
per band method, judged nested: coverage and mean half-width; sentinel_vllm/band.py).
"""

from __future__ import annotations

import os

from sentinel_vllm.cli import _common


def add_arguments(p) -> None:
    """The options of the LOBO protocol (on the evaluate parser)."""
    p.add_argument("--protocol", choices=("paper", "lobo"), default="paper",
                   help="paper: train on --train (or --sweep) and estimate every slice; "
                        "lobo: leave one benchmark out, for every benchmark")
    p.add_argument("--composition", default="all,extremes",
                   help="lobo: training compositions, comma list of all (every other "
                        "benchmark) and extremes (the paper's pair among them)")
    p.add_argument("--feature-set", default=None,
                   help="lobo: comma list of feature sets (paper, the default, paper+length, "
                        "paper+tail, paper+logprob, paper+topk, paper+length+temperature, "
                        "paper+length+drawn, paper+length+sampling, all); the topk group reads "
                        "top<--k> (default: the traces' one k)")
    p.add_argument("--estimator", default="pcc",
                   help="lobo: comma list of slice estimators (pcc = mean P, the paper's; "
                        "acc, pacc, emq, hdy, kdey from QuaPy)")
    p.add_argument("--train-temperatures", default=None,
                   help="lobo: train only on traces at these temperatures (comma list)")
    p.add_argument("--test-temperatures", default=None,
                   help="lobo: hold out only traces at these temperatures (comma list)")
    p.add_argument("--band", action="store_true",
                   help="lobo: judge the 95%% interval of each unit's true accuracy, nested (the "
                        "band of a unit is fitted on the protocol run without its benchmark): "
                        "coverage and mean half-width of each band method (sentinel_vllm/band.py)")


def _floats(text):
    return None if not text else [float(v) for v in text.split(",") if v]


def _names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def feature_sets(args) -> list[str]:
    """The ``--feature-set`` names (default ``["paper"]``).

    Raises
    ------
    ValueError
        An unknown name, or ``--feature-set`` without ``--protocol lobo``.
    """
    from sentinel_vllm.feature_sets import FEATURE_SETS

    names = _names(args.feature_set) if args.feature_set is not None else ["paper"]
    unknown = [n for n in names if n not in FEATURE_SETS]
    if unknown or not names:
        raise ValueError(f"unknown --feature-set {', '.join(map(repr, unknown)) or repr(args.feature_set)}; "
                         f"known: {', '.join(FEATURE_SETS)}")
    if args.feature_set is not None and args.protocol != "lobo":
        raise ValueError("--feature-set applies to --protocol lobo (the paper protocol uses the "
                         "11 statistics)")
    return names


def paper_reference(traces, entropy, k, seed) -> list | None:
    """The paper's two-benchmark protocol on the same traces: train on the extremes pair
    (80%), summarise the UNSEEN slices. None when it cannot be run (fewer than 3 slices)."""
    import numpy as np

    from sentinel_vllm.evaluate import evaluate_composition
    from sentinel_vllm.protocol import extremes_pair, summarise

    lab = [t for t in traces if t.correct is not None]
    names = sorted({t.slice for t in lab})
    if len(names) < 3:
        return None
    acc = {s: float(np.mean([t.correct for t in lab if t.slice == s])) for s in names}
    pair = extremes_pair(acc)
    res = evaluate_composition(lab, pair, entropy=entropy, k=k, random_state=seed)
    rows = [{"unit": s, "estimated": e.estimate, "true": e.true, "aee": e.aee}
            for s, e in res.slices.items() if not res.seen[s]]
    s = summarise(rows)
    return [f"paper protocol: train {'+'.join(pair)} (80%), unseen slices", "pcc", s["n_units"],
            s["median_aee"], s["mean_aee"], s["worst_aee"], s["worst_unit"], s["spearman_rho"]]


BAND_UNIT_COLUMNS = ["recipe", "method", "unit", "n", "estimated", "true", "se", "q", "halfwidth",
                     "low", "high", "covered"]
BAND_SUMMARY_COLUMNS = ["recipe", "method", "n_units", "coverage", "mean_halfwidth", "misses"]


def _band_tables(traces, args, comp, fs, memo) -> tuple[list, list]:
    """Nested band coverage of one recipe, every method: (unit rows, summary rows)."""
    from sentinel_vllm.band import METHODS, nested_coverage, nested_units

    outer, inner = nested_units(traces, composition=comp, feature_set=fs, entropy=args.entropy,
                                k=args.k, random_state=args.seed, classifier_factory=memo,
                                train_temperatures=_floats(args.train_temperatures),
                                test_temperatures=_floats(args.test_temperatures))
    recipe = f"{comp}/{fs}"
    n = {r["unit"]: r["n"] for r in outer}
    units, summary = [], []
    for m in METHODS:
        cov = nested_coverage(outer, inner, m)
        units += [[recipe, m, r["unit"], n[r["unit"]], r["estimated"], r["true"], r["se"], r["q"],
                   r["halfwidth"], r["low"], r["high"], r["covered"]] for r in cov["rows"]]
        summary.append([recipe, m, cov["n_units"], cov["coverage"], cov["mean_halfwidth"],
                        " ".join(cov["misses"]) or "-"])
    return units, summary


def run(args) -> int:
    from sentinel_vllm.band import memo_factory
    from sentinel_vllm.protocol import ROW_COLUMNS, SUMMARY_COLUMNS, lobo, plot_lobo

    sets = feature_sets(args)
    # the sets are compared on the same labelled traces: with --skip-bad, those every set can score
    traces = _common.keep_scorable(args, [t for t in _common.load(args) if t.correct is not None],
                                   [(fs, args.entropy, args.k, args.k) for fs in sets], check=True)
    os.makedirs(args.out_dir, exist_ok=True)
    results, band_units, band_summary = [], [], []
    memo = memo_factory(args.seed)  # the band's nested runs refit the same folds
    for comp in _names(args.composition):
        for fs in sets:
            out = lobo(traces, composition=comp, feature_set=fs, estimators=_names(args.estimator),
                       entropy=args.entropy, k=args.k, random_state=args.seed,
                       train_temperatures=_floats(args.train_temperatures),
                       test_temperatures=_floats(args.test_temperatures), classifier_factory=memo)
            results += list(out.values())
            if args.band:
                u, s = _band_tables(traces, args, comp, fs, memo)
                band_units, band_summary = band_units + u, band_summary + s
    unit_rows = [r for res in results for r in res.table_rows()]
    summary_rows = [res.summary_row() for res in results]
    ref = None
    if args.train_temperatures is None and args.test_temperatures is None:
        ref = paper_reference(traces, args.entropy, args.k, args.seed)
    _common.write_csv(os.path.join(args.out_dir, "lobo_units.csv"), ROW_COLUMNS, unit_rows)
    _common.write_csv(os.path.join(args.out_dir, "lobo_summary.csv"), SUMMARY_COLUMNS,
                      summary_rows + ([ref] if ref else []))
    report = [f"# Leave-one-benchmark-out ({args.entropy} entropy)", "",
              "## Summary over held-out benchmarks", "",
              _common.markdown_table(SUMMARY_COLUMNS, summary_rows + ([ref] if ref else [])), "",
              "## Held-out units", "", _common.markdown_table(ROW_COLUMNS, unit_rows), ""]
    if args.band:
        _common.write_csv(os.path.join(args.out_dir, "band_units.csv"), BAND_UNIT_COLUMNS,
                          band_units)
        _common.write_csv(os.path.join(args.out_dir, "band_summary.csv"), BAND_SUMMARY_COLUMNS,
                          band_summary)
        report += ["## 95% interval of the true accuracy, judged nested", "",
                   _common.markdown_table(BAND_SUMMARY_COLUMNS, band_summary), "",
                   _common.markdown_table(BAND_UNIT_COLUMNS, band_units), ""]
    with open(os.path.join(args.out_dir, "lobo.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(report))
    if not args.no_plots:
        plot_lobo(results, os.path.join(args.out_dir, "lobo.png"))
    print("\n".join(report))
    return 0
