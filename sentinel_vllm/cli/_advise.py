"""``sentinel-vllm evaluate --advise``: rank training compositions from the traces alone.

Writes ``advise.csv`` (rank, composition, accuracy spread, entropy coverage, score);
with ``--advise-check`` also trains each candidate and writes ``advise_check.csv``
(its worst, mean and median AEE on the benchmarks it did not see, and its rank by
worst AEE), then says in which quartile the advised composition landed.
"""

from __future__ import annotations

import os

from sentinel_vllm.cli import _common

CHECK_COLUMNS = ["rank", "composition", "median_aee", "mean_aee", "worst_aee", "protocol_rank"]


def add_arguments(p) -> None:
    """The options of the composition advice (on the evaluate parser)."""
    p.add_argument("--advise", action="store_true",
                   help="rank training compositions of --advise-size benchmarks from the traces alone "
                        "(accuracy spread, ties by entropy-profile coverage)")
    p.add_argument("--advise-size", type=int, default=2)
    p.add_argument("--advise-check", action="store_true",
                   help="with --advise: train every candidate and rank it by its worst AEE on unseen benchmarks")


def run(args) -> int:
    from sentinel_vllm.advise import ADVICE_COLUMNS, advise, check_advice

    traces = _common.load(args)
    os.makedirs(args.out_dir, exist_ok=True)
    adv = advise(traces, args.advise_size)
    rows = [[r["rank"], "+".join(r["composition"]), r["accuracy_spread"], r["entropy_coverage"],
             r["score"]] for r in adv]
    _common.write_csv(os.path.join(args.out_dir, "advise.csv"), ADVICE_COLUMNS, rows)
    print(_common.markdown_table(ADVICE_COLUMNS, rows))
    if args.advise_check:
        chk = check_advice(traces, adv, random_state=args.seed)
        crow = [[c["rank"], "+".join(c["composition"]), c["median_aee"], c["mean_aee"],
                 c["worst_aee"], c["protocol_rank"]] for c in chk]
        _common.write_csv(os.path.join(args.out_dir, "advise_check.csv"), CHECK_COLUMNS, crow)
        print()
        print(_common.markdown_table(CHECK_COLUMNS, crow))
        first = chk[0]["protocol_rank"]
        quartile = -(-4 * first // len(chk))
        print(f"\nadvised {'+'.join(chk[0]['composition'])}: protocol rank {first} of {len(chk)} "
              f"(quartile {quartile})")
    return 0
