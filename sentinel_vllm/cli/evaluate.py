"""``sentinel-vllm evaluate``: the paper's protocol on labelled traces.

Writes into ``--out-dir``: ``auroc.csv``/``.md`` (AUROC of each statistic),
``slices.csv`` (per composition and slice: estimated, interval, true, AEE; the interval of
this protocol's in-run sentinel is sampling noise only, ``interval = "sampling"``: the band
is judged by ``--protocol lobo --band``),
``compositions.csv`` (median/mean AEE, Spearman rho, on all and unseen slices,
Brier, ECE), ``report.md`` (all tables) and, per composition, a reliability
diagram and an estimated-versus-true plot.
"""

from __future__ import annotations

import os

from sentinel_vllm.cli import _advise, _common, _lobo

EPILOG = ("examples:\n  sentinel-vllm evaluate traces.jsonl.gz --train gsm8k,ocw --out-dir eval/\n"
          "  sentinel-vllm evaluate traces.jsonl.gz --sweep --out-dir sweep/\n"
          "  sentinel-vllm evaluate traces.jsonl.gz --protocol lobo --out-dir lobo/")
COMP_COLUMNS = ["train", "median_aee", "mean_aee", "spearman_rho", "median_aee_unseen",
                "spearman_rho_unseen", "brier", "ece"]
SLICE_COLUMNS = ["train", "slice", "seen", "n", "estimated", "ci_low", "ci_high", "interval", "true",
                 "aee"]


def add_parser(sub):
    import argparse

    p = sub.add_parser("evaluate", help="evaluate estimation quality (AEE, rho, AUROC)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_trace_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--train", default=None, help="comma-separated training composition")
    g.add_argument("--sweep", action="store_true", help="every composition of 1-2 slices")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    _lobo.add_arguments(p)
    _advise.add_arguments(p)
    return p


def composition_row(c) -> list:
    """One row of the compositions table."""
    return ["+".join(c.train_slices), c.summary["median_aee"], c.summary["mean_aee"],
            c.summary["spearman_rho"], c.summary_unseen["median_aee"],
            c.summary_unseen["spearman_rho"], c.brier, c.ece]


def run(args) -> int:
    _lobo.feature_sets(args)  # an unknown name, or --feature-set without --protocol lobo
    if args.band and args.protocol != "lobo":
        raise ValueError("--band applies to --protocol lobo (it judges the band on the held-out "
                         "units); a sentinel's own band: sentinel-vllm train --band")
    if args.advise:
        return _advise.run(args)
    if args.protocol == "lobo":
        if args.train or args.sweep:
            raise ValueError("--protocol lobo chooses its own training sets; drop --train/--sweep")
        return _lobo.run(args)
    from sentinel_vllm.evaluate import evaluate_composition, plot_run, statistic_auroc, sweep

    traces = _common.keep_scorable(args, _common.load(args), [("paper", args.entropy, args.k, None)])
    os.makedirs(args.out_dir, exist_ok=True)
    kw = {"entropy": args.entropy, "k": args.k, "random_state": args.seed}
    if args.sweep:
        results = sweep(traces, **kw)
    else:
        train = (args.train.split(",") if args.train
                 else sorted({t.slice for t in traces if t.correct is not None}))
        results = [evaluate_composition(traces, train, **kw)]
    auroc = statistic_auroc(traces, args.entropy, args.k)
    auroc_rows = [[name, v["auroc"], v["direction"]] for name, v in auroc.items()]
    comp_rows = [composition_row(c) for c in results]
    slice_rows = [[r[c] for c in SLICE_COLUMNS] for res in results for r in res.rows()]
    out = args.out_dir
    _common.write_csv(os.path.join(out, "auroc.csv"), ["statistic", "auroc", "direction"], auroc_rows)
    _common.write_csv(os.path.join(out, "compositions.csv"), COMP_COLUMNS, comp_rows)
    _common.write_csv(os.path.join(out, "slices.csv"), SLICE_COLUMNS, slice_rows)
    report = [f"# Evaluation ({args.entropy} entropy)", "",
              "## Estimation per slice (best composition first)", "",
              _common.markdown_table(SLICE_COLUMNS, [r for r in slice_rows
                                                     if r[0] == comp_rows[0][0]]),
              "", "## Compositions", "", _common.markdown_table(COMP_COLUMNS, comp_rows),
              "", "## AUROC of each statistic alone", "",
              _common.markdown_table(["statistic", "auroc", "direction"], auroc_rows), ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(report))
    if not args.no_plots:
        for c in results:
            plot_run(c, os.path.join(out, "+".join(c.train_slices)))
    print("\n".join(report))
    return 0
