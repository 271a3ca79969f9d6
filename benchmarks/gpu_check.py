"""One-shot GPU check of issue 19: kernel tests, bandwidth, host syncs, decode loop, trajectories.

Usage (repo root, a CUDA machine; at most ~8 minutes)::

    bash benchmarks/gpu_check.sh OUT.json             # the wrapper: env checks, then this
    python benchmarks/gpu_check.py --json OUT.json    # this driver alone
    python benchmarks/gpu_check.py --dry-run --json /tmp/x.json   # CPU, tiny shapes, ~1 min

Sections (each guarded: an exception is recorded and the next section runs; each
has its own time budget; the JSON is rewritten after every section, so a
timeout still leaves the finished sections on disk):

1. ``tests``  -- pytest of tests/test_kernels_triton.py, test_kernels_cuda.py and the
   CUDA test of test_kernels.py, on CUDA without the interpreter (a subprocess);
2. ``bandwidth`` -- kernel time vs a device copy of the same bytes, per dtype,
   batch and vocab, for full + top-20, full only; ``frac_copy`` is defined below;
3. ``syncs`` -- the V1 and MRV2 processors (vLLM's interface modules stubbed: no vLLM
   on the machine) each driven for 200 steps with requests added, removed and swapped, under
   ``torch.cuda.set_sync_debug_mode``: synchronising calls counted per phase
   ("warn" pass), then the same schedule under "error";
4. ``decode`` -- transformers ``Qwen2ForCausalLM`` with random weights, Qwen2-0.5B
   shape, bf16, batch 64 x 32 prompt tokens, 256 new tokens, greedy, with and
   without the sentinel step as a ``LogitsProcessor`` (ABBA rounds);
5. ``trajectory`` -- per-step entropies recorded on the device during a decode
   loop equal the float64 reference of the same logits within 1e-4.

Bandwidth definition: every timing is ``triton.testing.do_bench`` (CUDA events,
L2 flushed before each call, median). For logits of ``B = batch * vocab *
itemsize`` bytes, ``copy_read_GBps = B / t_copy`` where ``t_copy`` times
``dst.copy_(logits)`` (which moves 2B bytes: this is half its read+write rate),
``kernel_GBps = B / t_kernel`` (one read of the logits, the floor), and
``frac_copy = kernel_GBps / copy_read_GBps = t_copy / t_kernel``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_FRAC = 0.80
GOAL_RATIO = 0.99
GOAL_ATOL = 1e-4


def _setup_paths(dry_run: bool) -> None:
    """Repo root importable, ``sentinel_vllm.kernels`` present, interpreter for a CPU dry run."""
    sys.path.insert(0, str(ROOT))
    link = ROOT / "sentinel_vllm" / "kernels"
    if not link.exists():
        try:
            link.symlink_to("../kernels")
        except OSError as e:  # read-only checkout: report it in the import error
            print(f"# could not create {link}: {e}", file=sys.stderr)
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        os.environ["SENTINEL_VLLM_NO_COMPILE"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)


def log(msg: str) -> None:
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def timer(dev, fn, quick: bool = False) -> float:
    """Median milliseconds of ``fn()``: do_bench on CUDA, perf_counter on CPU."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    ts = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def frac_of_copy(nbytes: int, t_copy_ms: float, t_kernel_ms: float) -> dict:
    """Bandwidths (GB/s) and ``frac_copy`` as defined in the module docstring.

    >>> frac_of_copy(10**9, 0.5, 1.0)
    {'copy_read_GBps': 2000.0, 'kernel_GBps': 1000.0, 'frac_copy': 0.5}
    """
    copy_read = nbytes / (t_copy_ms * 1e-3) / 1e9
    kern = nbytes / (t_kernel_ms * 1e-3) / 1e9
    return {"copy_read_GBps": round(copy_read, 1), "kernel_GBps": round(kern, 1),
            "frac_copy": round(t_copy_ms / t_kernel_ms, 4)}  # fmt: skip


def abba_ratio(times_without: list[float], times_with: list[float]) -> dict:
    """Throughput ratio with/without from paired generate times (same work per run).

    ``ratio = sum(t_without) / sum(t_with)`` (tokens per second with the sentinel
    over tokens per second without); ``pair_ratios`` per round.

    >>> abba_ratio([1.0, 1.0], [1.0, 1.25])["ratio"]
    0.8889
    """
    if not times_with or len(times_with) != len(times_without):
        raise ValueError("need the same number (>= 1) of runs with and without")
    pairs = [a / b for a, b in zip(times_without, times_with)]
    return {"ratio": round(sum(times_without) / sum(times_with), 4),
            "pair_ratios": [round(p, 4) for p in pairs]}  # fmt: skip


