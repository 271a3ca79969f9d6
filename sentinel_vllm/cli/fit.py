"""``sentinel-vllm fit``: a sentinel for your own model (collect, choose by LOBO, train, report)."""

from __future__ import annotations


EPILOG = ("example: sentinel-vllm fit --model qwen2.5-coder-0.5b --out mine.onnx "
          "--benchmarks mawps,gsm8k,math:5 --temperatures 0,0.7 --n 150")


def add_parser(sub):
    from sentinel_vllm.fit import DEFAULT_BENCHMARKS, DEFAULT_COMPOSITIONS, DEFAULT_FEATURE_SETS

    p = sub.add_parser("fit", help="collect, choose the recipe by LOBO, train and report for a model",
                       epilog=EPILOG)
    p.add_argument("--model", required=True,
                   help="model to serve with vLLM (a name of `models fetch`, a folder or a hub id)")
    p.add_argument("--out", required=True, help="the sentinel file to write (.onnx)")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS,
                   help=f"benchmarks to collect, spanning difficulty (default: {DEFAULT_BENCHMARKS})")
    p.add_argument("--temperatures", default="0,0.7",
                   help="decoding temperatures to collect at, the ones you serve (default: 0,0.7)")
    p.add_argument("--n", type=int, default=150, help="questions per benchmark (default: 150)")
    p.add_argument("--work-dir", default=None,
                   help="traces, tables and report.md (default: <out without .onnx>.fit); "
                        "rerunning resumes from what is there")
    p.add_argument("--feature-sets", default=",".join(DEFAULT_FEATURE_SETS),
                   help="candidate feature sets (servable ones)")
    p.add_argument("--compositions", default=",".join(DEFAULT_COMPOSITIONS),
                   help="candidate training compositions: extremes (the paper's pair), all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=768)
    v = p.add_argument_group("vLLM engine")
    v.add_argument("--max-model-len", type=int, default=2048)
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--dtype", default=None, help="default: float32 on CPUs without native bf16")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    v.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    v.add_argument("--enforce-eager", action="store_true",
                   help="vLLM's eager mode (no compile warm-up: a faster start on a small CPU)")
    return p


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--temperatures: not a comma list of numbers: {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise ValueError(f"--temperatures: give one or more temperatures >= 0, got {text!r}")
    return vals


def plan_from_args(args):
    """The :class:`~sentinel_vllm.fit.FitPlan` of the parsed options (checked before vLLM starts)."""
    from sentinel_vllm.collect import parse_benchmarks
    from sentinel_vllm.feature_sets import FEATURE_SETS
    from sentinel_vllm.fit import FitPlan

    specs = parse_benchmarks(args.benchmarks)
    if len(specs) < 3:
        raise ValueError("--benchmarks: give at least three (one is held out, the extremes pair "
                         "is chosen among the others)")
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    sets = [s for s in args.feature_sets.split(",") if s]
    unknown = [s for s in sets if s not in FEATURE_SETS]
    comps = [c for c in args.compositions.split(",") if c]
    if unknown or not sets:
        raise ValueError(f"--feature-sets: unknown {unknown or sets}; known: {', '.join(FEATURE_SETS)}")
    if not comps or set(comps) - {"all", "extremes"}:
        raise ValueError(f"--compositions: use all and/or extremes, got {args.compositions!r}")
    engine = {"max_model_len": args.max_model_len, "batch_size": args.batch_size,
              "dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory_utilization}
    if args.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.enforce_eager:
        engine["enforce_eager"] = True
    return FitPlan(model=args.model, out=args.out, benchmarks=args.benchmarks,
                   temperatures=_floats(args.temperatures), n=args.n, work_dir=args.work_dir,
                   seed=args.seed, max_tokens=args.max_tokens, feature_sets=tuple(sets),
                   compositions=tuple(comps), collect_kwargs=engine)


def run(args) -> int:
    from sentinel_vllm.fit import fit

    lines = fit(plan_from_args(args))
    print("\n".join(lines))
    return 0
