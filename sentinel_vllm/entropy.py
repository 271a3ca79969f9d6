"""Per-step entropy of the next-token distribution, in nats.

The one definition of every entropy the project uses (docs/method.md, "Per-step
entropy"; Entropy Sentinel, arXiv 2601.09001, Sec. 3.1). The Triton kernel and
the torch path in :mod:`sentinel_vllm.kernels` are tested against these.

Definitions, for one decode step with logits ``x`` over the vocabulary ``V`` and
``p = softmax(x)``:

* full-vocabulary entropy ``H = -sum_v p_v ln p_v``
  computed stably as ``H = lse(x) - sum_v p_v x_v``;
* top-k entropy, the paper's definition ``H^k = -sum_{v in topk(p)} p_v ln p_v``,
  where ``p`` is still the FULL softmax (not renormalised): a lower bound of H,
  what a client computes from ``top_logprobs = k``;
* top-k renormalised ``q = p_topk / sum p_topk``, ``H = -sum q ln q``.

Masked logits (``-inf``) have ``p = 0`` and contribute 0. ``k >= V`` uses the
whole vocabulary (top-k equals full). Rows that contain NaN, or that are all
``-inf`` (or contain ``+inf``), have no defined distribution: the numpy and
torch functions return NaN for them, and :func:`invalid_rows` flags them;
``validate=True`` raises instead.

Only numpy is imported at module level; the torch versions import torch lazily.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "full_entropy",
    "topk_entropy",
    "topk_entropy_renorm",
    "invalid_rows",
    "entropy_from_top_logprobs",
    "full_entropy_torch",
    "topk_entropy_torch",
]


class InvalidLogitsError(ValueError):
    """Raised for rows with NaN, ``+inf`` or no finite logit when ``validate=True``."""


def _as_2d(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"logits must have shape (batch, vocab) or (vocab,), got {x.shape}")
    if x.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    return x


def invalid_rows(logits) -> np.ndarray:
    """Flag rows whose distribution is undefined.

    Parameters
    ----------
    logits : array-like of shape (batch, vocab) or (vocab,)

    Returns
    -------
    ndarray of bool, shape (batch,)
        True where a row contains NaN or ``+inf``, or has no finite logit.
    """
    x = _as_2d(logits)
    return np.isnan(x).any(1) | np.isposinf(x).any(1) | ~np.isfinite(x).any(1)


def _log_softmax(x: np.ndarray, validate: bool) -> tuple[np.ndarray, np.ndarray]:
    bad = invalid_rows(x)
    if validate and bad.any():
        raise InvalidLogitsError(
            f"rows {np.flatnonzero(bad).tolist()[:10]} contain NaN/+inf or no finite logit"
        )
    xs = np.where(bad[:, None], 0.0, x)
    m = xs.max(1, keepdims=True)
    with np.errstate(invalid="ignore"):
        z = xs - m  # -inf stays -inf
        lse = np.log(np.exp(z).sum(1, keepdims=True))
        logp = z - lse
    return logp, bad


def _plogp(logp: np.ndarray) -> np.ndarray:
    """``p * ln p`` elementwise with ``0 * -inf := 0``."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.exp(logp) * logp
    return np.where(np.isneginf(logp), 0.0, out)


def full_entropy(logits, *, validate: bool = False) -> np.ndarray:
    """Full-vocabulary entropy of ``softmax(logits)`` per row.

    Parameters
    ----------
    logits : array-like of shape (batch, vocab) or (vocab,)
        Raw logits (before temperature or truncation), any float dtype;
        computed in float64.
    validate : bool, default False
        Raise :class:`InvalidLogitsError` on an invalid row instead of
        returning NaN for it.

    Returns
    -------
    ndarray of float64, shape (batch,)
        Entropy in nats, in ``[0, ln V]``; NaN for invalid rows.

    References
    ----------
    docs/method.md "Per-step entropy"; arXiv 2601.09001 Sec. 3.1.
    """
    logp, bad = _log_softmax(_as_2d(logits), validate)
    h = -_plogp(logp).sum(1)
    h = np.maximum(h, 0.0)
    h[bad] = np.nan
    return h


def _topk_logp(logits, k: int, validate: bool) -> tuple[np.ndarray, np.ndarray]:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    logp, bad = _log_softmax(_as_2d(logits), validate)
    k = min(int(k), logp.shape[1])
    # The k largest values (ties at the k-th value: any of the tied entries has
    # the same p, so the entropy does not depend on which is taken).
    part = np.partition(logp, logp.shape[1] - k, axis=1)[:, logp.shape[1] - k :]
    return part, bad


