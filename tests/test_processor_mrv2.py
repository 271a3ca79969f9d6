"""MRV2 processor with a fake context that mimics vLLM 0.32's Model Runner V2.

What is mimicked (read from vllm/v1/worker/gpu/{model_runner,states}.py and
sample/{sampler,logits_processor/interface}.py of vLLM 0.32): request slots
from a free list (``RequestState.free_indices.pop()``), no removal hook,
``prompt_len`` / ``prefill_len`` UVA-backed buffers (``.np`` and ``.gpu``),
preempted requests re-added with ``prefill_len = prompt + outputs so far``,
chunked prefill (``seq_len < prefill_len``: sample discarded), rows reordered
every step (``ctx.idx_mapping_np``), ``seq_lens_upper_bound_np`` and ``pos``.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm import SamplingParams

from sentinel_vllm.entropy import full_entropy, topk_entropy
from sentinel_vllm.features import compute_features
from sentinel_vllm.serving.worker import tracker as tracker_mod
from sentinel_vllm.serving.worker.extension import SentinelWorkerExtension
from sentinel_vllm.serving.worker.processor_mrv2 import SentinelLogitsProcessorMRV2

VOCAB, K, MAX_REQS = 40, 4, 6


@pytest.fixture(autouse=True)
def _fresh_registry():
    tracker_mod._REGISTRY.clear()
    yield
    tracker_mod._REGISTRY.clear()


class Uva:
    def __init__(self, n):
        self.np = np.zeros(n, dtype=np.int32)
        self.gpu = torch.from_numpy(self.np)  # shares memory, like a UVA view


def make(num_slots=None):
    cfg = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_REQS),
        model_config=SimpleNamespace(max_model_len=128),
        additional_config={
            "sentinel": {
                "series": ["full", f"top{K}"],
                "backend": "torch",
                **({"num_slots": num_slots} if num_slots else {}),
            }
        },
    )
    rs = SimpleNamespace(
        device=torch.device("cpu"),
        max_num_reqs=MAX_REQS,
        vocab_size=VOCAB,
        prompt_len=Uva(MAX_REQS),
        prefill_len=Uva(MAX_REQS),
    )
    return SentinelLogitsProcessorMRV2(cfg, rs), rs


class Req:
    def __init__(self, sid, params, prompt):
        self.sid, self.params, self.prompt = sid, params, prompt
        self.out: list[int] = []
        self.idx = None
        self.computed = 0


def key_of(r):
    xa = r.params.extra_args or {}
    return (xa["sentinel_id"], xa.get("sentinel_child", 0)) if "sentinel_id" in xa else None


def write(truth, key, pos, value):
    traj = truth.setdefault(key, [])
    del traj[pos:]
    traj.extend([np.nan] * (pos - len(traj)))
    traj.append(value)


def check(res, full, topk):
    assert res["n_steps"] == len(full)
    np.testing.assert_allclose(
        res["features"]["full"], compute_features(full), rtol=1e-4, atol=2e-4
    )
    np.testing.assert_allclose(
        res["features"][f"top{K}"], compute_features(topk), rtol=1e-4, atol=2e-4
    )


@pytest.mark.parametrize("seed,path", [(0, "host"), (1, "host"), (2, "device")])
def test_mrv2_random_churn(seed, path, monkeypatch):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    proc, rs = make()
    if path == "device":  # the speculative-decoding path, exercised with one row per request
        monkeypatch.setattr(
            proc, "_record_host", lambda logits, ctx, idx: proc._record_device(logits, ctx)
        )
    ext = SentinelWorkerExtension()
    free = list(range(MAX_REQS))
    running: list[Req] = []
    waiting: list[Req] = []
    tf: dict = {}
    tk: dict = {}
    finished: dict = {}
    n_ids = checked = 0

    def admit(r):
        r.idx = free.pop()
        rs.prompt_len.np[r.idx] = r.prompt
        rs.prefill_len.np[r.idx] = r.prompt + len(r.out)
        r.computed = 0
        proc.add_request(r.idx, r.params)
        running.append(r)

    for step in range(150):
        for r in list(running):
            u = rng.random()
            if u < 0.1 or len(r.out) >= 30:  # finished: the slot just returns to the free list
                running.remove(r)
                free.append(r.idx)
                if key_of(r):
                    finished[key_of(r)] = (list(tf.get(key_of(r), [])), list(tk.get(key_of(r), [])))
            elif u < 0.15:  # preempted
                running.remove(r)
                free.append(r.idx)
                waiting.append(r)
        while waiting and free and rng.random() < 0.5:
            admit(waiting.pop(0))
        while free and rng.random() < 0.5:
            n_ids += 1
            u = rng.random()
            if u < 0.25:
                admit(Req(None, SamplingParams(), rng.randint(2, 8)))
            elif u < 0.4 and len(free) >= 2:
                for c in range(2):
                    xa = {"sentinel_id": f"s{n_ids}", "sentinel_child": c, "sentinel_n": 2}
                    admit(Req(f"s{n_ids}", SamplingParams(extra_args=xa), 5))
            else:
                admit(
                    Req(
                        f"s{n_ids}",
                        SamplingParams(extra_args={"sentinel_id": f"s{n_ids}"}),
                        rng.randint(2, 8),
                    )
                )
        if not running:
            continue
        rng.shuffle(running)  # MRV2 reorders rows every step
        idx = np.array([r.idx for r in running])
        seq = []
        for r in running:
            prefill = int(rs.prefill_len.np[r.idx])
            if r.computed < prefill:  # (chunked) prefill
                seq.append(r.computed + rng.randint(1, prefill - r.computed))
            else:
                seq.append(r.prompt + len(r.out))
        seq = np.array(seq)
        ctx = SimpleNamespace(
            idx_mapping_np=idx,
            seq_lens_upper_bound_np=seq.astype(np.int32),
            expanded_idx_mapping=torch.from_numpy(idx.astype(np.int32)),
            idx_mapping=torch.from_numpy(idx.astype(np.int32)),
            pos=torch.from_numpy(seq - 1),
        )
        logits = torch.randn(len(running), VOCAB, generator=gen) * rng.choice([0.5, 3.0])
        before = logits.clone()
        assert proc.apply(logits, ctx) is logits and torch.equal(logits, before)
        full, topk = full_entropy(before.numpy()), topk_entropy(before.numpy(), K)
        for i, r in enumerate(running):
            r.computed = int(seq[i])
            if seq[i] < rs.prefill_len.np[r.idx]:
                continue  # partial prefill: vLLM discards the sample
            if key_of(r):
                write(tf, key_of(r), len(r.out), full[i])
                write(tk, key_of(r), len(r.out), topk[i])
            r.out.append(1)
        live = {key_of(r) for r in running + waiting} - {None}
        done = sorted({k[0] for k in finished} - {k[0] for k in live})
        if done and rng.random() < 0.5:
            got = ext.sentinel_fetch(done)
            for sid in done:
                for res in got.get(sid, []):
                    k = (sid, res["child"])
                    check(res, *finished.pop(k))
                    checked += 1
    assert checked > 10
    for k in [k for k in finished]:
        res = [r for r in ext.sentinel_fetch([k[0]]).get(k[0], []) if r["child"] == k[1]]
        assert len(res) <= 1
    stats = ext.sentinel_stats()
    assert stats["untracked_pool_full"] == 0


def test_recycled_slot_parks_and_preemption_resumes():
    proc, rs = make()
    ext = SentinelWorkerExtension()
    p = SamplingParams(extra_args={"sentinel_id": "a"})
    rs.prompt_len.np[3], rs.prefill_len.np[3] = 4, 4
    assert proc.add_request(3, p) is True
    assert proc.add_request(2, SamplingParams()) is False  # untracked: apply not needed for it
    x = torch.randn(2, VOCAB)
    ctx = SimpleNamespace(idx_mapping_np=np.array([2, 3]), seq_lens_upper_bound_np=np.array([5, 4]))
    proc.apply(x, ctx)  # "a" samples its output 0 from row 1
    # preempted (slot 3 freed), slot 3 recycled by another request -> "a" is parked
    rs.prompt_len.np[3], rs.prefill_len.np[3] = 2, 2
    proc.add_request(3, SamplingParams())
    assert proc.tracker.stats()["parked"] == 1
    # "a" resumes in slot 0 with its 1 output recomputed: chunk 1 (partial), then the final chunk
    rs.prompt_len.np[0], rs.prefill_len.np[0] = 4, 5
    assert proc.add_request(0, p) is True
    y, z = torch.randn(1, VOCAB), torch.randn(1, VOCAB)
    proc.apply(
        y, SimpleNamespace(idx_mapping_np=np.array([0]), seq_lens_upper_bound_np=np.array([3]))
    )
    proc.apply(
        z, SimpleNamespace(idx_mapping_np=np.array([0]), seq_lens_upper_bound_np=np.array([5]))
    )
    traj = ext.sentinel_trajectories(["a"])["a"][0]
    want = [full_entropy(x.numpy())[1], full_entropy(z.numpy())[0]]
    np.testing.assert_allclose(traj["series"]["full"], want, atol=1e-5)


def test_resumed_unknown_request_is_not_tracked():
    proc, rs = make()
    rs.prompt_len.np[1], rs.prefill_len.np[1] = 3, 7  # 4 outputs we never saw
    assert proc.add_request(1, SamplingParams(extra_args={"sentinel_id": "b"})) is False
    assert proc.tracker.stats()["untracked_lost"] == 1


def test_mrv2_failure_disables_and_marks_the_tracker(monkeypatch):
    proc, rs = make()
    rs.prompt_len.np[0], rs.prefill_len.np[0] = 3, 3
    assert proc.add_request(0, SamplingParams(extra_args={"sentinel_id": "a"})) is True

    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(proc.tracker.state, "record", boom)
    ctx = SimpleNamespace(idx_mapping_np=np.array([0]), seq_lens_upper_bound_np=np.array([4]))
    logits = torch.randn(1, VOCAB)
    assert proc.apply(logits, ctx) is logits
    assert proc.failed == "RuntimeError: device lost"
    assert (proc._slot_np == -1).all() and proc._by_req == {}
    assert SentinelWorkerExtension().sentinel_stats()["failed"] == 1
    assert proc.add_request(1, SamplingParams(extra_args={"sentinel_id": "b"})) is False
