"""Worker extension: rank logic (tensor parallelism) with fakes, answer merging."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sentinel_vllm.serving.worker import tracker as tracker_mod
from sentinel_vllm.serving.worker import tracker_setup
from sentinel_vllm.serving.contract import first_answer
from sentinel_vllm.serving.worker.extension import SentinelWorkerExtension


@pytest.fixture(autouse=True)
def _fresh_registry():
    tracker_mod._REGISTRY.clear()
    yield
    tracker_mod._REGISTRY.clear()


def fake_groups(monkeypatch, tp_rank, last_pp):
    ps = pytest.importorskip("vllm.distributed.parallel_state")
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_tp_group", lambda: SimpleNamespace(rank_in_group=tp_rank))
    monkeypatch.setattr(ps, "get_pp_group", lambda: SimpleNamespace(is_last_rank=last_pp))


@pytest.mark.vllm
@pytest.mark.parametrize(
    "tp_rank,last_pp,want", [(0, True, True), (1, True, False), (0, False, False)]
)
def test_only_tp0_of_last_stage_does_the_work(monkeypatch, tp_rank, last_pp, want):
    fake_groups(monkeypatch, tp_rank, last_pp)
    assert tracker_setup.is_sentinel_rank() is want
    cfg = SimpleNamespace(
        additional_config={"sentinel": {"backend": "torch", "num_slots": 4, "max_steps": 8}}
    )
    t = tracker_setup.make_tracker(cfg, "cpu")
    assert (t is not None) is want
    stats = SentinelWorkerExtension().sentinel_stats()
    assert stats["rank_active"] is want and stats["num_slots"] == (4 if want else 0)


def test_stats_fetch_on_a_rank_without_tracker():
    ext = SentinelWorkerExtension()
    assert ext.sentinel_fetch(["a"]) == {} and ext.sentinel_discard(["a"]) == 0
    assert ext.sentinel_stats()["rank_active"] is False
    with pytest.raises(TypeError):
        ext.sentinel_fetch("abc")


def test_first_answer_takes_rank0():
    rank0 = {"a": [{"child": 0}]}
    assert first_answer([rank0, {}, {}]) is rank0
    assert first_answer([{}, {}]) == {}
    assert first_answer([]) == {}


def test_tracker_config_precedence(monkeypatch):
    monkeypatch.setenv("SENTINEL_SERIES", "full,top5_renorm")
    monkeypatch.setenv("SENTINEL_MAX_STEPS", "99")
    cfg = SimpleNamespace(
        additional_config={"sentinel": {"max_steps": 7}},
        model_config=SimpleNamespace(max_model_len=2048),
        scheduler_config=SimpleNamespace(max_num_seqs=10),
    )
    got = tracker_setup.tracker_config(cfg)
    assert got["series"] == ("full", "top5_renorm")  # env
    assert got["max_steps"] == 7  # additional_config wins over env
    assert got["num_slots"] == 20 and got["park_timeout_s"] == 600.0


def test_offline_engines_keep_parked_trajectories_for_the_whole_batch():
    # collect and sentinel_vllm.LLM fetch after generate() returns: a CPU batch slower than
    # serving's 600 s park timeout lost its early finishers ("no sentinel trajectory for
    # mmlu_stem/1908"); offline engines park for OFFLINE_PARK_TIMEOUT_S (LRU still bounds slots)
    from sentinel_vllm.serving.contract import (
        OFFLINE_PARK_TIMEOUT_S,
        offline_additional_config,
        vllm_launch_kwargs,
    )

    kw = vllm_launch_kwargs(series=["full"], environ={},
                            additional_config=offline_additional_config('{"x": 1}'))
    assert kw["additional_config"] == {
        "x": 1, "sentinel": {"park_timeout_s": OFFLINE_PARK_TIMEOUT_S, "series": "full"}}
    cfg = SimpleNamespace(additional_config=kw["additional_config"],
                          model_config=SimpleNamespace(max_model_len=2048),
                          scheduler_config=SimpleNamespace(max_num_seqs=10))
    assert tracker_setup.tracker_config(cfg)["park_timeout_s"] == 30 * 86400.0
    # the user's own timeout stands; bad input is left for vllm_launch_kwargs to name
    assert offline_additional_config({"sentinel": {"park_timeout_s": 5}}) == {
        "sentinel": {"park_timeout_s": 5}}
    assert offline_additional_config(None) == {"sentinel": {"park_timeout_s": 30 * 86400.0}}
    assert offline_additional_config("not json") == "not json"
