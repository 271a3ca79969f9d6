"""Serving overhead of the sentinel: vLLM output tokens/s with and without it (issue 2).

Two engines in one process on the same prompts: plain ``vllm.LLM`` and
``sentinel_vllm.LLM`` (logits processor + worker extension + batched fetch and
ONNX scoring after ``generate``, all included in its time). Fixed
``max_tokens`` with ``ignore_eos`` and greedy decoding, so both produce the same
number of tokens; runs alternate (order flipped every round) so machine load
drifts hit both sides alike. Prints per-round tokens/s and the median ratio
(sentinel / plain; goal >= 0.97 on CPU, >= 0.995 on GPU).

    python benchmarks/bench_overhead.py [--model DIR] [--prompts 16] [--max-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "sentinel-vllm" / "models" / "smollm2-135m-instruct"


def tiny_sentinel(path: str) -> str:
    """Train a small sentinel on synthetic features (scoring cost only matters here)."""
    import numpy as np

    from sentinel_vllm.features import FEATURE_NAMES
    from sentinel_vllm.classifier import SentinelClassifier

    rng = np.random.default_rng(0)
    X = rng.gamma(2.0, 0.5, size=(400, len(FEATURE_NAMES)))
    y = rng.random(400) < 1 / (1 + np.exp(3 * (X[:, 0] - 1)))
    clf = SentinelClassifier(n_estimators=100, random_state=0).fit(X, y)
    return clf.export_onnx(path, entropy="full")


def run(llm, prompts, sp) -> tuple[int, float]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for o in outs for c in o.outputs), dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--sentinel", default=None, help="ONNX sentinel (default: a synthetic one)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mem", type=float, default=0.1, help="gpu_memory_utilization per engine")
    args = ap.parse_args(argv)

    import vllm
    from vllm import LLM as VllmLLM
    from vllm import SamplingParams

    import sentinel_vllm

    sentinel = args.sentinel
    if sentinel is None:
        sentinel = os.path.join(tempfile.mkdtemp(), "bench.onnx")
        tiny_sentinel(sentinel)
    kw = dict(max_model_len=512, gpu_memory_utilization=args.mem, seed=0)
    plain = VllmLLM(args.model, **kw)
    sent = sentinel_vllm.LLM(args.model, sentinel=sentinel, **kw)
    tok = plain.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
                                       tokenize=False, add_generation_prompt=True)
               for i in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    run(plain, prompts[:2], sp)  # warm-up both
    run(sent, prompts[:2], sp)

    print(f"# vllm {vllm.__version__}, sentinel-vllm {sentinel_vllm.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")
    print(f"# model {Path(args.model).name}, {args.prompts} prompts x {args.max_tokens} tokens "
          f"(ignore_eos, greedy), {args.rounds} alternating rounds")
    print(f"{'round':>5} {'plain tok/s':>12} {'sentinel tok/s':>15} {'ratio':>7}")
    ratios, tps_p, tps_s = [], [], []
    for r in range(args.rounds):
        order = [("plain", plain), ("sentinel", sent)]
        if r % 2:
            order.reverse()
        res = {}
        for name, llm in order:
            n, dt = run(llm, prompts, sp)
            res[name] = n / dt
        tps_p.append(res["plain"])
        tps_s.append(res["sentinel"])
        ratios.append(res["sentinel"] / res["plain"])
        print(f"{r:>5} {res['plain']:>12.1f} {res['sentinel']:>15.1f} {ratios[-1]:>7.3f}")
    print(f"median plain {statistics.median(tps_p):.1f} tok/s, sentinel {statistics.median(tps_s):.1f} "
          f"tok/s, ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); goal >= 0.97 on CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
