"""V1-runner processor under random batch churn, checked against a python model of the truth.

The persistent batch is simulated with vLLM's own ``BatchUpdateBuilder`` and
the add/remove/condense/swap algorithm of ``vllm/v1/worker/gpu_input_batch.py``
(0.32), so rows are overwritten by adds and condense moves without ``removed``
entries exactly as in vLLM. Like vLLM's ``tests/v1/logits_processors/test_correctness.py``:
a default-ish config, fake logits, no model.
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
from vllm.v1.sample.logits_processor import MoveDirectionality
from vllm.v1.sample.logits_processor.state import BatchUpdateBuilder

from sentinel_vllm.entropy import full_entropy, topk_entropy
from sentinel_vllm.features import compute_features
from sentinel_vllm.serving.worker import tracker as tracker_mod
from sentinel_vllm.serving.worker import tracker_setup
from sentinel_vllm.serving.worker.extension import SentinelWorkerExtension
from sentinel_vllm.serving.worker.processor_v1 import SentinelLogitsProcessor

VOCAB = 50
K = 5


@pytest.fixture(autouse=True)
def _fresh_registry():
    tracker_mod._REGISTRY.clear()
    yield
    tracker_mod._REGISTRY.clear()


def make_config(max_num_seqs=8, max_model_len=64, **sentinel):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(max_model_len=max_model_len),
        additional_config={
            "sentinel": {"series": ["full", f"top{K}"], "backend": "torch", **sentinel}
        },
    )


class Req:
    def __init__(self, rid, params, prompt_len):
        self.rid, self.params, self.prompt_len = rid, params, prompt_len
        self.out: list[int] = []  # live output list, as CachedRequestState.output_token_ids
        self.prefill_left = 0  # partial-prefill steps before the next real sample


class FakeInputBatch:
    """The row bookkeeping of vLLM's InputBatch (add / remove / condense / swap)."""

    def __init__(self, max_num_reqs):
        self.max = max_num_reqs
        self.rows: list[Req | None] = []
        self.builder = BatchUpdateBuilder()

    @property
    def num_reqs(self):
        return sum(r is not None for r in self.rows)

    def index(self, req):
        return next(i for i, r in enumerate(self.rows) if r is req)

    def add(self, req):
        idx = self.builder.pop_removed()
        if idx is None:
            idx = self.num_reqs
        assert idx < self.max
        self.builder.added.append((idx, req.params, [0] * req.prompt_len, req.out))
        if idx == len(self.rows):
            self.rows.append(req)
        else:
            self.rows[idx] = req

    def remove(self, req):
        idx = self.index(req)
        self.builder.removed_append(idx)
        self.rows[idx] = None

    def condense(self):
        num_reqs = self.num_reqs
        empty = self.builder.removed
        if not empty:
            return
        if num_reqs == 0:
            self.rows.clear()
            return
        last = num_reqs + len(empty) - 1
        while empty:
            while last in empty:
                last -= 1
            e = self.builder.peek_removed()
            if e >= last:
                break
            self.builder.pop_removed()
            self.rows[e], self.rows[last] = self.rows[last], None
            self.builder.moved.append((last, e, MoveDirectionality.UNIDIRECTIONAL))
            last -= 1
        del self.rows[num_reqs:]

    def swap(self, i, j):
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self.builder.moved.append((i, j, MoveDirectionality.SWAP))

    def refresh(self, proc):
        proc.update_state(self.builder.get_and_reset(self.num_reqs))


def write(truth, key, pos, value):
    """The positioned-write contract: the value lands at ``pos`` and the trajectory ends there."""
    traj = truth.setdefault(key, [])
    del traj[pos:]
    traj.extend([np.nan] * (pos - len(traj)))
    traj.append(value)


def check(result, truth, key, atol=2e-4):
    full = np.asarray(truth[key][0])
    topk = np.asarray(truth[key][1])
    assert result["n_steps"] == len(full), (key, result["n_steps"], len(full))
    np.testing.assert_allclose(
        result["features"]["full"], compute_features(full), rtol=1e-4, atol=atol
    )
    np.testing.assert_allclose(
        result["features"][f"top{K}"], compute_features(topk), rtol=1e-4, atol=atol
    )


