"""``sentinel-vllm bench topk-vs-full``: estimation quality per entropy variant.

Writes ``topk_vs_full.csv``, ``topk_vs_full.md`` and ``topk_vs_full.png``
(median AEE and Spearman rho against k, with the full-vocabulary line) into
``--out-dir`` and prints the table. Speed of the same question is measured by
``benchmarks/bench_kernel.py``.
"""

from __future__ import annotations

import os

from sentinel_vllm.cli import _common

EPILOG = ("example: sentinel-vllm bench topk-vs-full traces.jsonl.gz --k 1,5,10,20,50 "
          "--compositions gsm8k+ocw,svamp+math_l5 --out-dir bench/")


def add_parser(sub):
    p = sub.add_parser("bench", help="quality benchmarks on traces", epilog=EPILOG)
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    q = bsub.add_parser("topk-vs-full", help="full-vocabulary versus top-k entropy", epilog=EPILOG)
    q.add_argument("traces", nargs="+", metavar="TRACES")
    q.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records (and those without the full entropy series) and count them")
    q.add_argument("--k", default="1,5,10,20,50", help="comma-separated k values")
    q.add_argument("--compositions", default=None,
                   help="comma-separated compositions, slices joined by '+' (default: Extremes)")
    q.add_argument("--no-renorm", action="store_true", help="skip the renormalised variants")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out-dir", default=".")
    return p


def run(args) -> int:
    from sentinel_vllm.topk_vs_full import COLUMNS, compare_variants, plot_variants
    from sentinel_vllm.traces import check_series

    traces = _common.load(args)
    if any(t.series("full") is not None for t in traces):  # the reference series: all or none
        traces = _common.keep_scorable(args, traces)
        check_series(traces, "full")
    ks = [int(k) for k in args.k.split(",") if k]
    comps = ([c.split("+") for c in args.compositions.split(",") if c]
             if args.compositions else None)
    results = compare_variants(traces, ks, comps, renorm=not args.no_renorm, random_state=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [r.row() for r in results]
    _common.write_csv(os.path.join(args.out_dir, "topk_vs_full.csv"), COLUMNS, rows)
    comp_txt = ", ".join("+".join(c.train_slices) for c in
                         next((r.compositions for r in results if r.available), []))
    table = _common.markdown_table(COLUMNS, rows)
    with open(os.path.join(args.out_dir, "topk_vs_full.md"), "w", encoding="utf-8") as fh:
        fh.write(f"Compositions: {comp_txt}\n\n{table}\n")
    plot_variants(results, os.path.join(args.out_dir, "topk_vs_full.png"))
    print(f"Compositions: {comp_txt}\n\n{table}")
    missing = [r.variant for r in results if not r.available]
    if missing:
        print(f"\nunavailable in these traces: {', '.join(missing)}")
    return 0
