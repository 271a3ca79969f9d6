"""``sentinel-vllm collect``: labelled entropy traces from a model on real benchmarks."""

from __future__ import annotations

import sys

EPILOG = ("example: sentinel-vllm collect --model qwen2.5-coder-0.5b "
          "--benchmarks mawps,gsm8k,math:1,math:5,ocw --n 150 --out traces.jsonl.gz")


def add_parser(sub):
    p = sub.add_parser("collect", help="generate with vLLM + sentinel, grade, write traces",
                       epilog=EPILOG)
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
    p.add_argument("--k", default="1,5,10,20,50", help="top-k values recorded besides full")
    p.add_argument("--final-answer-instruction", action="store_true",
                   help="append 'Put your final answer within \\boxed{}.' to each question")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    return p


def run(args) -> int:
    from sentinel_vllm.collect import build_llm, collect, format_summary, parse_benchmarks
    from sentinel_vllm.model_assets import resolve_model

    specs = parse_benchmarks(args.benchmarks)
    ks = [int(k) for k in args.k.split(",") if k]
    model = resolve_model(args.model)
    llm = build_llm(model, ks=ks, max_model_len=args.max_model_len, seed=args.seed,
                    gpu_memory_utilization=args.gpu_memory_utilization)
    summary = collect(llm, specs, args.out, n=args.n, seed=args.seed,
                      temperature=args.temperature, max_tokens=args.max_tokens, ks=ks,
                      final_answer_instruction=args.final_answer_instruction,
                      batch_size=args.batch_size, model_name=args.model)
    for line in format_summary(summary):
        print(line, file=sys.stderr)
    return 0