def run_churn(seed, n_steps=160, max_num_seqs=8, num_slots=None, check_all=True):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = make_config(max_num_seqs, **({"num_slots": num_slots} if num_slots else {}))
    proc = SentinelLogitsProcessor(cfg, torch.device("cpu"), False)
    ext = SentinelWorkerExtension()
    batch = FakeInputBatch(max_num_seqs)
    waiting: list[Req] = []  # preempted, to resume
    truth_full: dict = {}
    truth_topk: dict = {}
    finished: dict = {}  # key -> (full, topk) snapshot, awaiting fetch
    fetched = 0
    n_ids = 0

    def new_request():
        nonlocal n_ids
        n_ids += 1
        kind = rng.random()
        if kind < 0.2:  # untracked
            return [Req(f"u{n_ids}", SamplingParams(max_tokens=50), rng.randint(1, 9))]
        if kind < 0.3:  # opted out
            xa = {"sentinel_id": f"s{n_ids}", "sentinel": False}
            return [Req(f"o{n_ids}", SamplingParams(extra_args=xa), 3)]
        sid = f"s{n_ids}"
        if kind < 0.45:  # n = 2, children indexed by the frontend patch
            return [
                Req(
                    f"{c}_{sid}",
                    SamplingParams(
                        extra_args={"sentinel_id": sid, "sentinel_child": c, "sentinel_n": 2}
                    ),
                    4,
                )
                for c in range(2)
            ]
        return [Req(sid, SamplingParams(extra_args={"sentinel_id": sid}), rng.randint(1, 9))]

    def key_of(req):
        xa = req.params.extra_args or {}
        if "sentinel_id" not in xa or xa.get("sentinel") is False:
            return None
        return (xa["sentinel_id"], xa.get("sentinel_child", 0))

    for step in range(n_steps):
        # --- scheduler: finish / abort / preempt / resume / add, then condense and reorder
        running = [r for r in batch.rows if r is not None]
        for req in running:
            u = rng.random()
            if u < 0.08 or len(req.out) >= 40:  # finished (or aborted: the server discards)
                batch.remove(req)
                k = key_of(req)
                siblings_live = any(
                    key_of(r) is not None and key_of(r)[0] == (k or ("",))[0] and r is not req
                    for r in [*batch.rows, *waiting]
                    if r is not None
                )
                if k is not None and u < 0.02 and not siblings_live:  # abort: whole request
                    ext.sentinel_discard([k[0]])
                    for kk in [kk for kk in [*finished, k] if kk[0] == k[0]]:
                        finished.pop(kk, None), truth_full.pop(kk, None), truth_topk.pop(kk, None)
                elif k is not None:
                    finished[k] = (list(truth_full.get(k, [])), list(truth_topk.get(k, [])))
            elif u < 0.12:  # preempted: leaves the batch, comes back later with a recompute prefill
                batch.remove(req)
                req.prefill_left = rng.randint(0, 2)
                waiting.append(req)
        while waiting and batch.num_reqs < max_num_seqs and rng.random() < 0.5:
            batch.add(waiting.pop(0))
        while batch.num_reqs < max_num_seqs and rng.random() < 0.4:
            for req in new_request():
                if batch.num_reqs < max_num_seqs:
                    req.prefill_left = rng.randint(0, 2)  # chunked prefill
                    batch.add(req)
        batch.condense()
        if batch.num_reqs >= 2 and rng.random() < 0.3:
            i, j = rng.sample(range(batch.num_reqs), 2)
            batch.swap(i, j)
        batch.refresh(proc)
        # --- forward + sampler
        if batch.num_reqs == 0:
            continue
        logits = torch.randn(batch.num_reqs, VOCAB, generator=gen) * rng.choice([0.5, 2.0, 6.0])
        logits[:, rng.randrange(VOCAB)] = float("-inf")
        before = logits.clone()
        out = proc.apply(logits)
        assert out is logits and torch.equal(out, before)  # never changes the logits
        full = full_entropy(before.numpy())
        topk = topk_entropy(before.numpy(), K)
        for row, req in enumerate(batch.rows):
            k = key_of(req)
            if k is not None:
                write(truth_full, k, len(req.out), full[row])
                write(truth_topk, k, len(req.out), topk[row])
            if req.prefill_left:
                req.prefill_left -= 1  # sample discarded
            else:
                req.out.append(rng.randrange(VOCAB))
        # --- server: fetch some finished ids (one RPC for several)
        live = {key_of(r) for r in [*batch.rows, *waiting]} - {None}
        done = sorted({k[0] for k in finished} - {k[0] for k in live})  # all choices ended
        if done and rng.random() < 0.5:
            sids = rng.sample(done, min(len(done), rng.randint(1, 3)))
            got = ext.sentinel_fetch(sids)
            for sid in sids:
                for res in got.get(sid, []):
                    k = (sid, res["child"])
                    if k in finished:
                        check(res, {k: finished.pop(k)}, k)
                        fetched += 1
                        truth_full.pop(k, None), truth_topk.pop(k, None)
    # drain: everything finishes, then the server fetches everything
    for req in [r for r in batch.rows if r is not None] + waiting:
        if req in batch.rows:
            batch.remove(req)
        k = key_of(req)
        if k is not None and k in truth_full:
            finished[k] = (truth_full[k], truth_topk[k])
    batch.condense()
    batch.refresh(proc)
    got = ext.sentinel_fetch(sorted({k[0] for k in finished}))
    for k, tr in finished.items():
        res = [r for r in got.get(k[0], []) if r["child"] == k[1]]
        if check_all:
            assert len(res) == 1, k
            check(res[0], {k: tr}, k)
            fetched += 1
    return proc, ext, fetched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_churn_matches_truth(seed):
    proc, ext, fetched = run_churn(seed)
    assert fetched > 10
    stats = ext.sentinel_stats()
    assert stats["active"] == 0 and stats["parked"] == 0 and stats["released_active"] == 0
    assert stats["free_slots"] == stats["num_slots"] == 16
    assert stats["untracked_pool_full"] == 0
    del proc


