"""The processor of vLLM's ``vllm.logits_processors`` entry point (plain ``vllm serve``).

vLLM builds every class of that entry-point group in every engine, whatever
``VLLM_PLUGINS`` says, with both model runners: the V1 runner
(``vllm/v1/sample/logits_processor/__init__.py``: ``_load_logitsprocs_plugins``,
built as ``cls(vllm_config, device, is_pin_memory)``) and Model Runner V2
(``vllm/v1/worker/gpu/sample/logits_processor/loader.py``:
``_load_v2_logitsprocs_plugins``, which requires a subclass of the MRV2 interface,
built as ``cls(vllm_config, req_states)``). So :class:`SentinelPluginProcessor`
subclasses both interfaces, like
:class:`~sentinel_vllm.serving.worker.processor_any.SentinelLogitsProcessorAny`,
and its ``__new__`` decides per engine, from that engine's own ``VllmConfig``:

* no ``"sentinel"`` key in ``additional_config`` (or the sentinel already given as
  ``--logits-processors``): an inert processor. On V1 it is argmax-invariant, so
  greedy batches never call it, and ``update_state`` returns at once; on MRV2
  ``add_request`` answers False, so vLLM skips the logits stage for it. Nothing
  is recorded, no tracker, no kernel, no worker method;
* the key present: the runner's sentinel processor (as ``--logits-processors``
  would build it), after :func:`install_worker_extension` added the
  ``sentinel_*`` RPC methods to this process's worker class.

``validate_params`` is the interfaces' no-op: the frontend loads this class for
every request, with or without the sentinel, and a malformed ``sentinel_*`` key
is already harmless (:func:`~sentinel_vllm.serving.worker.identity.request_key`
ignores it; the API side overwrites client keys).
"""

from __future__ import annotations

import importlib
import logging

from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Interface
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _MRV2Interface

from sentinel_vllm.serving.contract import (
    MRV2_PROCESSOR,
    PROCESSOR,
    V1_PROCESSOR,
    WORKER_EXTENSION,
    sentinel_settings,
)

__all__ = ["SentinelPluginProcessor", "enabled", "install_worker_extension"]

log = logging.getLogger(__name__)
_OURS = (PROCESSOR, V1_PROCESSOR, MRV2_PROCESSOR)


def enabled(vllm_config) -> bool:
    """True when this engine asks for the sentinel through the plugin.

    That is: ``additional_config`` has the ``"sentinel"`` key and no sentinel
    processor is among ``--logits-processors`` (``sentinel_vllm.LLM``,
    ``collect``: that one does the work, a second would record twice).

    Raises
    ------
    ValueError
        A malformed ``"sentinel"`` entry (the engine does not start).
    """
    if sentinel_settings(getattr(vllm_config, "additional_config", None)) is None:
        return False
    given = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None) or ()
    names = {p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in given}
    return not names & set(_OURS)


def install_worker_extension(vllm_config) -> bool:
    """Add the sentinel's RPC methods to this process's worker class.

    What vLLM itself does for ``--worker-extension-cls`` in
    ``WorkerWrapperBase.init_worker`` (vLLM 0.32 and 0.33): resolve
    ``parallel_config.worker_cls`` (always a qualified name there: vLLM refuses
    anything else) and append the extension to its ``__bases__``, refusing
    attributes the worker already has. Idempotent; a user's own
    ``--worker-extension-cls`` stays.

    Returns
    -------
    bool
        False when the worker class is not known yet (``worker_cls`` still
        ``"auto"``); the processor then records but the API side gets no answer.

    Raises
    ------
    RuntimeError
        The worker class already has an attribute of the extension.
    """
    qualname = getattr(vllm_config.parallel_config, "worker_cls", None)
    if not isinstance(qualname, str) or "." not in qualname:
        log.warning("sentinel: worker class unknown (%r); no sentinel_* RPC methods", qualname)
        return False
    worker = _resolve(qualname)
    ext = _resolve(WORKER_EXTENSION)
    if issubclass(worker, ext):
        return True
    clash = [a for a in dir(ext) if not a.startswith("__") and hasattr(worker, a)]
    if clash:
        raise RuntimeError(f"worker class {qualname} already has {clash}: cannot add "
                           f"{WORKER_EXTENSION}")
    worker.__bases__ = worker.__bases__ + (ext,)
    return True


def _resolve(qualname: str):
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _InertV1(_V1Interface):
    """V1 runner, sentinel off: never applied to greedy batches, no state."""

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        return None

    def apply(self, logits):
        return logits


class _InertMRV2(_MRV2Interface):
    """Model Runner V2, sentinel off: declines every request, so vLLM never applies it."""

    def add_request(self, req_idx, sampling_params) -> bool:
        return False

    def apply(self, logits, ctx):
        return logits


class SentinelPluginProcessor(_V1Interface, _MRV2Interface):
    """Entry-point processor: the sentinel where ``additional_config`` asks for it, else inert.

    ``SentinelPluginProcessor(vllm_config, device, is_pin_memory)`` (V1) and
    ``SentinelPluginProcessor(vllm_config, req_states)`` (MRV2) return an
    instance of the runner's sentinel processor or of an inert one; no
    instance of this class itself ever exists.
    """

    def __new__(cls, vllm_config, *args, **kwargs):
        from sentinel_vllm.serving.worker.processor_any import (
            SentinelLogitsProcessorAny,
            runner_of_call,
        )

        runner = runner_of_call(args, kwargs)
        if not enabled(vllm_config):
            return (_InertMRV2 if runner == "mrv2" else _InertV1)(vllm_config, *args, **kwargs)
        install_worker_extension(vllm_config)
        proc = SentinelLogitsProcessorAny(vllm_config, *args, **kwargs)
        log.info("sentinel: recording entropy in this engine (%s runner, series %s)", runner,
                 ",".join(proc.tracker.series) if getattr(proc, "tracker", None) else "-")
        return proc

    # Both interfaces' abstract methods, so the class is concrete; never called.
    def apply(self, logits, *args):  # pragma: no cover
        raise TypeError("SentinelPluginProcessor is never instantiated")

    def is_argmax_invariant(self) -> bool:  # pragma: no cover
        raise TypeError("SentinelPluginProcessor is never instantiated")

    def update_state(self, batch_update) -> None:  # pragma: no cover
        raise TypeError("SentinelPluginProcessor is never instantiated")
