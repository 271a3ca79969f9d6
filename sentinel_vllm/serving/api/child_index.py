"""Frontend-process patch giving each child of an ``n > 1`` request its choice index.

vLLM 0.32 makes the ``n`` child requests in the frontend process
(``vllm/v1/engine/parallel_sampling.py``: ``ParentRequest.get_child_info`` ->
request id ``"{index}_{parent_id}"`` and a *shallow copy* of the parent's
``SamplingParams``, shared between children when no seed is set), so the worker
cannot see which choice a sample is. :func:`install_child_index_patch` wraps
``ParentRequest._get_child_sampling_params`` so that each child of a tracked
request carries ``extra_args["sentinel_child"] = index`` (see
:mod:`sentinel_vllm.serving.contract`). ``sentinel-vllm serve``, the middleware,
the offline ``LLM`` and the collector install it in their own process.
"""

from __future__ import annotations

from sentinel_vllm.serving.contract import XARG_CHILD as SENTINEL_CHILD
from sentinel_vllm.serving.contract import XARG_ID as SENTINEL_ID
from sentinel_vllm.serving.contract import XARG_N as SENTINEL_N

__all__ = ["install_child_index_patch"]

_PATCHED = False


def install_child_index_patch() -> bool:
    """Give each child of a tracked ``n > 1`` request its choice index.

    Wraps ``vllm.v1.engine.parallel_sampling.ParentRequest._get_child_sampling_params``
    (vLLM 0.32) in the calling process: for parents whose ``extra_args`` carry
    ``sentinel_id``, the child's params are copied with their own ``extra_args``
    dict holding ``sentinel_child = index``. Untracked requests are untouched.
    Idempotent.

    Returns
    -------
    bool
        True if the patch is (now) installed, False if vLLM lacks the hook.
    """
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from vllm.v1.engine.parallel_sampling import ParentRequest
    except ImportError:
        return False
    orig = getattr(ParentRequest, "_get_child_sampling_params", None)
    if orig is None:
        return False

    def _get_child_sampling_params(self, index: int):
        params = orig(self, index)
        xa = getattr(self.sampling_params, "extra_args", None)
        if not xa or SENTINEL_ID not in xa:
            return params
        from copy import copy

        child = copy(params)
        child.extra_args = {
            **xa,
            SENTINEL_CHILD: int(index),
            SENTINEL_N: int(self.sampling_params.n),
        }
        return child

    _get_child_sampling_params.__wrapped__ = orig  # type: ignore[attr-defined]
    ParentRequest._get_child_sampling_params = _get_child_sampling_params
    _PATCHED = True
    return True