class Budget:
    """Wall-clock budget of one section, bounded by the run's overall deadline."""

    def __init__(self, seconds: float, overall_deadline: float):
        self.deadline = min(time.monotonic() + seconds, overall_deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ----------------------------------------------------------------------------- 1 tests


def sec_tests(ctx, budget: Budget) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # test_kernels.py is the torch path on the CPU (the CPU suite runs it) except its one
    # CUDA test; the other two files run on the GPU in full.
    files = ["tests/test_kernels.py::test_record_does_not_synchronise_on_cuda",
             "tests/test_kernels_triton.py", "tests/test_kernels_cuda.py"]  # fmt: skip
    if ctx.dry:  # the CUDA grid skips on CPU; its CPU helper test runs
        files = ["tests/test_kernels_cuda.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    t = max(10, int(budget.left()))
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=t,
                             check=False)  # fmt: skip
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        so = e.stdout or ""
        text, rc = (so.decode() if isinstance(so, bytes) else so), -9
    tail = text.strip().splitlines()[-40:]
    print("\n".join(["## pytest tail"] + tail), file=sys.stderr, flush=True)
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "errors"):
        for line in tail[-3:]:
            toks = line.replace(",", " ").split()
            for i, tok in enumerate(toks[1:], 1):
                if tok == word and toks[i - 1].isdigit():
                    counts[word] = int(toks[i - 1])
    ok = rc == 0 and counts.get("failed", 0) == 0 and counts.get("passed", 0) > 0
    return {"returncode": rc, "counts": counts, "ok": ok, "tail": tail[-12:], "files": files}


# ----------------------------------------------------------------------------- 2 bandwidth


def sec_bandwidth(ctx, budget: Budget) -> dict:
    import torch

    from sentinel_vllm.kernels import entropy_step

    dev = ctx.dev
    if ctx.dry:
        dtypes, batches, vocabs, backend = ["float32", "bfloat16"], [1, 4], [1000], "triton"
    else:
        dtypes, batches, vocabs = ["float32", "bfloat16", "float16"], [1, 64, 256, 1024], [
            32000, 131072, 151936, 262144]
        backend = "triton"
    rows, skipped = [], []
    big = None
    if dev.type == "cuda":  # the device's large-copy rate, for context
        a = torch.empty(256 * 2**20, device=dev)
        b = torch.empty_like(a)
        t = timer(dev, lambda: b.copy_(a))
        big = round(2 * a.numel() * 4 / (t * 1e-3) / 1e9, 1)
        del a, b
    for dt in dtypes:
        for v in vocabs:
            for bsz in batches:
                if budget.left() < 3:
                    skipped.append((dt, bsz, v))
                    continue
                x = (torch.randn(bsz, v, device=dev) * 3).to(getattr(torch, dt))
                dst = torch.empty_like(x)
                nbytes = x.numel() * x.element_size()
                t_copy = timer(dev, lambda x=x, dst=dst: dst.copy_(x), ctx.dry)
                t_both = timer(dev, lambda x=x: entropy_step(x, (20,), backend=backend), ctx.dry)
                t_full = timer(dev, lambda x=x: entropy_step(x, (), backend=backend), ctx.dry)
                r = {"dtype": dt, "batch": bsz, "vocab": v, "bytes": nbytes,
                     "t_copy_ms": round(t_copy, 5), "t_full_top20_ms": round(t_both, 5),
                     "t_full_ms": round(t_full, 5),
                     "top20_extra_ms": round(t_both - t_full, 5)}  # fmt: skip
                both = frac_of_copy(nbytes, t_copy, t_both)
                full = frac_of_copy(nbytes, t_copy, t_full)
                r.update(copy_read_GBps=both["copy_read_GBps"], kernel_GBps=both["kernel_GBps"],
                         frac_copy=both["frac_copy"], full_only_GBps=full["kernel_GBps"],
                         full_only_frac_copy=full["frac_copy"])  # fmt: skip
                rows.append(r)
                del x, dst
    goal_rows = [r for r in rows if r["batch"] >= 64 and r["vocab"] >= 131072]
    worst = min((r["frac_copy"] for r in goal_rows), default=None)
    return {
        "definition": "frac_copy = t_copy/t_kernel = (logits bytes / t_kernel) / (logits bytes / "
        "t_copy); dst.copy_(logits) moves 2x the logits bytes, so copy_read_GBps is half its "
        "read+write rate; do_bench median, L2 flushed before each call; 'top20 alone' is not a "
        "kernel mode (top-k needs the full pass's log-sum-exp): its cost is top20_extra_ms = "
        "t_full_top20 - t_full",
        "large_copy_rw_GBps": big, "rows": rows, "skipped": skipped,
        "goal": f"frac_copy >= {GOAL_FRAC} (full+top20) at batch >= 64, vocab >= 128k",
        "worst_goal_frac": worst,
        "ok": worst is not None and worst >= GOAL_FRAC and not skipped,
    }


