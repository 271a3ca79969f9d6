"""``sentinel-vllm estimate``: per-slice estimated accuracy with 95% intervals.

The interval is the sentinel file's band (``interval = "band"``: its own error on
held-out benchmarks and temperatures plus sampling noise), or sampling noise alone for
a file without band metadata (``"sampling"``). With audit labels, ``sentinel-vllm
audit`` gives the PPI++ interval (``"ppi++"``), valid whatever the sentinel's error.
"""

from __future__ import annotations

import json
import math

from sentinel_vllm.cli import _common

EPILOG = "example: sentinel-vllm estimate sentinel.onnx traffic.jsonl --json"
COLUMNS = ["slice", "n", "estimated", "ci_low", "ci_high", "interval", "true", "aee"]


def add_parser(sub):
    p = sub.add_parser("estimate", help="estimate per-slice accuracy", epilog=EPILOG)
    p.add_argument("sentinel", help="sentinel .onnx file (or 'default')")
    _common.add_trace_args(p, entropy=False)
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of a table (undefined values, e.g. rho of one slice, are null)")
    return p


def _nan_to_null(v):
    """``v`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {k: _nan_to_null(x) for k, x in v.items()}
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def run(args) -> int:
    from sentinel_vllm.aggregate import estimate_slices, interval_kind, interval_note, summary
    from sentinel_vllm.cli.score import score_traces

    traces = _common.load(args)
    sent, p, traces = score_traces(args.sentinel, traces, args)
    band = sent.metadata.get("band")
    est = estimate_slices([t.slice for t in traces], p, [t.correct for t in traces], band)
    summ = summary(est)
    if args.json:
        doc = {"sentinel": sent.id, "interval": interval_kind(band),
               "band_q": None if band is None else band["q"],
               "slices": {s: e.as_dict() for s, e in est.items()}, **summ}
        print(json.dumps(_nan_to_null(doc), indent=2, allow_nan=False))
        return 0
    rows = [[s, e.n, e.estimate, e.ci_low, e.ci_high, e.interval, e.true, e.aee]
            for s, e in est.items()]
    print(_common.markdown_table(COLUMNS, rows))
    print("\n" + interval_note(band))
    print(f"\nmedian AEE {_common.fmt(summ['median_aee'])}  "
          f"Spearman rho {_common.fmt(summ['spearman_rho'])}  ({summ['n_slices']} labelled slices)")
    return 0
