"""One processor class path that both vLLM model runners accept.

vLLM decides which model runner an engine uses inside the engine, from its real
``VllmConfig`` (``VllmConfig.use_v2_model_runner``: ``VLLM_USE_V2_MODEL_RUNNER``
when set, else Model Runner V2 when Triton is present and no feature in use
needs V1; HiSparse and watermarking force V2). Any choice made before the engine
exists (from the environment, in the launcher) can be wrong. So the launcher
never chooses: it hands vLLM :class:`SentinelLogitsProcessorAny`, and the runner
that loads it decides.

How each runner loads a custom processor (vLLM 0.32 and 0.33, read from the sources):

* V1 runner, ``vllm/v1/sample/logits_processor/__init__.py``
  (``_load_logitsprocs_by_fqcns``, ``build_logitsprocs``): the class must be a
  subclass of ``vllm.v1.sample.logits_processor.LogitsProcessor``; it is built as
  ``cls(vllm_config, device, is_pin_memory)``;
* Model Runner V2, ``vllm/v1/worker/gpu/sample/logits_processor/loader.py``
  (``_load_v2_logitsprocs_by_fqcns``, ``build_custom_logits_processors``): the
  class must be a subclass of ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``;
  it is built as ``cls(vllm_config, req_states)``;
* the frontend (``InputProcessor._build_logits_processors_params_validator``)
  loads the same class path with the loader of the runner in use and calls
  ``cls.validate_params(sampling_params)`` on each request.

:class:`SentinelLogitsProcessorAny` subclasses both interfaces, so both loaders
accept it, and its ``__new__`` returns the implementation for the constructor
call it receives: :class:`~sentinel_vllm.serving.worker.processor_v1.SentinelLogitsProcessor`
for ``(vllm_config, device, is_pin_memory)``,
:class:`~sentinel_vllm.serving.worker.processor_mrv2.SentinelLogitsProcessorMRV2`
for ``(vllm_config, req_states)``. No instance of this class itself ever exists.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Interface
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _MRV2Interface

from sentinel_vllm.serving.worker import identity

__all__ = ["SentinelLogitsProcessorAny", "runner_of_call"]


def runner_of_call(args: tuple, kwargs: dict) -> str:
    """``"v1"`` or ``"mrv2"``: which runner builds a processor with these arguments.

    Parameters
    ----------
    args, kwargs
        The constructor arguments after ``vllm_config``.

    Raises
    ------
    TypeError
        Arguments of neither runner's constructor.
    """
    if "req_states" in kwargs or (len(args) == 1 and hasattr(args[0], "max_num_reqs")):
        return "mrv2"
    if "device" in kwargs or len(args) == 2:
        return "v1"
    raise TypeError("SentinelLogitsProcessorAny(vllm_config, device, is_pin_memory) (V1 runner) "
                    "or (vllm_config, req_states) (Model Runner V2); got "
                    f"{len(args)} positional and {sorted(kwargs)} keyword arguments")


class SentinelLogitsProcessorAny(_V1Interface, _MRV2Interface):
    """The sentinel processor for whichever model runner builds it (see the module notes).

    ``SentinelLogitsProcessorAny(vllm_config, device, is_pin_memory)`` returns a
    :class:`~sentinel_vllm.serving.worker.processor_v1.SentinelLogitsProcessor`;
    ``SentinelLogitsProcessorAny(vllm_config, req_states)`` a
    :class:`~sentinel_vllm.serving.worker.processor_mrv2.SentinelLogitsProcessorMRV2`.
    """

    def __new__(cls, vllm_config, *args, **kwargs):
        if runner_of_call(args, kwargs) == "mrv2":
            from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2

            return SentinelLogitsProcessorMRV2(vllm_config, *args, **kwargs)
        from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

        return SentinelLogitsProcessor(vllm_config, *args, **kwargs)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Reject malformed ``sentinel_*`` keys (both runners' frontends call this)."""
        identity.validate_params(sampling_params)

    # Both interfaces' abstract methods, so the class is concrete; never called,
    # because ``__new__`` returns an instance of a runner's own class.
    def apply(self, logits, *args):  # pragma: no cover
        raise TypeError("SentinelLogitsProcessorAny is never instantiated")

    def is_argmax_invariant(self) -> bool:  # pragma: no cover
        raise TypeError("SentinelLogitsProcessorAny is never instantiated")

    def update_state(self, batch_update) -> None:  # pragma: no cover
        raise TypeError("SentinelLogitsProcessorAny is never instantiated")