def test_pool_exhaustion_never_crashes():
    # 3 slots for up to 8 concurrent requests: some requests go untracked (counted),
    # parked ones are evicted LRU; whatever is tracked is still exact.
    proc, ext, _ = run_churn(5, n_steps=80, num_slots=3, check_all=False)
    stats = ext.sentinel_stats()
    assert stats["untracked_pool_full"] + stats["evicted_lru"] > 0
    assert stats["free_slots"] + stats["active"] + stats["parked"] + stats["released_active"] == 3
    del proc


def test_nothing_tracked_does_nothing(monkeypatch):
    proc = SentinelLogitsProcessor(make_config(), torch.device("cpu"), False)
    calls = []
    monkeypatch.setattr(proc.tracker.state, "record", lambda *a, **k: calls.append(a))
    batch = FakeInputBatch(8)
    batch.add(Req("u", SamplingParams(), 3))
    batch.refresh(proc)
    proc.apply(torch.zeros(1, VOCAB))
    assert calls == [] and proc.is_argmax_invariant() is False


def test_rows_and_slots_built_on_change_only(monkeypatch):
    proc = SentinelLogitsProcessor(make_config(), torch.device("cpu"), False)
    batch = FakeInputBatch(8)
    a = Req("a", SamplingParams(extra_args={"sentinel_id": "a"}), 2)
    u = Req("u", SamplingParams(), 2)
    batch.add(u)
    batch.add(a)
    batch.refresh(proc)
    rows_t = proc._row_t
    for t in range(3):
        batch.refresh(proc)  # no change: BatchUpdate is None
        proc.apply(torch.randn(2, VOCAB))
        a.out.append(1)
        u.out.append(1)
    assert proc._row_t is rows_t and proc._row_t.tolist() == [1]
    got = SentinelWorkerExtension().sentinel_trajectories(["a"])
    assert got["a"][0]["n_steps"] == 3


