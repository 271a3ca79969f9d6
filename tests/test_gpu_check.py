"""The pure helpers of benchmarks/gpu_check.py and its sync-check driver on CPU (issue 19)."""

import importlib.util
import types
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def test_frac_of_copy_is_copy_time_over_kernel_time():
    # 1 GB of logits: copy in 0.4 ms (read side 2,500 GB/s), kernel in 0.5 ms (2,000 GB/s)
    r = gc.frac_of_copy(10**9, 0.4, 0.5)
    assert r == {"copy_read_GBps": 2500.0, "kernel_GBps": 2000.0, "frac_copy": 0.8}


def test_abba_ratio():
    r = gc.abba_ratio([2.0, 2.0, 2.0, 2.0], [2.0, 2.5, 2.0, 1.5])
    assert r["ratio"] == 1.0  # 8 s both ways
    assert r["pair_ratios"] == [1.0, 0.8, 1.0, 1.3333]
    with pytest.raises(ValueError):
        gc.abba_ratio([1.0], [])


def apply_update(rows: dict, e: dict) -> dict:
    """vLLM's order: removed -> added -> moved, on a row -> request map."""
    rows = dict(rows)
    for r in e["removed"]:
        rows.pop(r, None)
    for r, q in e["added"]:
        rows[r] = q
    for a, b, kind in e["moved"]:
        if kind == "swap":
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if ra is not None:
                rows[b] = ra
            if rb is not None:
                rows[a] = rb
        else:
            rows.pop(b, None)
            if a in rows:
                rows[b] = rows.pop(a)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_is_consistent_with_vllm_update_order(seed):
    sched = gc.make_schedule(300, 16, seed=seed)
    rows, seen, gone = {}, set(), set()
    for e in sched:
        rows = apply_update(rows, e)
        assert rows == dict(enumerate(e["rows"]))  # dense rows, as the schedule claims
        assert len(e["rows"]) == len(set(e["rows"])) <= 16
        now = set(e["rows"])
        assert not (now & gone)  # a request that left never comes back
        gone |= seen - now
        seen |= now
    assert len(seen) > 40 and any(e["removed"] for e in sched)
    assert any(k == "swap" for e in sched for _, _, k in e["moved"])
    assert any(k == "move" for e in sched for _, _, k in e["moved"])


def test_sync_section_on_cpu_counts_every_step(monkeypatch):
    """Both processors with vLLM stubbed: every fetched trajectory has one step per batch step."""
    monkeypatch.setenv("SENTINEL_VLLM_NO_COMPILE", "1")
    ctx = types.SimpleNamespace(dry=True, dev=torch.device("cpu"), backend="torch")
    res = gc.sec_syncs(ctx, gc.Budget(60, float("inf")))
    for mode in ("v1_warn_pass", "v1_error_pass", "mrv2_warn_pass", "mrv2_error_pass"):
        assert res[mode]["n_mismatch"] == 0 and res[mode]["failed"] is None
        assert res[mode]["live_fetched"] == res[mode]["live"] > 0
        assert res[mode]["fetched"] > res[mode]["live"]  # parked requests too
    assert res["ok"]
