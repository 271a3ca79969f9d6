"""Entropy kernels and per-slot device state (import as ``sentinel_vllm.kernels``).

* :func:`entropy_step` -- full-vocabulary, top-k (paper) and renormalised top-k
  entropy of each logits row, one fused pass: the Triton kernel
  (:mod:`.entropy_triton`) on CUDA, the torch path (:mod:`.entropy_torch`) otherwise.
* :class:`SlotState` -- dense per-slot trajectory buffer on the device
  (exact quantiles; 1,024 slots x 32k steps x 2 series = 256 MiB, see
  :meth:`SlotState.memory_bytes`), updated without host synchronisation, and
  gathered with one device-to-host copy into the 11 features of
  :mod:`sentinel_vllm.features` (computed by the training code itself).

Definitions: :mod:`sentinel_vllm.entropy`; method: arXiv 2601.09001 Sec. 3.
Nothing is compiled or imported from triton at import time; :func:`warmup`
compiles the step path ahead of the first decode step.
"""

from .slot_state import GatherResult, SlotState, parse_series
from .step import KMAX_LIMIT, entropy_step, triton_available, warmup

__all__ = ["entropy_step", "SlotState", "GatherResult", "parse_series", "KMAX_LIMIT",
           "triton_available", "warmup"]