# ----------------------------------------------------------------------------- 3 syncs


def _install_vllm_stubs():
    """Stub the vLLM modules the two processors import; returns what to restore.

    Only the names they use: ``vllm.v1.sample.logits_processor`` (V1:
    ``BatchUpdate`` with removed, added, moved, batch_size; ``LogitsProcessor``;
    ``MoveDirectionality``) and ``vllm.v1.worker.gpu.sample.logits_processor``
    (MRV2: ``LogitsProcessor``). Any real vLLM (and the processor modules bound
    to it) is set aside and put back by :func:`_remove_vllm_stubs`.
    """
    import enum

    v1 = "vllm.v1.sample.logits_processor"
    mr = "vllm.v1.worker.gpu.sample.logits_processor"
    names = sorted({m.rsplit(".", j)[0] for m in (v1, mr) for j in range(m.count(".") + 1)})
    drop = [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
    drop += [m for m in sys.modules if m.startswith("sentinel_vllm.serving.worker.processor")]
    saved = {m: sys.modules.pop(m) for m in drop}
    for n in names:
        sys.modules[n] = types.ModuleType(n)

    class MoveDirectionality(enum.Enum):
        UNIDIRECTIONAL = 0
        SWAP = 1

    class BatchUpdate:
        def __init__(self, batch_size, removed=(), added=(), moved=()):
            self.batch_size, self.removed = batch_size, list(removed)
            self.added, self.moved = list(added), list(moved)

    class LogitsProcessor:
        pass

    lp = sys.modules[v1]
    lp.MoveDirectionality, lp.BatchUpdate, lp.LogitsProcessor = (
        MoveDirectionality, BatchUpdate, LogitsProcessor)  # fmt: skip
    sys.modules[mr].LogitsProcessor = type("LogitsProcessor", (), {})
    return saved, names


def _remove_vllm_stubs(saved, names) -> None:
    for n in names:
        sys.modules.pop(n, None)
    for m in [m for m in sys.modules if m.startswith("sentinel_vllm.serving.worker.processor")]:
        sys.modules.pop(m, None)
    sys.modules.update(saved)


def make_schedule(steps: int, max_batch: int, seed: int = 0) -> list[dict]:
    """A persistent-batch schedule as vLLM's V1 input batch reports it.

    Per step: ``removed`` rows (freed and not refilled), ``added`` ``(row, request)``
    (a freed row refilled in the same step is not in ``removed``, as vLLM's
    ``pop_removed``; new requests are appended when no row is free), ``moved``
    ``(src, dst, "swap"|"move")`` (condense: the last row moves into a hole;
    now and then a swap) and the resulting ``rows`` (request per row, dense).

    >>> s = make_schedule(60, 8)
    >>> all(1 <= len(e["rows"]) <= 8 for e in s) and s[0]["added"][0] == (0, 0)
    True
    """
    import random

    rng = random.Random(seed)
    rows: list = []
    nxt, out = 0, []
    for step in range(steps):
        removed, added, moved = [], [], []
        freed = [r for r in range(len(rows)) if step > 0 and rng.random() < 0.04]
        for r in freed:
            if rng.random() < 0.7:
                rows[r] = nxt
                added.append((r, nxt))
                nxt += 1
            else:
                rows[r] = None
                removed.append(r)
        for r in sorted(removed):  # condense: the last live row moves into the hole
            while rows and rows[-1] is None:
                rows.pop()
            if r < len(rows) and rows[r] is None:
                last = len(rows) - 1
                rows[r], rows[last] = rows[last], None
                moved.append((last, r, "move"))
        while rows and rows[-1] is None:
            rows.pop()
        # vLLM fills freed rows before appending, and condenses after the adds: an
        # append in a step that left holes would be reported out of order
        want = max_batch // 2 if step == 0 else len(rows) + (not removed and rng.random() < 0.3)
        while len(rows) < min(want, max_batch) or not rows:
            rows.append(nxt)
            added.append((len(rows) - 1, nxt))
            nxt += 1
        if len(rows) >= 2 and rng.random() < 0.1:
            a, b = rng.sample(range(len(rows)), 2)
            rows[a], rows[b] = rows[b], rows[a]
            moved.append((a, b, "swap"))
        out.append({"removed": removed, "added": added, "moved": moved, "rows": list(rows)})
    return out


def _vllm_config(vocab, max_batch):
    return types.SimpleNamespace(
        additional_config={}, model_config=types.SimpleNamespace(
            max_model_len=4096, get_vocab_size=lambda: vocab),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_batch))  # fmt: skip