def topk_entropy(logits, k: int = 20, *, validate: bool = False) -> np.ndarray:
    """Top-k entropy with the FULL softmax probabilities (paper definition).

    ``H^k = -sum_{v in topk(p)} p_v ln p_v`` with ``p = softmax(logits)`` over
    the whole vocabulary. A lower bound of :func:`full_entropy`; equal to it
    when ``k >= vocab``.

    Parameters
    ----------
    logits : array-like of shape (batch, vocab) or (vocab,)
    k : int, default 20
        Number of largest probabilities kept (``k >= 1``).
    validate : bool, default False
        Raise on invalid rows instead of returning NaN.

    Returns
    -------
    ndarray of float64, shape (batch,)
        Nats; NaN for invalid rows.

    Raises
    ------
    ValueError
        If ``k < 1``.

    References
    ----------
    docs/method.md "Per-step entropy" (top-k, default k = 20); arXiv 2601.09001 Sec. 3.1.
    """
    part, bad = _topk_logp(logits, k, validate)
    h = np.maximum(-_plogp(part).sum(1), 0.0)
    h[bad] = np.nan
    return h


def topk_entropy_renorm(logits, k: int = 20, *, validate: bool = False) -> np.ndarray:
    """Entropy of the top-k probabilities renormalised to sum to one.

    ``q = p_topk / sum p_topk``, ``H = -sum q ln q`` (nats, in ``[0, ln k]``).
    Not the paper's definition; offered as a labelled variant.

    Parameters, returns and errors as :func:`topk_entropy`.
    """
    part, bad = _topk_logp(logits, k, validate)
    with np.errstate(invalid="ignore"):
        m = part.max(1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        lse = m + np.log(np.exp(part - m).sum(1, keepdims=True))
        logq = part - lse
    h = np.maximum(-_plogp(logq).sum(1), 0.0)
    h[bad] = np.nan
    return h


def entropy_from_top_logprobs(
    top_logprobs: Iterable[Mapping[str, float] | Sequence[float] | Sequence[Mapping]],
    k: int | None = None,
    *,
    renormalize: bool = False,
) -> np.ndarray:
    """Top-k entropy per step from an OpenAI-style ``top_logprobs`` list (black-box input).

    Parameters
    ----------
    top_logprobs : iterable over steps
        Each step is either a mapping ``{token: logprob}``, a sequence of
        logprobs, or the OpenAI chat form ``[{"token": ..., "logprob": ...}, ...]``.
        Logprobs are natural-log probabilities under the full softmax.
    k : int, optional
        Use only the ``k`` largest per step (default: all given).
    renormalize : bool, default False
        Renormalise the kept probabilities (``topk_renorm`` variant).

    Returns
    -------
    ndarray of float64, shape (n_steps,)
        Nats. A step with no candidates gives NaN.

    Raises
    ------
    ValueError
        If a logprob is NaN or positive beyond rounding (``> 1e-6``).

    Notes
    -----
    Computed on one matrix of shape (n_steps, most candidates), rows padded with
    ``-inf`` (probability 0, contributes 0): one numpy pass for the whole response.
    """
    rows = []
    for step in top_logprobs:
        if isinstance(step, Mapping):
            rows.append(list(step.values()))
        elif len(step) and isinstance(step[0], Mapping):
            rows.append([s["logprob"] if isinstance(s, Mapping) else s for s in step])
        else:
            rows.append(step)  # numbers
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    lp = np.full((len(rows), max(int(counts.max(initial=0)), 1)), -np.inf)
    for t, r in enumerate(rows):
        lp[t, : len(r)] = r
    bad = np.isnan(lp).any(1) | (lp > 1e-6).any(1)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise ValueError(f"step {t}: logprobs must be <= 0 and not NaN, got {rows[t][:5]}")
    lp = -np.sort(-np.minimum(lp, 0.0), axis=1)  # descending; the -inf padding goes last
    if k is not None:
        lp = lp[:, : int(k)]
    if renormalize:
        h = topk_entropy_renorm(lp, k=lp.shape[1])
    else:
        h = np.maximum(-_plogp(lp).sum(1), 0.0)
    h[counts == 0] = np.nan
    return h


# ----------------------------------------------------------------------------- torch


def full_entropy_torch(logits):
    """Torch version of :func:`full_entropy` (float32 accumulation, any device).

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16

    Returns
    -------
    torch.Tensor of float32, shape (batch,)
        Nats; NaN for invalid rows (NaN, ``+inf``, or no finite logit).
    """
    import torch

    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    h = (-plogp.sum(-1)).clamp_min(0.0)
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | ~torch.isfinite(x).any(-1)
    return torch.where(bad, torch.full_like(h, float("nan")), h)


def topk_entropy_torch(logits, k: int = 20, *, renormalize: bool = False):
    """Torch version of :func:`topk_entropy` / :func:`topk_entropy_renorm`.

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, vocab)
    k : int, default 20
    renormalize : bool, default False

    Returns
    -------
    torch.Tensor of float32, shape (batch,)
    """
    import torch

    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    top = torch.topk(logp, min(int(k), x.shape[-1]), dim=-1).values
    if renormalize:
        top = top - torch.logsumexp(top, dim=-1, keepdim=True)
    p = top.exp()
    h = (-torch.where(p > 0, p * top, torch.zeros_like(p)).sum(-1)).clamp_min(0.0)
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | ~torch.isfinite(x).any(-1)
    return torch.where(bad, torch.full_like(h, float("nan")), h)
