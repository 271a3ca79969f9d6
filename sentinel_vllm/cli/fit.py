"""``sentinel-vllm fit``: a sentinel for your own model (collect, choose by LOBO, train, report)."""

from __future__ import annotations


EPILOG = ("example: sentinel-vllm fit --model qwen2.5-coder-0.5b --out mine.onnx "
          "--benchmarks mawps,gsm8k,math:5 --temperatures 0,0.7 --n 150")


def add_parser(sub):
    from sentinel_vllm.fit import DEFAULT_BENCHMARKS, DEFAULT_COMPOSITIONS, DEFAULT_FEATURE_SETS

    p = sub.add_parser("fit", epilog=EPILOG,
                       help="collect, choose the recipe by LOBO, train and report for a model")
    p.add_argument("--model", required=True,
                   help="model to serve with vLLM (a name of `models fetch`, a folder or a hub id)")
    p.add_argument("--out", required=True, help="the sentinel file to write (.onnx)")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS,
                   help="benchmarks to collect, spanning difficulty "
                        f"(default: {DEFAULT_BENCHMARKS})")
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
    import math

    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--temperatures: not a comma list of numbers: {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"--temperatures: give one or more finite temperatures >= 0, got {text!r}")
    if len(set(vals)) < len(vals):
        raise ValueError(f"--temperatures: a temperature is given twice in {text!r}")
    return vals


def _check_engine(args) -> None:
    positive = {"--n": args.n, "--max-tokens": args.max_tokens, "--batch-size": args.batch_size,
                "--max-model-len": args.max_model_len}
    for name, v in positive.items():
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1], got "
                         f"{args.gpu_memory_utilization}")
    if args.kv_cache_memory_bytes is not None and args.kv_cache_memory_bytes < 1:
        raise ValueError("--kv-cache-memory-bytes must be positive, got "
                         f"{args.kv_cache_memory_bytes}")


def _check_out(out: str) -> None:
    import os

    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give the sentinel file to write (.onnx)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out: the directory {parent} does not exist")


def plan_from_args(args):
    """The :class:`~sentinel_vllm.fit.FitPlan` of the parsed options (checked before vLLM
    starts)."""
    from sentinel_vllm.collect import parse_benchmarks
    from sentinel_vllm.feature_sets import SERVABLE
    from sentinel_vllm.fit import FitPlan

    specs = parse_benchmarks(args.benchmarks)
    if len({s.slice for s in specs}) < 3:
        raise ValueError("--benchmarks: give at least three different ones (one is held out, the "
                         "extremes pair is chosen among the others)")
    _check_engine(args)
    _check_out(args.out)
    sets = [s for s in args.feature_sets.split(",") if s]
    unknown = [s for s in sets if s not in SERVABLE]
    comps = [c for c in args.compositions.split(",") if c]
    if unknown or not sets:
        raise ValueError(f"--feature-sets: unknown or not servable {unknown or sets}; servable: "
                         f"{', '.join(sorted(SERVABLE))}")
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