class V1Driver:
    """Feeds a schedule step to the V1 processor as vLLM's persistent batch does."""

    def __init__(self, ctx, vocab, max_batch):
        from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

        self.proc = SentinelLogitsProcessor(_vllm_config(vocab, max_batch), ctx.dev, True,
                                            backend=ctx.backend)  # fmt: skip

    def update(self, e, outs, params):
        from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

        added = [(r, params[q], [1, 2, 3], outs[q]) for r, q in e["added"]]
        moved = [(a, b, MoveDirectionality.SWAP if k == "swap" else
                  MoveDirectionality.UNIDIRECTIONAL) for a, b, k in e["moved"]]  # fmt: skip
        self.proc.update_state(BatchUpdate(len(e["rows"]), e["removed"], added, moved))

    def apply(self, logits, e, outs):
        self.proc.apply(logits)


class MRV2Driver:
    """Feeds a schedule step to the MRV2 processor: request slots from a free list,
    ``add_request`` only (no removal hook), host-side ``LogitsContext`` arrays."""

    PROMPT = 3

    def __init__(self, ctx, vocab, max_batch):
        import numpy as np

        from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2

        def uva(n):
            a = np.zeros(n, dtype=np.int32)
            return types.SimpleNamespace(np=a, gpu=None)  # .gpu: device path only (spec decode)

        self.np = np
        self.rs = types.SimpleNamespace(device=ctx.dev, max_num_reqs=max_batch, vocab_size=vocab,
                                        prompt_len=uva(max_batch), prefill_len=uva(max_batch))
        self.proc = SentinelLogitsProcessorMRV2(_vllm_config(vocab, max_batch), self.rs,
                                                backend=ctx.backend)  # fmt: skip
        self.free = list(range(max_batch - 1, -1, -1))
        self.slot_of: dict = {}

    def update(self, e, outs, params):
        live = set(e["rows"])
        for q in [q for q in self.slot_of if q not in live]:  # finished: slot back to the list
            self.free.append(self.slot_of.pop(q))
        for _, q in e["added"]:
            i = self.free.pop()
            self.slot_of[q] = i
            self.rs.prompt_len.np[i] = self.rs.prefill_len.np[i] = self.PROMPT
            self.proc.add_request(i, params[q])

    def apply(self, logits, e, outs):
        np = self.np
        ctx = types.SimpleNamespace(
            idx_mapping_np=np.array([self.slot_of[q] for q in e["rows"]], dtype=np.int32),
            seq_lens_upper_bound_np=np.array([self.PROMPT + len(outs[q]) for q in e["rows"]],
                                             dtype=np.int32))  # fmt: skip
        self.proc.apply(logits, ctx)


def _processor_run(ctx, driver_cls, sched, pool, vocab, max_batch, mode):
    """Drive a fresh processor through ``sched``; count sync warnings per phase.

    ``mode``: None (no debug mode), "warn" (count) or "error" (a synchronising
    call raises; the processor's own guard then disables it: recorded as
    ``failed`` with the innermost frames of the exception).
    """
    import logging

    import torch

    drv = driver_cls(ctx, vocab, max_batch)
    errors = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.exc_info:
                tb = traceback.format_exception(*record.exc_info)
                errors.append("".join(tb[-4:])[-1500:])

    lg = logging.getLogger("sentinel_vllm.serving.worker.processor_base")
    grab = Grab()
    lg.addHandler(grab)
    outs, truth, params, where = {}, {}, {}, {}
    counts = {"update_state": 0, "apply": 0}
    cuda = ctx.dev.type == "cuda" and mode is not None
    if ctx.dev.type == "cuda":
        torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode(mode)
            for i, e in enumerate(sched):
                for _, q in e["added"]:
                    outs[q] = []
                    params[q] = types.SimpleNamespace(extra_args={"sentinel_id": f"r{q}"})
                logits = pool[i % len(pool)][: len(e["rows"])]
                steps = (("update_state", lambda e=e: drv.update(e, outs, params)),
                         ("apply", lambda x=logits, e=e: drv.apply(x, e, outs)))  # fmt: skip
                for phase, call in steps:
                    n0 = len(w)
                    call()
                    for x in w[n0:]:
                        if "synchroniz" in str(x.message):
                            counts[phase] += 1
                            key = f"{phase} {Path(x.filename).name}:{x.lineno}"
                            where[key] = where.get(key, 0) + 1
                    if drv.proc.failed and "failed_at" not in where:
                        where["failed_at"] = f"step {i} {phase}: {drv.proc.failed}"
                for q in e["rows"]:  # the sampled token of this step
                    outs[q].append(0)
                    truth[q] = truth.get(q, 0) + 1
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        lg.removeHandler(grab)
    return drv.proc, truth, counts, where, errors


