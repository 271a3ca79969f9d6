"""``sentinel-vllm audit``: per-slice accuracy from a small human audit (PPI++ 95% intervals).

``estimate``/``ci_low``/``ci_high`` are PPI++ (``interval = "ppi++"``, valid whatever the
sentinel's error); the unlabelled estimate's interval is the sentinel file's band
(``unlabelled_interval = "band"``) or sampling noise alone (``"sampling"``).
"""

from __future__ import annotations

import json
import sys

from sentinel_vllm.cli import _common

EPILOG = ("example: sentinel-vllm audit sentinel.onnx --traces traffic.jsonl.gz "
          "--labels labels.jsonl --json\n"
          "labels: one JSON object per line, {\"id\": \"<trace id>\", \"correct\": true|false}")
COLUMNS = ["slice", "n", "n_labelled", "estimate", "ci_low", "ci_high", "labels_only",
           "labels_ci_low", "labels_ci_high", "unlabelled", "unlabelled_ci_low",
           "unlabelled_ci_high", "unlabelled_interval", "lam"]


def add_parser(sub):
    import argparse

    p = sub.add_parser("audit", help="accuracy per slice from a few human labels + the sentinel (PPI++)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentinel", help="sentinel .onnx file (or 'default')")
    p.add_argument("--traces", nargs="+", required=True, metavar="TRAFFIC",
                   help="traffic trace files ('correct' may be null; it is not used)")
    p.add_argument("--labels", required=True, help="JSONL of {\"id\", \"correct\"} for some responses")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed trace records (and those the features cannot be computed for) "
                        "and count them; their labels are dropped")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per slice")
    return p


def run(args) -> int:
    from sentinel_vllm.audit import audit_slices, read_labels
    from sentinel_vllm.cli.score import score_traces

    labels = read_labels(args.labels)
    read = _common.load(args)
    sent, p, traces = score_traces(args.sentinel, read, args)
    skipped = {t.id for t in read} - {t.id for t in traces}  # by --skip-bad: their labels go too
    dropped = [i for i in labels if i in skipped]
    if dropped:
        labels = {i: v for i, v in labels.items() if i not in skipped}
        print(f"dropped {len(dropped)} label(s) of records skipped by --skip-bad (first: {dropped[0]!r})",
              file=sys.stderr)
    res = audit_slices([t.slice for t in traces], p, [t.id for t in traces], labels,
                       sent.metadata.get("band"))
    if args.json:
        print(json.dumps([r.as_dict() for r in res], indent=2, allow_nan=False))
        return 0
    print(_common.markdown_table(COLUMNS, [[getattr(r, c) for c in COLUMNS] for r in res]))
    return 0
