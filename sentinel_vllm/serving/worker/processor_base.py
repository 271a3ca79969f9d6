"""What the two runner adapters share: tracker, admission check, failure handling, device copies.

:class:`SentinelProcessorBase` is mixed in before vLLM's ``LogitsProcessor``
interface of each runner (:mod:`.processor_v1`, :mod:`.processor_mrv2`). It
imports no vLLM module, so the shared part is tested without an engine.

A processor never takes serving down: the first exception in a hook disables it
(:attr:`failed` holds the message), forgets its rows, logs once and marks the
tracker (``sentinel_stats()["failed"]``); the logits are returned unchanged either
way. See docs/serving.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sentinel_vllm.serving.worker import identity
from sentinel_vllm.serving.worker.tracker_setup import make_tracker

__all__ = ["SentinelProcessorBase"]

logger = logging.getLogger(__name__)


class SentinelProcessorBase:
    """Shared state and helpers of the sentinel logits processors.

    Attributes
    ----------
    device : torch.device
    pin : bool
        Pinned, non-blocking host->device copies (CUDA only).
    tracker : SlotTracker or None
        None on the ranks that do no sentinel work (every hook is then a no-op).
    failed : str or None
        The error that disabled this processor, if any.
    """

    def _init_sentinel(self, vllm_config: Any, device: Any, pin: bool, **tracker_overrides) -> None:
        self.device = torch.device(device)
        self.pin = bool(pin) and self.device.type == "cuda"
        self.tracker = make_tracker(vllm_config, self.device, **tracker_overrides)
        self.failed: str | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Reject malformed ``sentinel_*`` keys (see :mod:`~sentinel_vllm.serving.worker.identity`)."""
        identity.validate_params(sampling_params)

    def _safely(self, hook: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """``hook(*args)``, or ``default`` when disabled; an exception disables the processor."""
        if self.tracker is None or self.failed:
            return default
        try:
            return hook(*args)
        except Exception as e:  # noqa: BLE001 (never take serving down)
            self._fail(e)
            return default

    def _fail(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        self._forget_rows()
        logger.exception("sentinel %s disabled after an error: %s", type(self).__name__, self.failed)
        if self.tracker is not None:
            self.tracker.mark_failed()

    def _forget_rows(self) -> None:  # pragma: no cover - each adapter overrides it
        raise NotImplementedError

    def _to_device(self, values) -> torch.Tensor:
        """int64 tensor of ``values`` on :attr:`device` (one copy; pinned and non-blocking on CUDA)."""
        t = torch.as_tensor(np.ascontiguousarray(values, dtype=np.int64))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True) if self.pin else t.to(self.device)
