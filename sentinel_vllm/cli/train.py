"""``sentinel-vllm train``: fit the calibrated forest on traces and export one ONNX file."""

from __future__ import annotations

import math
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
    g = p.add_argument_group("band (the 95% interval of a slice's true accuracy; "
                             "sentinel_vllm/band.py)")
    g.add_argument("--band", action="store_true",
                   help="store the band: this recipe's error on every (benchmark, temperature) "
                        "unit of TRACES (+ --band-traces) held out by leave-one-benchmark-out, "
                        "as the conformal q of the interval shown for this file (without it, "
                        "intervals are sampling noise only and say so); refits the recipe once "
                        "per held-out benchmark and once per nested fold")
    g.add_argument("--band-traces", nargs="+", default=[], metavar="FILE",
                   help="more labelled traces (other benchmarks and temperatures) for the band's "
                        "units (implies --band); not used to fit the sentinel")
    g.add_argument("--band-composition", choices=("auto", "extremes", "all"), default="auto",
                   help="training composition of the band's protocol folds; auto: extremes "
                        "when --slices names two benchmarks (the paper's pair), else all")
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


def _band(args, topk_k) -> dict | None:
    """The band metadata: leave-one-benchmark-out over every unit of TRACES + --band-traces
    with this command's recipe, ``q`` fitted on all units, coverage judged nested."""
    from sentinel_vllm.band import LEVEL, fit_band, nested_coverage, nested_units
    from sentinel_vllm.traces import read_traces

    if not (args.band or args.band_traces):
        return None
    extra = read_traces(args.band_traces, skip_bad=args.skip_bad) if args.band_traces else []
    if extra and all(t.correct is None for t in extra):
        print(f"warning: --band-traces: none of their {len(extra)} traces is labelled ('correct' "
              "null): they add no held-out unit", file=sys.stderr)
    traces = [t for t in _common.load(args) + extra if t.correct is not None]
    traces = _common.keep_scorable(args, traces, [(args.feature_set, args.entropy, args.k, topk_k)])
    comp = args.band_composition
    if comp == "auto":
        comp = "extremes" if args.slices and len([s for s in args.slices.split(",") if s]) == 2 \
            else "all"
    temps = [float(v) for v in args.temperatures.split(",") if v] if args.temperatures else None
    recipe = {"composition": comp, "feature_set": args.feature_set, "entropy": args.entropy,
              "k": topk_k if topk_k is not None else args.k, "train_temperatures": temps}
    try:
        outer, inner = nested_units(traces, random_state=args.seed, **recipe)
    except ValueError as e:  # one benchmark, or a fold with one class
        print(f"no band stored ({e}): intervals shown for this file will be sampling noise only",
              file=sys.stderr)
        return None
    band = fit_band(outer, level=LEVEL)
    nest = nested_coverage(outer, inner)
    band["protocol"] = {"name": "leave-one-benchmark-out, units = (benchmark, temperature)",
                        **recipe, "seed": args.seed}
    band["nested"] = {k: (nest[k] if not isinstance(nest[k], float) or math.isfinite(nest[k])
                          else None) for k in ("coverage", "mean_halfwidth", "n_units", "misses")}
    print(f"band: q = {band['q']:.4f} over {band['n_units']} held-out units (rank {band['rank']}); "
          f"nested coverage {nest['coverage']:.3f}, mean half-width {nest['mean_halfwidth']:.3f}",
          file=sys.stderr)
    _warn_small_band(band["n_units"], sum(math.isinf(r["q"]) for r in nest["rows"]))
    return band


def _warn_small_band(n: int, unjudged: int) -> None:
    """Say when the band's level or its nested judgement is weaker than the output suggests."""
    from sentinel_vllm.band import LEVEL

    if math.ceil((n + 1) * LEVEL - 1e-12) > n:  # the conformal rank is capped at n
        print(f"warning: only {n} held-out unit(s): q is their largest score, a level of "
              f"{n / (n + 1):.0%}, not {LEVEL:.0%} (19 units reach it: add benchmarks or "
              "temperatures, --band-traces)", file=sys.stderr)
    if unjudged:
        print(f"warning: {unjudged} of {n} unit(s) could not be judged nested (fewer than two other "
              "benchmarks to fit their q): the nested coverage counts them as covered, by an "
              "infinite interval", file=sys.stderr)


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
    band = _band(args, topk_k)
    if band is not None:
        extra["band"] = band
    sid = clf.export_onnx(args.out, entropy=name, k=k, training_slices=slices, extra_metadata=extra,
                          feature_names=feature_names(args.feature_set))
    print(f"trained on {len(y)} traces ({y.mean():.3f} correct) from {slices}; "
          f"wrote {args.out} ({sid})", file=sys.stderr)
    return 0
