"""``sentinel-vllm audit``: per-slice accuracy from a small human audit (PPI++ 95% intervals).

With ``--suggest N --plan FILE`` it first says which responses to label (active labelling,
:mod:`sentinel_vllm.active_audit`); ``--labels L --plan FILE`` then audits with that design.
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
          "labels: one JSON object per line, {\"id\": \"<trace id>\", \"correct\": true|false}\n"
          "active labelling: sentinel-vllm audit S --traces T --suggest 50 --plan plan.json > to_label.txt\n"
          "  (50 ids per slice, one per line, favouring the responses the sentinel is least sure of;\n"
          "  an id listed twice is labelled once), then: audit S --traces T --labels L --plan plan.json")
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
    p.add_argument("--labels", help="JSONL of {\"id\", \"correct\"} for some responses")
    p.add_argument("--suggest", type=int, metavar="N",
                   help="print N ids per slice to label (active design; needs --plan, a new file)")
    p.add_argument("--plan", help="the design file: written by --suggest, read with --labels")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the --suggest draws (default: a random one, kept in the plan)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed trace records (and those the features cannot be computed for) "
                        "and count them; their labels are dropped")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per slice")
    return p


def _check_args(args) -> None:
    if args.suggest is not None and args.labels:
        raise ValueError("--suggest makes a plan and --labels audits one: give one of them")
    if args.suggest is None and not args.labels:
        raise ValueError("give --labels (the audit) or --suggest N --plan FILE (which ids to label)")
    if args.suggest is not None and not args.plan:
        raise ValueError("--suggest needs --plan FILE: the design is kept there for the audit")
    if args.suggest is not None and args.suggest < 1:
        raise ValueError(f"--suggest must be at least 1, got {args.suggest}")


def run(args) -> int:
    _check_args(args)
    if args.suggest is not None:
        return _suggest(args)
    from sentinel_vllm.audit import audit_slices, read_labels
    from sentinel_vllm.cli.score import score_traces

    labels = read_labels(args.labels)
    plan = None
    if args.plan:
        from sentinel_vllm.active_audit import plan_labels, read_plan

        plan = read_plan(args.plan)
        _warn_unlabelled(plan_labels(plan, labels))
    read = _common.load(args)
    sent, p, traces = score_traces(args.sentinel, read, args)
    skipped = {t.id for t in read} - {t.id for t in traces}  # by --skip-bad: their labels go too
    dropped = [i for i in labels if i in skipped]
    if dropped:
        labels = {i: v for i, v in labels.items() if i not in skipped}
        print(f"dropped {len(dropped)} label(s) of records skipped by --skip-bad (first: {dropped[0]!r})",
              file=sys.stderr)
    if plan is None:
        res = audit_slices([t.slice for t in traces], p, [t.id for t in traces], labels,
                           sent.metadata.get("band"))
    else:
        res = _planned(plan, sent.id, traces, p, labels, sent.metadata.get("band"))
    if args.json:
        print(json.dumps([r.as_dict() for r in res], indent=2, allow_nan=False))
        return 0
    print(_common.markdown_table(COLUMNS, [[getattr(r, c) for c in COLUMNS] for r in res]))
    return 0


def _suggest(args) -> int:
    import os
    import secrets

    from sentinel_vllm.active_audit import make_plan, write_plan
    from sentinel_vllm.cli.score import score_traces

    if os.path.exists(args.plan):
        raise ValueError(f"{args.plan} exists; a plan is never replaced (its labels may be under way): "
                         "choose another file name")
    seed = secrets.randbits(32) if args.seed is None else args.seed
    sent, p, traces = score_traces(args.sentinel, _common.load(args), args)
    plan = make_plan(sent.id, [t.slice for t in traces], [t.id for t in traces], p,
                     args.suggest, seed, args.traces)
    write_plan(args.plan, plan)
    for s, d in plan["slices"].items():
        print("\n".join(d["draws"]))
        twice = len(d["draws"]) - len(set(d["draws"]))
        if twice:
            print(f"{s}: {twice} draw(s) repeat an id: label each id once (it counts once per draw)",
                  file=sys.stderr)
    print(f"plan: {args.plan} ({len(plan['slices'])} slice(s) x {args.suggest} ids, seed {seed})",
          file=sys.stderr)
    return 0


def _warn_unlabelled(missing) -> None:
    if missing:
        print(f"{len(missing)} drawn id(s) have no label (first: {missing[0]!r}); the audit uses the "
              "labelled draws: valid if the skipped ones were skipped for reasons unrelated to "
              "their correctness", file=sys.stderr)


def _planned(plan, sentinel_id, traces, p, labels, band=None):
    """Audit with the plan's design: its p and q, checked against the traces and sentinel."""
    from sentinel_vllm.active_audit import audit_design, plan_designs
    from sentinel_vllm.audit import audit_slice

    if plan["sentinel"] != sentinel_id:
        raise ValueError(f"the plan was made with {plan['sentinel']}; this audit scores with "
                         f"{sentinel_id}: audit with the plan's sentinel")
    where = {t.id: t.slice for t in traces}
    for s, d in plan["slices"].items():
        lost = [i for i in d["ids"] if where.get(i) != s]
        if lost:
            raise ValueError(f"slice {s!r} of the plan: {len(lost)} of its {len(d['ids'])} responses are "
                             f"not in these traces under that slice (first: {lost[0]!r}); audit with "
                             "the traces the plan was made from")
    now = dict(zip((t.id for t in traces), p.tolist()))
    moved = max(abs(now[i] - v) for d in plan["slices"].values() for i, v in zip(d["ids"], d["p"]))
    if moved > 1e-4:
        print(f"the sentinel's scores moved since the plan (by up to {moved:.3g}): the audit uses "
              "the plan's scores and probabilities", file=sys.stderr)
    planned = {i for d in plan["slices"].values() for i in d["ids"]}
    extra = sum(t.id not in planned for t in traces)
    if extra:
        print(f"{extra} response(s) of the traces are not in the plan (newer traffic?): "
              "outside its design, left out of the planned slices", file=sys.stderr)
    designs, out = plan_designs(plan), []
    for s in dict.fromkeys(t.slice for t in traces):
        if s in designs:
            out.append(audit_design(s, designs[s], labels, band))
        else:  # a slice the plan did not draw from: no labels, today's audit (sentinel only)
            m = [t.slice == s for t in traces]
            out.append(audit_slice(s, p[m], [None] * sum(m), band))
    return out