def _one_parked():
    """A processor (park timeout 600 s, clock at 0) whose one tracked request has left the batch."""
    now = [0.0]
    proc = SentinelLogitsProcessor(make_config(park_timeout_s=600), torch.device("cpu"), False)
    proc.tracker.clock = lambda: now[0]
    batch = FakeInputBatch(8)
    a = Req("a", SamplingParams(extra_args={"sentinel_id": "a"}), 2)
    batch.add(a)
    batch.refresh(proc)
    proc.apply(torch.randn(1, VOCAB))
    batch.remove(a)
    batch.condense()
    batch.refresh(proc)
    assert proc.tracker.stats()["parked"] == 1
    return proc, batch, now


def test_timeout_eviction():
    proc, _, now = _one_parked()
    now[0] = 601.0
    assert proc.tracker.evict_expired() == 1
    assert proc.tracker.stats()["parked"] == 0
    assert SentinelWorkerExtension().sentinel_fetch(["a"]) == {}


def test_fetch_while_active_releases_on_removal():
    proc = SentinelLogitsProcessor(make_config(), torch.device("cpu"), False)
    ext = SentinelWorkerExtension()
    batch = FakeInputBatch(8)
    a = Req("a", SamplingParams(extra_args={"sentinel_id": "a"}), 2)
    batch.add(a)
    batch.refresh(proc)
    x = torch.randn(1, VOCAB)
    proc.apply(x)
    a.out.append(3)
    got = ext.sentinel_fetch(["a", "nope"])
    assert list(got) == ["a"] and got["a"][0]["n_steps"] == 1
    np.testing.assert_allclose(
        got["a"][0]["features"]["full"][0], full_entropy(x.numpy())[0], atol=1e-5
    )
    assert ext.sentinel_stats()["released_active"] == 1
    batch.remove(a)
    batch.condense()
    batch.refresh(proc)
    s = ext.sentinel_stats()
    assert s["released_active"] == s["parked"] == s["active"] == 0


def test_non_driver_rank_is_noop(monkeypatch):
    monkeypatch.setattr(tracker_setup, "is_sentinel_rank", lambda: False)
    proc = SentinelLogitsProcessor(make_config(), torch.device("cpu"), False)
    assert proc.tracker is None
    batch = FakeInputBatch(8)
    batch.add(Req("a", SamplingParams(extra_args={"sentinel_id": "zz"}), 2))
    batch.refresh(proc)
    x = torch.randn(1, VOCAB)
    assert proc.apply(x) is x
    ext = SentinelWorkerExtension()
    assert ext.sentinel_fetch(["zz"]) == {}


def test_a_failing_step_disables_the_processor_and_marks_the_tracker(monkeypatch):
    proc = SentinelLogitsProcessor(make_config(), torch.device("cpu"), False)
    batch = FakeInputBatch(8)
    batch.add(Req("a", SamplingParams(extra_args={"sentinel_id": "a"}), 2))
    batch.refresh(proc)

    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(proc.tracker.state, "record", boom)
    logits = torch.randn(1, VOCAB)
    assert proc.apply(logits) is logits  # the logits still go through
    assert proc.failed == "RuntimeError: device lost" and proc._rows == {}
    assert SentinelWorkerExtension().sentinel_stats()["failed"] == 1
    batch.add(Req("b", SamplingParams(extra_args={"sentinel_id": "b"}), 2))
    batch.refresh(proc)  # disabled: later hooks are no-ops
    assert proc._rows == {}


def test_tracker_evicts_expired_slots_on_its_own():
    proc, batch, now = _one_parked()
    now[0] = 601.0
    batch.add(Req("b", SamplingParams(extra_args={"sentinel_id": "b"}), 2))
    batch.refresh(proc)  # the next acquire frees the expired slot; no processor call needed
    s = proc.tracker.stats()
    assert s["parked"] == 0 and s["evicted_timeout"] == 1 and s["active"] == 1
