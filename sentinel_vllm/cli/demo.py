"""``sentinel-vllm demo``: the main job end to end on a real model (see sentinel_vllm.demo)."""

from __future__ import annotations

EPILOG = "example: sentinel-vllm demo --model smollm2-135m --n 4"


def add_parser(sub):
    p = sub.add_parser("demo", help="serve a model with the sentinel, ask real questions, show scores",
                       epilog=EPILOG)
    p.add_argument("--model", default="qwen2.5-coder-0.5b",
                   help="qwen2.5-coder-0.5b (default) or smollm2-135m (fast, weak at math), folder or HF id")
    p.add_argument("--sentinel", default="default", help="sentinel .onnx (default: the embedded one)")
    p.add_argument("--benchmarks", default="svamp,gsm8k,math:3",
                   help="benchmarks to ask (one slice each)")
    p.add_argument("--n", type=int, default=8, help="questions per benchmark")
    p.add_argument("--max-tokens", type=int, default=512)
    return p


def run(args) -> int:
    from sentinel_vllm.demo import run_demo

    run_demo(args.model, args.sentinel, args.benchmarks.split(","), args.n, max_tokens=args.max_tokens)
    return 0
