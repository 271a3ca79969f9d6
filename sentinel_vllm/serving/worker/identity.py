"""Request identity for the sentinel: which requests are tracked, and as what.

The API server (or the offline helper) puts these keys in
``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP; the server assigns and
overwrites them, clients never choose them):

``sentinel_id`` : str
    Unique per request. Requests without it are not tracked.
``sentinel`` : bool, optional
    ``False`` opts the request out.
``sentinel_child`` : int, optional
    The choice index of one sample of an ``n > 1`` request. vLLM 0.32 makes
    the ``n`` child requests in the frontend process
    (``vllm/v1/engine/parallel_sampling.py``: ``ParentRequest.get_child_info``
    -> request id ``"{index}_{parent_id}"`` and a *shallow copy* of the
    parent's ``SamplingParams``, shared between children when no seed is set),
    so the index is not visible in the worker. :func:`sentinel_vllm.serving.api.child_index.install_child_index_patch`
    wraps ``ParentRequest._get_child_sampling_params`` so that each child of a
    tracked request gets its own params with ``sentinel_child = index``. The
    launcher and the offline helper install it in the frontend process.
``sentinel_n`` : int, optional
    The parent's ``n`` (the server sets it). When it is 1 or absent the child
    index is 0.

Without the patch and with ``n > 1`` the worker infers the child index
(params identity, then order of first appearance): the samples are still
tracked separately but the ``child`` numbers may not match vLLM's choice
indices.
"""

from __future__ import annotations

from typing import Any

from sentinel_vllm.serving.contract import XARG_CHILD as SENTINEL_CHILD
from sentinel_vllm.serving.contract import XARG_ID as SENTINEL_ID
from sentinel_vllm.serving.contract import XARG_N as SENTINEL_N
from sentinel_vllm.serving.contract import XARG_OPT as SENTINEL_OPT

__all__ = ["request_key", "validate_params"]


def request_key(params: Any) -> tuple[str, int | None] | None:
    """``(sentinel_id, child)`` of a request, or None if it is not tracked.

    Parameters
    ----------
    params : vllm.SamplingParams or None

    Returns
    -------
    tuple or None
        ``child`` is None when it must be inferred (``n > 1`` without the patch).
    """
    xa = getattr(params, "extra_args", None)
    if not xa:
        return None
    sid = xa.get(SENTINEL_ID)
    if not isinstance(sid, str) or not sid or xa.get(SENTINEL_OPT) is False:
        return None
    child = xa.get(SENTINEL_CHILD)
    if isinstance(child, int) and not isinstance(child, bool) and child >= 0:
        return sid, child
    n = xa.get(SENTINEL_N, 1)
    return sid, (0 if not isinstance(n, int) or n <= 1 else None)


def validate_params(params: Any) -> None:
    """Reject malformed sentinel keys at admission.

    Raises
    ------
    ValueError
        If ``sentinel_id`` is present but not a non-empty string, or
        ``sentinel_child`` is not a non-negative int.
    """
    xa = getattr(params, "extra_args", None) or {}
    if SENTINEL_ID in xa and (not isinstance(xa[SENTINEL_ID], str) or not xa[SENTINEL_ID]):
        raise ValueError("extra_args['sentinel_id'] must be a non-empty string")
    c = xa.get(SENTINEL_CHILD)
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 0):
        raise ValueError("extra_args['sentinel_child'] must be a non-negative int")
