"""Triton kernels: full-vocabulary and top-k entropy of each logits row in one read.

The vocabulary is streamed in ``BLOCK_SIZE`` chunks. With one split per row
(many rows) one program per row reduces and writes the outputs. With few rows
the row is cut into ``nsplit`` contiguous ranges: a ``(rows, nsplit)`` grid
writes per-range partials (max, S, T, bad flag, top-k values) to a small
scratch buffer and a second kernel, one program per row, combines them with
the same rescaling as the online formula and merges the candidates. The math
follows :mod:`sentinel_vllm.entropy` (docs/method.md "Per-step entropy";
arXiv 2601.09001 Sec. 3.1). Triton is imported lazily by :func:`entropy_triton`
so that importing :mod:`sentinel_vllm.kernels` works without it; on CPU the
kernels run under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["choose_split", "entropy_triton", "launch_config", "sm_count", "topk_subtile"]

_KERNELS = None
#: SM count assumed off CUDA (interpreter), so CPU tests exercise the split path.
CPU_SMS = 8
#: Fewest vocabulary blocks per split.
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLIT = 16


def _build_kernels():
    from ._entropy_jit import _combine_kernel, _entropy_kernel, _partial_kernel

    return _entropy_kernel, _partial_kernel, _combine_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_KS_CACHE: dict = {}
_SMS: dict = {}


def _ks_tensor(ks: tuple, dev: torch.device) -> torch.Tensor:
    """The ks as an int32 device tensor, cached (no host-to-device copy per step)."""
    key = (ks, str(dev))
    if key not in _KS_CACHE:
        _KS_CACHE[key] = torch.tensor(ks, dtype=torch.int32, device=dev)
    return _KS_CACHE[key]


def sm_count(dev: torch.device) -> int:
    """Streaming multiprocessors of ``dev`` (queried once); :data:`CPU_SMS` off CUDA."""
    if dev.type != "cuda":
        return CPU_SMS
    key = str(dev)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[key]


def launch_config(vocab: int, block_size: int | None = None) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a row of ``vocab`` logits.

    Parameters
    ----------
    vocab : int
    block_size : int, optional
        Override (rounded up to a power of two, at least 16); tests use it to
        force the multi-block path.
    """
    if block_size is None:
        block_size = min(_next_pow2(vocab), 4096)
    block_size = max(16, _next_pow2(block_size))
    num_warps = 4 if block_size <= 2048 else 8
    return block_size, num_warps


def choose_split(rows: int, vocab: int, block: int, sms: int) -> int:
    """Vocabulary splits per row: a power of two, doubled while ``rows * nsplit`` is
    below twice ``sms``, the result stays at most four times ``sms`` and each split
    keeps at least :data:`MIN_BLOCKS_PER_SPLIT` blocks (at most :data:`MAX_SPLIT`)."""
    nblocks = _cdiv(vocab, block)
    nsplit = 1
    while (rows * nsplit < 2 * sms and rows * nsplit * 2 <= 4 * sms and nsplit < MAX_SPLIT
           and nblocks >= 2 * nsplit * MIN_BLOCKS_PER_SPLIT):  # fmt: skip
        nsplit *= 2
    return nsplit


def topk_subtile(block: int, sub: int | None = None) -> int:
    """Sub-tile width of the top-k insertions: ``block // 16`` (at least 16) by default;
    ``sub=0`` (or a width >= ``block``) selects one-by-one insertion over the whole block."""
    if sub is None:
        sub = max(block // 16, 16)
    return block if sub == 0 else min(_next_pow2(sub), block)


def entropy_triton(logits: torch.Tensor, ks: Sequence[int] = (20,), block_size: int | None = None,
                   split: int | None = None, topk_sub: int | None = None):  # fmt: skip
    """Full, top-k and renormalised top-k entropy per row with the Triton kernels.

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
        Any strides. CUDA tensor, or CPU tensor under ``TRITON_INTERPRET=1``.
    ks : sequence of int
        Sorted ascending, each in ``1..64``, already clamped to ``vocab``; may be empty.
    block_size : int, optional
        Vocabulary chunk per loop iteration (see :func:`launch_config`).
    split : int, optional
        Vocabulary splits per row (rounded up to a power of two; 1 = the
        single-kernel path); default :func:`choose_split` for the device.
    topk_sub : int, optional
        Sub-tile width of the top-k insertions (see :func:`topk_subtile`).

    Returns
    -------
    full : torch.Tensor of float32, shape (batch,)
    topk, topk_renorm : torch.Tensor of float32, shape (batch, len(ks))
        Nats; NaN in every output for invalid rows (NaN, ``+inf``, all ``-inf``).

    Raises
    ------
    ImportError
        If triton is not installed.
    """
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    fused, partial, combine = _KERNELS
    b, v = logits.shape
    dev = logits.device
    nk = len(ks)
    full = torch.empty(b, dtype=torch.float32, device=dev)
    topk = torch.empty((b, max(nk, 1)), dtype=torch.float32, device=dev)
    renorm = torch.empty_like(topk)
    ks_t = _ks_tensor(tuple(ks) or (1,), dev)
    kmax = max(ks) if nk else 1
    block, warps = launch_config(v, block_size)
    ns = choose_split(b, v, block, sm_count(dev)) if split is None else _next_pow2(max(split, 1))
    kp = max(_next_pow2(kmax), 2)
    shape = {"NK": max(nk, 1), "NKP": max(_next_pow2(nk), 2), "KP": kp, "DO_TOPK": nk > 0}
    sub = topk_subtile(block, topk_sub)
    if b == 0:
        return full, topk[:, :nk], renorm[:, :nk]
    if ns == 1:
        fused[(b,)](
            full, topk, renorm, topk.stride(0), logits, logits.stride(0), logits.stride(1),
            ks_t, v, kmax, BLOCK_SIZE=block, SUB=sub, num_warps=warps, **shape,
        )  # fmt: skip
    else:
        span = _cdiv(_cdiv(v, block), ns) * block  # whole blocks per split
        stats = torch.empty((b, ns, 4), dtype=torch.float32, device=dev)
        cand = torch.empty((b, ns, kp if nk else 1), dtype=torch.float32, device=dev)
        partial[(b, ns)](
            stats, cand, logits, logits.stride(0), logits.stride(1), v, span, kmax, NS=ns,
            KP=kp, DO_TOPK=nk > 0, BLOCK_SIZE=block, SUB=sub, num_warps=warps,
        )  # fmt: skip
        combine[(b,)](full, topk, renorm, topk.stride(0), stats, cand, ks_t, NS=ns,
                      num_warps=4, **shape)  # fmt: skip
    return full, topk[:, :nk], renorm[:, :nk]
