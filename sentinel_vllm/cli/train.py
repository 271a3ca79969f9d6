"""``sentinel-vllm train``: fit the calibrated forest on traces and export one ONNX file."""

from __future__ import annotations

import sys

from sentinel_vllm.cli import _common

EPILOG = "example: sentinel-vllm train traces.jsonl --slices gsm8k,math_l5 --out sentinel.onnx"


def add_parser(sub):
    p = sub.add_parser("train", help="train and export a sentinel (.onnx)", epilog=EPILOG)
    _common.add_trace_args(p)
    p.add_argument("--slices", default=None, help="comma-separated training slices (default: all)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--no-calibration", action="store_true", help="skip isotonic calibration")
    p.add_argument("--no-balance", action="store_true", help="class_weight=None instead of balanced_subsample")
    p.add_argument("--temperatures", default=None,
                   help="train only on traces sampled at these temperatures (comma list; "
                        "default: all); the temperatures used are recorded in the metadata")
    p.add_argument("--feature-set", default="paper",
                   help="features of the file (sentinel_vllm/feature_sets.py): paper (the 11 "
                        "statistics, default), paper+length, paper+topk, paper+length+temperature "
                        "(servable), paper+length+drawn, paper+length+sampling (traces and the "
                        "proxy), paper+tail, paper+logprob, all (traces only); the topk group of "
                        "paper+topk and all reads top<--k> (default: the traces' one k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained-for", default=None, metavar="MODEL",
                   help="the model the traces come from (stored in the sentinel's metadata); "
                        "default: the traces' generation.model")
    return p


def _composition(traces) -> dict:
    """Per training slice and temperature: responses and accuracy (for the metadata)."""
    from sentinel_vllm.protocol import trace_temperature

    out: dict = {}
    for t in traces:
        temp = trace_temperature(t)
        key = "unknown" if temp is None else f"{temp:g}"
        cell = out.setdefault(t.slice, {}).setdefault(key, {"n": 0, "n_correct": 0})
        cell["n"] += 1
        cell["n_correct"] += int(bool(t.correct))
    return {"temperatures": sorted({k for v in out.values() for k in v}),
            "slices": {s: dict(sorted(v.items())) for s, v in sorted(out.items())}}


def run(args) -> int:
    import numpy as np

    from sentinel_vllm.classifier import SentinelClassifier
    from sentinel_vllm.feature_sets import FEATURE_SETS, feature_names, feature_set_matrix, topk_k_of
    from sentinel_vllm.series import parse_series_name

    _common.check_out(args.out, [*args.traces])
    traces = [t for t in _common.load(args) if t.correct is not None]
    if args.slices:
        wanted = [s for s in args.slices.split(",") if s]
        have = {t.slice for t in traces}
        missing = [s for s in wanted if s not in have]
        if missing:
            raise ValueError(f"slices not in the traces: {missing}; have {sorted(have)}")
        traces = [t for t in traces if t.slice in set(wanted)]
    if args.temperatures:
        from sentinel_vllm.protocol import trace_temperature

        want = {float(v) for v in args.temperatures.split(",") if v}
        traces = [t for t in traces if trace_temperature(t) in want]
    if not traces:
        raise ValueError("no labelled traces to train on")
    if args.feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown --feature-set {args.feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    extra = {}
    # --skip-bad first (a record without k has no top-k series), then the one k of the rest
    traces = _common.keep_scorable(args, traces, [(args.feature_set, args.entropy, args.k, args.k)])
    # the top-k group reads top<--k>, else the traces' one k (several k are refused)
    topk_k = topk_k_of(traces, args.feature_set, args.k)
    if topk_k is not None:
        extra["topk_k"] = topk_k
    X = feature_set_matrix(traces, args.feature_set, args.entropy, args.k, topk_k)
    y = np.array([t.correct for t in traces], dtype=int)
    name, k = parse_series_name(args.entropy, args.k)
    if name != "full" and k is None:
        ks = {t.k for t in traces}
        if len(ks) != 1:
            raise ValueError(f"traces have several k values {sorted(ks, key=str)}; pass --k")
        k = ks.pop()
    clf = SentinelClassifier(
        calibrate=not args.no_calibration,
        class_weight=None if args.no_balance else "balanced_subsample",
        random_state=args.seed,
    ).fit(X, y)
    slices = sorted({t.slice for t in traces})
    trained_for = args.trained_for or next(
        (t.extra.get("generation", {}).get("model") for t in traces
         if isinstance(t.extra.get("generation"), dict)), None)
    if trained_for:
        extra["trained_for_model"] = trained_for
    extra["training_composition"] = _composition(traces)
    extra["feature_set"] = args.feature_set
    sid = clf.export_onnx(args.out, entropy=name, k=k, training_slices=slices, extra_metadata=extra,
                          feature_names=feature_names(args.feature_set))
    print(f"trained on {len(y)} traces ({y.mean():.3f} correct) from {slices}; "
          f"wrote {args.out} ({sid})", file=sys.stderr)
    return 0
