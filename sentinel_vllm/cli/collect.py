"""``sentinel-vllm collect``: labelled entropy traces from a model on real benchmarks."""

from __future__ import annotations

import argparse
import sys

EPILOG = ("example: sentinel-vllm collect --model qwen2.5-coder-0.5b "
          "--benchmarks mawps,gsm8k,math:1,math:5,ocw --n 150 --out traces.jsonl.gz\n"
          "any OpenAI-compatible server (top-k series only): sentinel-vllm collect "
          "--endpoint https://api.example.com --model NAME --api-key-env KEY --benchmarks gsm8k "
          "--n 150 --out api.jsonl.gz")


def add_parser(sub):
    p = sub.add_parser("collect", help="generate with vLLM + sentinel, grade, write traces",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="short name (smollm2-135m, qwen2.5-coder-0.5b), local folder or HF id")
    p.add_argument("--benchmarks", required=True,
                   help="comma list; name:level restricts the difficulty, e.g. math:5")
    p.add_argument("--n", type=int, default=200, help="problems per benchmark")
    p.add_argument("--out", required=True, help="trace file to append to (.jsonl or .jsonl.gz)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", default=None,
                   help="top-k values recorded besides full (default 1,5,10,20,50; endpoint: 1,5,10,20)")
    p.add_argument("--final-answer-instruction", action="store_true",
                   help="append 'Put your final answer within \\boxed{}.' to each question")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    p.add_argument("--dtype", default=None,
                   help="vLLM dtype (auto, float32, bfloat16...); default: float32 on CPUs "
                        "without native bf16 (no amx_bf16), else auto")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size in bytes (on a busy CPU machine, e.g. 400000000)")
    e = p.add_argument_group("OpenAI-compatible endpoint instead of a local vLLM (API-only models)")
    e.add_argument("--endpoint", default=None, metavar="URL",
                   help="server root URL; --model is then the model name sent in each request; "
                        "records top-k series from top_logprobs (--k default 1,5,10,20)")
    e.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the endpoint's API key")
    e.add_argument("--concurrency", type=int, default=8, help="requests in flight (endpoint)")
    e.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (endpoint)")
    return p


def _run_endpoint(args, specs) -> int:
    import os

    from sentinel_vllm.blackbox.endpoint_collect import DEFAULT_ENDPOINT_KS, collect_endpoint
    from sentinel_vllm.collect import format_summary

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: the variable is not set")
    ks = DEFAULT_ENDPOINT_KS if args.k is None else [int(k) for k in args.k.split(",") if k]
    summary = collect_endpoint(args.endpoint, args.model, specs, args.out, n=args.n, seed=args.seed,
                               temperature=args.temperature, max_tokens=args.max_tokens, ks=ks,
                               final_answer_instruction=args.final_answer_instruction,
                               concurrency=args.concurrency, batch_size=args.batch_size,
                               api_key=key, timeout_s=args.timeout)
    for line in format_summary(summary):
        print(line, file=sys.stderr)
    failed = sum(v.get("failed", 0) for v in summary.values())
    written = sum(v.get("n", 0) for v in summary.values())
    if failed:
        first = next(v["first_error"] for v in summary.values() if v.get("first_error"))
        if not written:   # every request failed: a failed run, not an empty success
            print(f"sentinel-vllm collect: error: all {failed} request(s) failed, nothing written "
                  f"to {args.out}; first: {first}", file=sys.stderr)
            return 1
        print(f"{failed} requests failed and were not written (rerun to retry them); first: {first}",
              file=sys.stderr)
    return 0


def run(args) -> int:
    from sentinel_vllm.collect import build_llm, collect, format_summary, parse_benchmarks
    from sentinel_vllm.model_assets import resolve_model

    specs = parse_benchmarks(args.benchmarks)
    if args.endpoint:
        return _run_endpoint(args, specs)
    ks = [int(k) for k in (args.k or "1,5,10,20,50").split(",") if k]
    model = resolve_model(args.model)
    extra = ({"kv_cache_memory_bytes": args.kv_cache_memory_bytes}
             if args.kv_cache_memory_bytes else {})
    llm = build_llm(model, ks=ks, max_model_len=args.max_model_len, seed=args.seed,
                    gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype, **extra)
    summary = collect(llm, specs, args.out, n=args.n, seed=args.seed,
                      temperature=args.temperature, max_tokens=args.max_tokens, ks=ks,
                      final_answer_instruction=args.final_answer_instruction,
                      batch_size=args.batch_size, model_name=args.model)
    for line in format_summary(summary):
        print(line, file=sys.stderr)
    return 0