def _sync_pass(ctx, driver_cls, sched, pool, vocab, max_batch, mode) -> dict:
    """One pass of the schedule, then the result channel checked against the step counts."""
    t0 = time.perf_counter()
    proc, truth, counts, where, errors = _processor_run(ctx, driver_cls, sched, pool, vocab,
                                                        max_batch, mode)  # fmt: skip
    got = proc.tracker.fetch([f"r{q}" for q in truth])  # host copy by design, after the loop
    bad = [(sid, s["n_steps"], truth[int(sid[1:])]) for sid, ss in got.items()
           for s in ss if s["n_steps"] + s["nan_steps"] != truth[int(sid[1:])]]  # fmt: skip
    live = set(sched[-1]["rows"])
    return {
        "syncs": counts, "where": where, "failed": proc.failed, "errors": errors[:2],
        "s": round(time.perf_counter() - t0, 2), "fetched": sum(len(v) for v in got.values()),
        "live_fetched": sum(f"r{q}" in got for q in live), "live": len(live),
        "step_count_mismatches": bad[:5], "n_mismatch": len(bad),
    }  # fmt: skip


def sec_syncs(ctx, budget: Budget) -> dict:
    import torch

    steps, max_batch = 200, (64 if not ctx.dry else 6)
    vocab = 151936 if not ctx.dry else 300
    sched = make_schedule(steps, max_batch, seed=1)
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = [(torch.randn(max_batch, vocab, generator=g) * 3).to(ctx.dev) for _ in range(4)]
    saved, names = _install_vllm_stubs()
    res = {"steps": steps, "max_batch": max_batch, "vocab": vocab,
           "driver": "processor_v1.SentinelLogitsProcessor (v1) and processor_mrv2."
                     "SentinelLogitsProcessorMRV2 (mrv2, host-mapped rows) with their vLLM "
                     "interface modules stubbed; real tracker, SlotState and kernel",
           "n_requests": 1 + max(q for e in sched for _, q in e["added"])}  # fmt: skip
    ok = True
    try:
        for tag, cls in (("v1", V1Driver), ("mrv2", MRV2Driver)):
            _processor_run(ctx, cls, sched[:10], pool, vocab, max_batch, None)  # warm-up: JIT
            for mode in ("warn", "error"):
                if budget.left() < 2:
                    res[f"{tag}_{mode}_pass"] = {"skipped": "budget"}
                    ok = False
                    continue
                r = _sync_pass(ctx, cls, sched, pool, vocab, max_batch, mode)
                res[f"{tag}_{mode}_pass"] = r
                ok &= (r["syncs"] == {"update_state": 0, "apply": 0} and r["failed"] is None
                       and r["n_mismatch"] == 0 and r["live_fetched"] == r["live"])  # fmt: skip
    finally:
        _remove_vllm_stubs(saved, names)
    per = [res[k]["syncs"]["apply"] for k in res if k.endswith("warn_pass") and "syncs" in res[k]]
    res["syncs_per_step"] = None if not per else max(per) / steps
    res["mode_applies"] = ctx.dev.type == "cuda"
    res["ok"] = bool(ok)
    return res


# ----------------------------------------------------------------------------- 4 decode


def get_model(ctx):
    """Qwen2-0.5B-shaped ``Qwen2ForCausalLM`` with random weights, bf16 (cached on ctx)."""
    if getattr(ctx, "model", None) is not None:
        return ctx.model
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if ctx.dry:
        shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 128,
                 "vocab_size": 1000}  # fmt: skip
    else:
        shape = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "intermediate_size": 4864,
                 "vocab_size": 151936}  # fmt: skip
    config = Qwen2Config(**shape, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(ctx.dev):
        model = Qwen2ForCausalLM(config)
    ctx.model = model.to(torch.bfloat16).eval()
    return ctx.model


class SentinelHF:
    """The worker's per-step work as a transformers ``LogitsProcessor``.

    What the V1 processor's ``apply`` does each step: a pinned, non-blocking
    host-to-device copy of the output positions, then one ``tracker.record``
    (entropy full + top-20 of every tracked row into its device slot at that
    position). CUDA events around the call time it on the device; the host time
    of the call is summed too. Optionally keeps device copies of some rows' logits
    (``keep_rows``) for the float64 check (no host copy during the loop).
    """

    def __init__(self, tracker, rows, slots, prompt_len, keep_rows=None, time_it=True):
        import torch

        self.torch = torch
        self.tracker, self.rows, self.slots, self.prompt_len = tracker, rows, slots, prompt_len
        self.keep_rows, self.kept = keep_rows, []
        self.time_it = time_it and rows.is_cuda
        self.events, self.host_s, self.calls = [], 0.0, 0

    def __call__(self, input_ids, scores):
        import numpy as np

        torch = self.torch
        t0 = time.perf_counter()
        if self.time_it:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        pos = np.full(self.rows.shape[0], input_ids.shape[1] - self.prompt_len, dtype=np.int64)
        pos_t = torch.from_numpy(pos)
        pos_t = pos_t.pin_memory().to(scores.device, non_blocking=True) if scores.is_cuda else pos_t
        self.tracker.record(scores, self.rows, self.slots, pos_t)
        if self.keep_rows is not None:
            self.kept.append(scores.index_select(0, self.keep_rows).clone())
        if self.time_it:
            b.record()
            self.events.append((a, b))
        self.host_s += time.perf_counter() - t0
        self.calls += 1
        return scores

    def device_ms(self) -> float:
        self.torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events)


