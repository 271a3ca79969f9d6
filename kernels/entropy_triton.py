"""Triton kernel: full-vocabulary and top-k entropy of each logits row in one read.

One program per row; the vocabulary is streamed in ``BLOCK_SIZE`` chunks. The
math follows :mod:`sentinel_vllm.entropy` (docs/method.md "Per-step entropy";
arXiv 2601.09001 Sec. 3.1). Triton is imported lazily by :func:`entropy_triton`
so that importing :mod:`sentinel_vllm.kernels` works without it; on CPU the
kernel runs under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["entropy_triton", "launch_config"]

_KERNEL = None


def _build_kernel():
    import triton
    import triton.language as tl

    # Online reduction over blocks, per row (fp32):
    #   m_new = max(m, max(x_b)),  a = e^(m - m_new)
    #   S <- a S + sum e^(x - m_new)
    #   T <- a (T + (m - m_new) S) + sum e^(x - m_new) (x - m_new)   [T = sum e^z z]
    #   H = log S - T / S ;  lse = m + log S.   x = -inf contributes 0 (guarded).
    # Top-k: a register buffer of the KP largest values seen (KP >= kmax, padded
    # with +inf beyond kmax so the padding is never the minimum); a block whose
    # max exceeds the buffer minimum inserts its values one by one (largest
    # first, replacing the minimum). Ties at the threshold are not inserted:
    # a tied value has the same p, so the entropy is unchanged.
    @triton.jit
    def _entropy_kernel(
        full_ptr,
        topk_ptr,
        renorm_ptr,
        stride_out,
        x_ptr,
        stride_xr,
        stride_xc,
        ks_ptr,
        V,
        KMAX,
        NK: tl.constexpr,
        NKP: tl.constexpr,
        KP: tl.constexpr,
        DO_TOPK: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        offs = tl.arange(0, BLOCK_SIZE)
        kidx = tl.arange(0, KP)
        neg_inf = float("-inf")
        m = tl.full((), neg_inf, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        bad = tl.zeros((), tl.int32)
        buf = tl.where(kidx < KMAX, neg_inf, float("inf")).to(tl.float32)
        thr = tl.min(buf, 0)
        for start in range(0, V, BLOCK_SIZE):
            cols = start + offs
            inb = cols < V
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=inb, other=neg_inf)
            x = x.to(tl.float32)
            isbad = (x != x) | (x == float("inf"))
            bad = bad | tl.max(isbad.to(tl.int32), 0)
            x = tl.where(isbad, neg_inf, x)
            bmax, bi = tl.max(x, 0, return_indices=True)
            m_new = tl.maximum(m, bmax)
            a = tl.where(m_new == neg_inf, 1.0, tl.exp(m - m_new))
            d = tl.where(m == neg_inf, 0.0, m - m_new)
            z = x - m_new
            e = tl.where(x == neg_inf, 0.0, tl.exp(z))
            ez = tl.where(e > 0, e * z, 0.0)
            t = a * (t + d * s) + tl.sum(ez, 0)
            s = a * s + tl.sum(e, 0)
            m = m_new
            if DO_TOPK:
                # Expected insertions per row ~ k (1 + ln(V / k)) for any value distribution
                # in random order; each costs one block reduction.
                while bmax > thr:
                    x = tl.where(offs == bi, neg_inf, x)
                    j = tl.argmin(buf, 0)
                    buf = tl.where(kidx == j, bmax, buf)
                    thr = tl.min(buf, 0)
                    bmax, bi = tl.max(x, 0, return_indices=True)
        invalid = (bad != 0) | (m == neg_inf)
        log_s = tl.log(s)
        h = tl.maximum(log_s - t / s, 0.0)
        h = tl.where(invalid, float("nan"), h)
        tl.store(full_ptr + row, h)
        if DO_TOPK:
            lse = m + log_s
            vals = tl.where(kidx < KMAX, buf, neg_inf)
            vals = tl.sort(vals, 0, descending=True)
            logp = vals - lse
            p = tl.exp(logp)
            c = tl.where(p > 0, -p * logp, 0.0)
            zz = vals - m
            ee = tl.where(vals == neg_inf, 0.0, tl.exp(zz))
            ff = tl.where(ee > 0, ee * zz, 0.0)
            jk = tl.arange(0, NKP)
            ks = tl.load(ks_ptr + jk, mask=jk < NK, other=0)
            sel = kidx[None, :] < ks[:, None]
            hk = tl.maximum(tl.sum(tl.where(sel, c[None, :], 0.0), 1), 0.0)
            ek = tl.sum(tl.where(sel, ee[None, :], 0.0), 1)
            fk = tl.sum(tl.where(sel, ff[None, :], 0.0), 1)
            hr = tl.maximum(tl.log(ek) - fk / ek, 0.0)
            hk = tl.where(invalid, float("nan"), hk)
            hr = tl.where(invalid, float("nan"), hr)
            tl.store(topk_ptr + row * stride_out + jk, hk, mask=jk < NK)
            tl.store(renorm_ptr + row * stride_out + jk, hr, mask=jk < NK)

    return _entropy_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_KS_CACHE: dict = {}


def _ks_tensor(ks: tuple, dev: torch.device) -> torch.Tensor:
    """The ks as an int32 device tensor, cached (no host-to-device copy per step)."""
    key = (ks, str(dev))
    if key not in _KS_CACHE:
        _KS_CACHE[key] = torch.tensor(ks, dtype=torch.int32, device=dev)
    return _KS_CACHE[key]


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


def entropy_triton(logits: torch.Tensor, ks: Sequence[int] = (20,), block_size: int | None = None):
    """Full, top-k and renormalised top-k entropy per row with the Triton kernel.

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
        Any strides. CUDA tensor, or CPU tensor under ``TRITON_INTERPRET=1``.
    ks : sequence of int
        Sorted ascending, each in ``1..64``, already clamped to ``vocab``; may be empty.
    block_size : int, optional
        Vocabulary chunk per loop iteration (see :func:`launch_config`).

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
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    b, v = logits.shape
    dev = logits.device
    nk = len(ks)
    full = torch.empty(b, dtype=torch.float32, device=dev)
    topk = torch.empty((b, max(nk, 1)), dtype=torch.float32, device=dev)
    renorm = torch.empty_like(topk)
    ks_t = _ks_tensor(tuple(ks) or (1,), dev)
    kmax = max(ks) if nk else 1
    block, warps = launch_config(v, block_size)
    if b > 0:
        _KERNEL[(b,)](
            full, topk, renorm, topk.stride(0),
            logits, logits.stride(0), logits.stride(1),
            ks_t, v, kmax,
            NK=max(nk, 1), NKP=max(_next_pow2(nk), 2), KP=max(_next_pow2(kmax), 2),
            DO_TOPK=nk > 0, BLOCK_SIZE=block, num_warps=warps,
        )  # fmt: skip
    return full, topk[:, :nk], renorm[:, :nk]
