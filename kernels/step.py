"""``entropy_step``: the one entry point for per-step entropy, choosing the backend."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["entropy_step", "warmup", "normalize_ks", "triton_available", "KMAX_LIMIT"]

#: Largest k the kernels keep (the register buffer of the Triton kernel).
KMAX_LIMIT = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once, lazily)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception:
            _TRITON_OK = False
    return _TRITON_OK


def normalize_ks(ks: Sequence[int], vocab: int) -> tuple[int, ...]:
    """Validate ``ks`` and clamp each to ``vocab``.

    Parameters
    ----------
    ks : sequence of int
        Sorted ascending, each in ``1..64``.
    vocab : int

    Returns
    -------
    tuple of int
        ``min(k, vocab)`` for each k, same length and order.

    Raises
    ------
    ValueError
        If a k is outside ``1..64`` or ``ks`` is not sorted ascending.
    """
    ks = tuple(int(k) for k in ks)
    for k in ks:
        if not 1 <= k <= KMAX_LIMIT:
            raise ValueError(f"each k must lie in 1..{KMAX_LIMIT}, got {k}")
    if list(ks) != sorted(ks):
        raise ValueError(f"ks must be sorted ascending, got {ks}")
    return tuple(min(k, vocab) for k in ks)


def entropy_step(logits: torch.Tensor, ks: Sequence[int] = (20,), backend: str = "auto",
                 block_size: int | None = None):  # fmt: skip
    """Full-vocabulary, top-k and renormalised top-k entropy of each logits row.

    One decode step's worth of work, enqueued only (no host synchronisation).

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
        Raw logits (before temperature and truncation); any strides; batch up
        to 1,024, vocab up to 262,144 (any size works).
    ks : sequence of int, default (20,)
        Sorted ascending, each in ``1..64``; ``k > vocab`` means ``k = vocab``.
        May be empty (full entropy only).
    backend : {"auto", "triton", "torch"}
        ``"auto"``: Triton for CUDA tensors when triton is importable, the torch
        path otherwise. ``"triton"`` forces the kernel (on CPU it needs
        ``TRITON_INTERPRET=1``); ``"torch"`` forces the torch path.
    block_size : int, optional
        Triton vocabulary block (tests force the multi-block path); for the
        torch path, the chunk length of the top-k pruning.

    Returns
    -------
    full : torch.Tensor of float32, shape (batch,)
        ``H = -sum_v p_v ln p_v`` in nats.
    topk : torch.Tensor of float32, shape (batch, len(ks))
        Paper's top-k entropy (full-softmax ``p`` over the k largest), nats.
    topk_renorm : torch.Tensor of float32, shape (batch, len(ks))
        Entropy of the k largest renormalised, nats.
        Every output is NaN for an invalid row (any NaN, any ``+inf``, or all ``-inf``).

    Raises
    ------
    ValueError
        On a bad shape, dtype, ``ks`` or backend name.

    References
    ----------
    :mod:`sentinel_vllm.entropy` (the float64 definitions); arXiv 2601.09001 Sec. 3.1.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    ks = normalize_ks(ks, logits.shape[1])
    if backend == "auto":
        backend = "triton" if logits.is_cuda and triton_available() else "torch"
    if backend == "triton":
        from .entropy_triton import entropy_triton

        return entropy_triton(logits, ks, block_size=block_size)
    if backend == "torch":
        from .entropy_torch import CHUNK, entropy_torch

        return entropy_torch(logits, ks, chunk=block_size or CHUNK)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def warmup(vocab: int, ks: Sequence[int] = (20,), dtype=torch.float32, device="cpu",
           backend: str = "auto") -> None:  # fmt: skip
    """Compile the step path ahead of the first decode step.

    The torch path is compiled with inductor on first use (6-25 s on a 2-core
    CPU; cached on disk afterwards) and the Triton kernel is JIT-compiled per
    dtype and ks; call this once at startup so no request pays for it. Shapes
    are dynamic, so one call covers every batch size.

    Parameters
    ----------
    vocab : int
        Vocabulary size of the served model.
    ks, dtype, device, backend
        As the later :func:`entropy_step` calls will use.
    """
    x = torch.zeros((2, int(vocab)), dtype=dtype, device=device)
    entropy_step(x, ks, backend=backend)