def _make_tracker(ctx, batch, max_steps):
    from sentinel_vllm.serving.worker.tracker import SlotTracker

    return SlotTracker(batch, max_steps, ("full", "top20"), ctx.dev, backend=ctx.backend)


def _generate(ctx, model, ids, new_tokens, proc=None):
    """One greedy generate; returns (seconds, new tokens per row)."""
    import torch
    from transformers import LogitsProcessorList

    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}  # fmt: skip
    if proc is not None:
        kw["logits_processor"] = LogitsProcessorList([proc])
    if ctx.dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    if ctx.dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.shape[1] - ids.shape[1]


def _sentinel_proc(ctx, tracker, batch, prompt_len, tag, keep_rows=None):
    import torch

    entries = [tracker.acquire(f"{tag}{i}", 0) for i in range(batch)]
    slots = torch.as_tensor([e.slot for e in entries], dtype=torch.long).to(ctx.dev)
    rows = torch.arange(batch, device=ctx.dev)
    sids = [f"{tag}{i}" for i in range(batch)]
    return SentinelHF(tracker, rows, slots, prompt_len, keep_rows), sids


def sec_decode(ctx, budget: Budget) -> dict:
    import torch

    batch, prompt, new = (64, 32, 256) if not ctx.dry else (4, 8, 6)
    model = get_model(ctx)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(ctx.dev)
    tracker = _make_tracker(ctx, batch, max(new + 8, 64))
    run = [0]

    def with_sentinel(n_new, time_it=False):
        run[0] += 1
        proc, sids = _sentinel_proc(ctx, tracker, batch, prompt, f"d{run[0]}_")
        proc.time_it = time_it and proc.time_it
        t, got = _generate(ctx, model, ids, n_new, proc)
        for e in tracker.entries():  # the requests finished: park, then fetch frees the slots
            tracker.park(e)
        feats = tracker.fetch(sids)  # the result channel, after the loop
        assert got == n_new and all(s[0]["n_steps"] == n_new for s in feats.values()), (got, n_new)
        return t, proc

    t_w0 = time.perf_counter()
    _generate(ctx, model, ids, 8)  # warm-up both paths (allocator, cuBLAS, kernel JIT)
    with_sentinel(8)
    warm_s = time.perf_counter() - t_w0
    t1, _ = _generate(ctx, model, ids, new)
    rounds_fit = int((budget.left() - 5 - 1.1 * t1) // (4 * t1 * 1.05))  # + the events run
    n_rounds = max(1, min(3, rounds_fit))
    without, with_, host_s, calls = [t1], [], 0.0, 0
    for rnd in range(n_rounds):  # ABBA: with, without, without, with (t1 was the first A)
        order = ("with", "without", "without", "with") if rnd else ("with", "with", "without")
        for kind in order:
            if kind == "without":
                without.append(_generate(ctx, model, ids, new)[0])
            else:
                t, proc = with_sentinel(new)
                with_.append(t)
                host_s += proc.host_s
                calls += proc.calls
    # one more run with CUDA events around each call (not in the ratio: the events cost time)
    t_ev, proc = with_sentinel(new, time_it=True)
    dev_ms = proc.device_ms() / max(proc.calls, 1) if proc.time_it else 0.0
    # the step's GPU work alone (no launch gaps): the same record call on a logits batch
    x = torch.randn(batch, vocab, device=ctx.dev) * 3
    proc, _ = _sentinel_proc(ctx, tracker, batch, prompt, "bench")
    step_alone = timer(ctx.dev, lambda: proc(ids, x), ctx.dry)
    n = min(len(with_), len(without))
    r = abba_ratio(without[:n], with_[:n])
    step_with_ms = 1e3 * sum(with_) / (len(with_) * new)
    res = {
        "batch": batch, "prompt": prompt, "new_tokens": new, "vocab": vocab, "dtype": "bfloat16",
        "warmup_s": round(warm_s, 2), "runs_with": len(with_), "runs_without": len(without),
        "t_with_s": [round(t, 3) for t in with_], "t_without_s": [round(t, 3) for t in without],
        "tok_s_with": round(batch * new * len(with_) / sum(with_), 1),
        "tok_s_without": round(batch * new * len(without) / sum(without), 1),
        "throughput_ratio": round((sum(without) / len(without)) / (sum(with_) / len(with_)), 4),
        "paired": r, "step_ms_with": round(step_with_ms, 3),
        "sentinel_device_ms_per_step": round(dev_ms, 4), "t_with_events_s": round(t_ev, 3),
        "sentinel_host_ms_per_step": round(1e3 * host_s / max(calls, 1), 4),
        "sentinel_step_alone_ms": round(step_alone, 4),
        "definitions": "throughput_ratio = mean t_without / mean t_with (same tokens per run); "
        "runs ordered ABBA after one warm-up generate of each kind; step_ms_with = t_with / "
        "new_tokens; sentinel_device_ms_per_step = CUDA-event span around the processor call, "
        "from one extra with-run not in the ratio (includes GPU idle time while the host "
        "launches its ops); sentinel_host_ms_per_step = host time of the call (ratio runs); "
        "sentinel_step_alone_ms = the same call timed alone (do_bench, "
        "float32 logits of batch x vocab); shares = per-step figure / step_ms_with",
    }
    res["sentinel_device_share"] = round(res["sentinel_device_ms_per_step"] / step_with_ms, 5)
    res["sentinel_host_share"] = round(res["sentinel_host_ms_per_step"] / step_with_ms, 5)
    res["goal"] = f"throughput_ratio >= {GOAL_RATIO}"
    res["ok"] = res["throughput_ratio"] >= GOAL_RATIO
    return res


# ----------------------------------------------------------------------------- 5 trajectory


def sec_trajectory(ctx, budget: Budget) -> dict:
    import numpy as np
    import torch

    from sentinel_vllm.entropy import full_entropy, topk_entropy

    batch, prompt, new = (64, 32, 64) if not ctx.dry else (4, 8, 6)
    model = get_model(ctx)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(ctx.dev)
    tracker = _make_tracker(ctx, batch, new + 8)
    keep = list(range(0, batch, max(1, batch // 16)))  # 16 rows of 64
    keep_t = torch.as_tensor(keep, device=ctx.dev)
    proc, sids = _sentinel_proc(ctx, tracker, batch, prompt, "t", keep_t)
    proc.time_it = False
    _, got = _generate(ctx, model, ids, new, proc)
    kept = torch.stack(proc.kept, 1).double().cpu().numpy()  # (rows, steps, vocab)
    traj = tracker.trajectories([sids[i] for i in keep])
    diffs = {"full": 0.0, "top20": 0.0}
    n_steps = []
    for j, i in enumerate(keep):
        s = traj[sids[i]][0]
        n_steps.append(s["n_steps"])
        ref = {"full": full_entropy(kept[j]), "top20": topk_entropy(kept[j], 20)}
        for name in list(diffs):
            dev_vals = np.asarray(s["series"][name], dtype=np.float64)
            if dev_vals.shape != ref[name].shape:
                diffs[name] = float("inf")
                continue
            diffs[name] = max(diffs[name], float(np.max(np.abs(dev_vals - ref[name]))))
    res = {"batch": batch, "new_tokens": new, "got_tokens": got, "rows_checked": len(keep),
           "steps_checked": int(kept.shape[1]), "n_steps": sorted(set(n_steps)),
           "max_abs_diff": diffs, "logits_dtype_seen": "float32 (transformers upcasts)",
           "goal": f"max |device - float64| <= {GOAL_ATOL}"}  # fmt: skip
    res["ok"] = (max(diffs.values()) <= GOAL_ATOL and set(n_steps) == {new}
                 and kept.shape[1] == new)  # fmt: skip
    return res


# ----------------------------------------------------------------------------- main

SECTIONS = [  # name, function, budget seconds on the GPU (dry run: same caps)
    ("tests", sec_tests, 110),
    ("bandwidth", sec_bandwidth, 60),
    ("syncs", sec_syncs, 40),
    ("decode", sec_decode, 170),
    ("trajectory", sec_trajectory, 40),
]


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, item, value, goal/ok) rows of the one printed table."""
    out = []

    def ok(x):
        if not x:
            return "not run"
        return "PASS" if x.get("ok") else ("ERROR" if isinstance(x.get("error"), str) else "FAIL")

    t = results.get("tests", {})
    out.append(("1 tests", "pytest kernels on device", json.dumps(t.get("counts", t.get("error"))),
                ok(t)))  # fmt: skip
    b = results.get("bandwidth", {})
    out.append(("2 bandwidth", "large copy r+w GB/s", str(b.get("large_copy_rw_GBps")), ""))
    for r in b.get("rows", []):
        item = f"{r['dtype']:>8} b={r['batch']:<4} v={r['vocab']:<6}"
        val = (f"copy {r['t_copy_ms']:.4f} ms | full+top20 {r['t_full_top20_ms']:.4f} ms "
               f"{r['kernel_GBps']:.0f} GB/s frac {r['frac_copy']:.3f} | full {r['t_full_ms']:.4f}"
               f" ms frac {r['full_only_frac_copy']:.3f} | +top20 {r['top20_extra_ms']:.4f} ms")
        goal = r["batch"] >= 64 and r["vocab"] >= 131072
        out.append(("2 bandwidth", item, val, ("ok" if r["frac_copy"] >= GOAL_FRAC else "LOW")
                    if goal else ""))  # fmt: skip
    out.append(("2 bandwidth", "worst frac_copy in goal range", str(b.get("worst_goal_frac")),
                ok(b)))  # fmt: skip
    s = results.get("syncs", {})
    for tag in ("v1_warn", "v1_error", "mrv2_warn", "mrv2_error"):
        m = s.get(f"{tag}_pass", {})
        out.append(("3 syncs", f"{tag} pass: syncs / failed / mismatches",
                    f"{m.get('syncs')} / {m.get('failed')} / {m.get('n_mismatch')}", ""))
    out.append(("3 syncs", "host syncs per step", str(s.get("syncs_per_step")), ok(s)))
    d = results.get("decode", {})
    for key in ("tok_s_without", "tok_s_with", "throughput_ratio", "paired", "step_ms_with",
                "sentinel_device_ms_per_step", "sentinel_device_share",
                "sentinel_host_ms_per_step", "sentinel_host_share",
                "sentinel_step_alone_ms"):  # fmt: skip
        out.append(("4 decode", key, json.dumps(d.get(key)),
                    ok(d) if key == "throughput_ratio" else ""))  # fmt: skip
    tr = results.get("trajectory", {})
    out.append(("5 trajectory", "max |device - float64|", json.dumps(tr.get("max_abs_diff")),
                ok(tr)))  # fmt: skip
    for name, r in results.items():
        if isinstance(r, dict) and isinstance(r.get("error"), str):
            out.append((name, "ERROR", r["error"].splitlines()[-1][:150], "ERROR"))
    return out


def print_table(rows) -> None:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'section':<{w0}} | {'item':<{w1}} | result | goal")
    print("-" * (w0 + w1 + 30))
    for a, b, c, d in rows:
        print(f"{a:<{w0}} | {b:<{w1}} | {c} | {d}")


def _env(ctx) -> dict:
    import torch

    env = {"time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "dry_run": ctx.dry,
           "python": platform.python_version(), "torch": torch.__version__,
           "device": str(ctx.dev), "backend": ctx.backend}  # fmt: skip
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable: {e}"
    if ctx.dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, cuda=torch.version.cuda)  # fmt: skip
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (checks the script)")
    ap.add_argument("--only", default="", help="comma list of sections to run (default: all)")
    ap.add_argument("--total-s", type=float, default=455.0, help="overall wall-clock budget")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    _setup_paths(args.dry_run)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    ctx = types.SimpleNamespace(dry=args.dry_run, model=None)
    if not args.dry_run and not torch.cuda.is_available():
        print("!! no CUDA device: use --dry-run for a CPU check", file=sys.stderr)
        out.write_text(json.dumps({"error": "no CUDA", "torch": torch.__version__}))
        return 2
    ctx.dev = torch.device("cpu" if args.dry_run else "cuda")
    ctx.backend = "torch" if args.dry_run else "auto"
    deadline = t_start + args.total_s
    results: dict = {"env": _env(ctx)}
    only = {s for s in args.only.split(",") if s}
    for name, fn, secs in SECTIONS:
        if only and name not in only:
            continue
        log(f"section {name} (budget {secs} s, {deadline - time.monotonic():.0f} s left overall)")
        t0 = time.perf_counter()
        try:
            results[name] = fn(ctx, Budget(secs, deadline))
        except Exception as e:  # noqa: BLE001 - one failure must not stop the others
            results[name] = {"ok": False, "error": "".join(traceback.format_exception(e))[-3000:]}
            log(f"section {name} raised: {type(e).__name__}: {e}")
        results[name]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if ctx.dev.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(results, indent=1, default=str))
        log(f"section {name} done in {results[name]['elapsed_s']} s, ok={results[name].get('ok')}")
    ctx.model = None
    results["goals"] = {n: results[n].get("ok") for n, _, _ in SECTIONS if n in results}
    results["total_s"] = round(time.monotonic() - t_start, 1)
    out.write_text(json.dumps(results, indent=1, default=str))
    print_table(summary_rows(results))
    print(f"# json: {out}  total {results['total_s']} s  goals {results['goals']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
