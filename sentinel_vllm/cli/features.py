"""``sentinel-vllm features``: the 11 trajectory statistics of each trace as CSV."""

from __future__ import annotations

from sentinel_vllm.cli import _common

EPILOG = "example: sentinel-vllm features traces.jsonl --entropy topk --out features.csv"


def add_parser(sub):
    p = sub.add_parser("features", help="compute the 11 statistics per trace", epilog=EPILOG)
    _common.add_trace_args(p)
    p.add_argument("--out", required=True, help="output CSV (- for stdout)")
    return p


def run(args) -> int:
    from sentinel_vllm.features import FEATURE_NAMES
    from sentinel_vllm.traces import feature_matrix

    _common.check_out(args.out, [*args.traces])
    traces = _common.keep_scorable(args, _common.load(args), [("paper", args.entropy, args.k, None)])
    X = feature_matrix(traces, args.entropy, args.k)
    rows = [[t.id, t.slice, "" if t.correct is None else int(t.correct), *map(repr, x)]
            for t, x in zip(traces, X.tolist())]
    _common.write_csv(args.out, ["id", "slice", "correct", *FEATURE_NAMES], rows)
    return 0
