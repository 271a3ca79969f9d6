"""Torch path of sentinel_vllm.kernels and SlotState, against the float64 definitions.

The Triton kernel runs the same cases in test_kernels_triton.py (interpreter on CPU).
"""

import math

import numpy as np
import pytest
import torch

from sentinel_vllm.entropy import full_entropy, topk_entropy, topk_entropy_renorm
from sentinel_vllm.features import compute_features
from sentinel_vllm.kernels import SlotState, entropy_step, parse_series, warmup
from sentinel_vllm.kernels.entropy_torch import entropy_torch

NEG = float("-inf")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    """Eager torch path (same formula as the compiled one, tested in test_compiled_path)."""
    monkeypatch.setenv("SENTINEL_VLLM_NO_COMPILE", "1")


# ----------------------------------------------------------------------------- cases


def edge_rows(v: int) -> torch.Tensor:
    """Rows with known answers or hard structure, vocab ``v`` (>= 40)."""
    g = torch.Generator().manual_seed(v)
    rows = []
    rows.append(torch.zeros(v))  # uniform: ln V
    one = torch.full((v,), NEG)
    one[v // 3] = 2.0
    rows.append(one)  # one-hot: 0
    masked = torch.randn(v, generator=g) * 2
    masked[::3] = NEG
    rows.append(masked)  # partly -inf
    ties = torch.full((v,), -5.0)
    ties[:: max(v // 30, 1)] = 4.0  # ~30 equal maxima spread over chunks: ties at the k-th value
    ties[1] = 6.0
    rows.append(ties)
    steep = torch.randn(v, generator=g) * 8
    steep[-1] = 80.0  # dominant last element (vocab tail chunk)
    rows.append(steep)
    asc = torch.linspace(-3, 3, v)  # ascending: every block inserts into the top-k
    rows.append(asc)
    return torch.stack(rows)


def invalid_rows(v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(v, generator=g)
    a[5] = float("nan")
    b = torch.full((v,), NEG)
    c = torch.randn(v, generator=g)
    c[-1] = float("inf")
    return torch.stack([a, b, c])


def check_against_reference(logits, ks, backend, block_size=None, atol=1e-4):
    """Assert entropy_step equals the float64 numpy definitions on the upcast logits."""
    full, topk, renorm = entropy_step(logits, ks, backend=backend, block_size=block_size)
    x = logits.detach().float().cpu().double().numpy()
    assert full.dtype == torch.float32 and full.shape == (x.shape[0],)
    assert topk.shape == renorm.shape == (x.shape[0], len(ks))
    np.testing.assert_allclose(full.cpu().numpy(), full_entropy(x), atol=atol, rtol=0)
    for j, k in enumerate(ks):
        np.testing.assert_allclose(topk[:, j].cpu().numpy(), topk_entropy(x, k), atol=atol, rtol=0)
        np.testing.assert_allclose(renorm[:, j].cpu().numpy(), topk_entropy_renorm(x, k),
                                   atol=atol, rtol=0)  # fmt: skip
    return full, topk, renorm


# ----------------------------------------------------------------------------- entropy_step


@pytest.mark.parametrize("v", [40, 1023, 4099])
@pytest.mark.parametrize("chunk", [None, 8, 16])
@pytest.mark.parametrize("ks", [(1, 5, 20), (64,), ()])
def test_random_and_edge_rows_match_reference(v, chunk, ks):
    g = torch.Generator().manual_seed(v + len(ks))
    x = torch.cat([torch.randn(4, v, generator=g) * 3, edge_rows(v)])
    full, _, _ = check_against_reference(x, ks, "torch", chunk)
    n_rand = 4
    assert full[n_rand].item() == pytest.approx(math.log(v), abs=1e-5)  # uniform
    assert full[n_rand + 1].item() == 0.0  # one-hot


def test_eager_row_slices(monkeypatch):
    import sentinel_vllm.kernels.entropy_torch as et

    monkeypatch.setattr(et, "EAGER_SLICE", 3 * 1023)  # 3 rows per slice
    x = torch.cat([torch.randn(4, 1023) * 3, edge_rows(1023)])
    check_against_reference(x, (1, 20), "torch", 16)


def test_pruned_topk_is_exact_with_many_ties():
    # Every chunk holds the same maximum: the pruning must not lose or double values.
    v, chunk = 4096, 16
    x = torch.full((2, v), -1.0)
    x[0, ::chunk] = 3.0
    x[1, 7::chunk] = 3.0
    x[1, 100] = 3.5
    check_against_reference(x, (1, 2, 20), "torch", chunk)  # 256 chunks > 4 * 20: pruned
    check_against_reference(x, (1, 64), "torch", 8)


def test_k_larger_than_vocab_equals_full():
    x = torch.randn(3, 10)
    full, topk, renorm = check_against_reference(x, (5, 20, 64), "torch")
    torch.testing.assert_close(topk[:, 1], full)
    torch.testing.assert_close(renorm[:, 2], full)


@pytest.mark.parametrize("chunk", [None, 16])
def test_invalid_rows_are_nan_in_every_output(chunk):
    x = torch.cat([invalid_rows(300), torch.randn(1, 300)])
    full, topk, renorm = entropy_step(x, (1, 20), backend="torch", block_size=chunk)
    assert torch.isnan(full[:3]).all() and torch.isnan(topk[:3]).all()
    assert torch.isnan(renorm[:3]).all()
    assert torch.isfinite(full[3]) and torch.isfinite(topk[3]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_reference_on_upcast(dtype):
    x = (torch.randn(5, 2000) * 4).to(dtype)
    x[0, ::5] = NEG
    check_against_reference(x, (1, 20), "torch", 16)


def test_strided_logits():
    base = torch.randn(6, 2 * 1500)
    x = base[::2, ::2]  # non-contiguous in both dimensions
    check_against_reference(x, (3, 20), "torch", 16)


def test_compiled_path_matches_reference(monkeypatch):
    monkeypatch.delenv("SENTINEL_VLLM_NO_COMPILE")
    x = torch.cat([torch.randn(3, 3001) * 3, edge_rows(3001)])
    check_against_reference(x, (1, 20), "torch")
    full, _, _ = entropy_step(invalid_rows(3001), (20,), backend="torch")
    assert torch.isnan(full).all()
    check_against_reference(x[:2].to(torch.bfloat16), (20,), "torch")
    warmup(3001, (20,))  # compiled already: returns quickly, no error


@pytest.mark.parametrize(
    "ks, err", [((5, 1), "sorted"), ((0,), "1..64"), ((65,), "1..64")]
)  # fmt: skip
def test_bad_ks_raise(ks, err):
    with pytest.raises(ValueError, match=err):
        entropy_step(torch.randn(2, 100), ks)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        entropy_step(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="dtype"):
        entropy_step(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        entropy_step(torch.randn(2, 4), backend="cuda")


def test_entropy_torch_empty_batch():
    full, topk, renorm = entropy_torch(torch.randn(0, 50), (5,))
    assert full.shape == (0,) and topk.shape == (0, 1)


# ----------------------------------------------------------------------------- SlotState


def test_parse_series_and_memory():
    ks, cols = parse_series(["top5_renorm", "full", "top20", "top5"])
    assert ks == (5, 20)
    assert cols == [("renorm", 0), ("full", 0), ("topk", 1), ("topk", 0)]
    for bad in (["full", "full"], ["top0"], ["top65"], ["entropy"], []):
        with pytest.raises(ValueError):
            parse_series(bad)
    assert SlotState.memory_bytes(1024, 32768, 2) == 256 * 2**20
    st = SlotState(3, 7, series=("full", "top2", "top2_renorm"))
    assert st.buf.numel() * 4 == SlotState.memory_bytes(3, 7, 3)


def ref_values(x: torch.Tensor, series) -> np.ndarray:
    """(n, n_series) float64 reference entropies of rows of x."""
    xn = x.double().numpy()
    cols = []
    for name in series:
        if name == "full":
            cols.append(full_entropy(xn))
        elif name.endswith("_renorm"):
            cols.append(topk_entropy_renorm(xn, int(name[3:-7])))
        else:
            cols.append(topk_entropy(xn, int(name[3:])))
    return np.stack(cols, 1)


def assert_state_matches(st: SlotState, truth: dict, nan_truth: dict, slots, backend_atol=1e-4):
    res = st.gather(slots, trajectories=True)
    for i, s in enumerate(slots):
        traj = np.asarray(truth[s], dtype=np.float64).reshape(-1, len(st.series))
        assert res.n_steps[i] == len(traj)
        assert res.nan_steps[i] == nan_truth[s]
        for j, name in enumerate(st.series):
            np.testing.assert_allclose(res.trajectories[name][i], traj[:, j], atol=backend_atol)
            np.testing.assert_allclose(res.features[name][i], compute_features(traj[:, j]),
                                       atol=backend_atol, rtol=1e-4)  # fmt: skip
    return res


class SlotModel:
    """Python model of one slot: written cells by position, count, NaN rows in append mode."""

    def __init__(self):
        self.cells, self.count, self.nan_app = {}, 0, 0

    def copy(self):
        m = SlotModel()
        m.cells, m.count, m.nan_app = dict(self.cells), self.count, self.nan_app
        return m

    def expected(self, max_steps):
        """(trajectory rows, nan_steps, n_dropped) as gather should report them."""
        stored = min(self.count, max_steps)
        traj = [self.cells[i] for i in range(stored)
                if i in self.cells and np.isfinite(self.cells[i]).all()]  # fmt: skip
        return traj, self.nan_app + stored - len(traj), max(self.count - max_steps, 0)


def run_random_model(st: SlotState, n_steps: int, seed: int, vocab: int = 64, batch: int = 5,
                     positioned: bool = False):  # fmt: skip
    """Random record/reset/move/swap, checked against a python model of the truth.

    ``positioned``: record with positions (next step mostly; sometimes the same
    step again, a skipped position, or a rewind), as the vLLM adapter does.
    """
    rng = np.random.default_rng(seed)
    model = {s: SlotModel() for s in range(st.num_slots)}
    dev = st.device

    def check():
        truth, nans = {}, {}
        for s, m in model.items():
            truth[s], nans[s], _ = m.expected(st.max_steps)
        res = assert_state_matches(st, truth, nans, list(range(st.num_slots)))
        dropped = [model[s].expected(st.max_steps)[2] for s in range(st.num_slots)]
        assert res.n_dropped.tolist() == dropped
        assert res.truncated.tolist() == [d > 0 for d in dropped]

    for step in range(n_steps):
        x = torch.randn(batch, vocab) * float(rng.uniform(0.5, 4))
        if rng.random() < 0.2:
            x[rng.integers(batch), 0] = float("nan")
        n = int(rng.integers(0, batch + 1))
        rows = rng.choice(batch, n, replace=False)
        slots = rng.choice(st.num_slots, n, replace=False)
        vals = ref_values(x[torch.as_tensor(rows, dtype=torch.long)], st.series)
        args = (x.to(dev), torch.as_tensor(rows, device=dev), torch.as_tensor(slots, device=dev))
        if positioned:
            pos = []
            for s in slots:
                c, u = model[s].count, rng.random()
                pos.append(c - 1 if u < 0.2 and c > 0 else c + 2 if u < 0.25 else
                           max(c - 5, 0) if u < 0.3 else c)  # fmt: skip
            st.record(*args, positions=torch.as_tensor(pos, dtype=torch.long, device=dev))
            for s, p, v in zip(slots, pos, vals):
                m = model[s]
                if p < st.max_steps:
                    m.cells[p] = v if np.isfinite(v).all() else np.full_like(v, np.nan)
                m.count = p + 1
        else:
            st.record(*args)
            for s, v in zip(slots, vals):
                m = model[s]
                if np.isfinite(v).all():
                    if m.count < st.max_steps:
                        m.cells[m.count] = v
                    m.count += 1
                else:
                    m.nan_app += 1
        op = rng.random()
        if op < 0.1:
            s = int(rng.integers(st.num_slots))
            st.reset([s])
            model[s] = SlotModel()
        elif op < 0.25:
            a, b = (int(i) for i in rng.choice(st.num_slots, 2, replace=False))
            st.move(a, b)
            model[b] = model[a].copy()
        elif op < 0.4:
            a, b = (int(i) for i in rng.choice(st.num_slots, 2, replace=False))
            st.swap(torch.tensor([a], device=dev), torch.tensor([b], device=dev))
            model[a], model[b] = model[b], model[a]
        if step % 25 == 24:
            check()
    check()
    return model


def test_random_record_move_swap_reset_against_python_model():
    st = SlotState(7, 200, series=("full", "top5", "top5_renorm", "top20"), backend="torch")
    run_random_model(st, 150, seed=0)


@pytest.mark.parametrize("max_steps", [12, 200])
def test_random_positioned_records_against_python_model(max_steps):
    # Positioned writes (as the vLLM adapter makes them) with overwrites, holes,
    # rewinds, NaN rows, truncation, moves and swaps in the middle of trajectories.
    st = SlotState(6, max_steps, series=("full", "top3"), backend="torch")
    run_random_model(st, 150, seed=max_steps, positioned=True)


def test_length_zero_and_one_trajectories():
    st = SlotState(3, 10, series=("full", "top2"))
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    st.record(x, torch.tensor([0]), torch.tensor([1]))
    res = st.gather([0, 1])
    np.testing.assert_array_equal(res.n_steps, [0, 1])
    np.testing.assert_array_equal(res.features["full"][0], np.zeros(11))
    ln4 = math.log(4)
    expect = [ln4, 0, ln4, ln4, ln4, ln4, ln4, ln4, 0, 0, ln4]
    np.testing.assert_allclose(res.features["full"][1], expect, atol=1e-6)
    np.testing.assert_allclose(res.features["top2"][1][[0, 10]], [2 * 0.25 * ln4] * 2, atol=1e-6)


def test_truncation_past_max_steps():
    st = SlotState(2, 3, series=("full",))
    xs = [torch.zeros(1, 2 ** (i + 1)) for i in range(5)]  # entropies ln 2 .. ln 32
    for x in xs:
        st.record(x, torch.tensor([0]), torch.tensor([1]))
    res = st.gather([1, 0], trajectories=True)
    assert res.n_steps.tolist() == [3, 0] and res.truncated.tolist() == [True, False]
    assert res.n_dropped.tolist() == [2, 0]
    np.testing.assert_allclose(res.trajectories["full"][0], np.log([2, 4, 8]), atol=1e-6)
    np.testing.assert_allclose(res.features["full"][0], compute_features(np.log([2, 4, 8])),
                               atol=1e-6)  # fmt: skip


def test_positions_overwrite_and_nan_per_position():
    st = SlotState(2, 4, series=("full",))
    row = lambda v: torch.zeros(1, v)  # noqa: E731  entropy ln v
    one, zero = torch.tensor([1]), torch.tensor([0])
    st.record(row(2), zero, one, positions=torch.tensor([0]))
    st.record(row(4), zero, one, positions=torch.tensor([1]))
    st.record(row(8), zero, one, positions=torch.tensor([1]))  # recomputed step overwrites
    st.record(row(16), zero, one, positions=torch.tensor([1]))
    res = st.gather([1], trajectories=True)
    assert res.n_steps.tolist() == [2] and res.nan_steps.tolist() == [0]
    np.testing.assert_allclose(res.trajectories["full"][0], np.log([2, 16]), atol=1e-6)
    bad = torch.full((1, 4), float("nan"))
    st.record(bad, zero, one, positions=torch.tensor([2]))
    st.record(bad, zero, one, positions=torch.tensor([2]))  # same position: counted once
    res = st.gather([1], trajectories=True)
    assert res.n_steps.tolist() == [2] and res.nan_steps.tolist() == [1]
    st.record(row(32), zero, one, positions=torch.tensor([2]))  # valid write clears it
    st.record(row(2), zero, one, positions=torch.tensor([4]))  # beyond max_steps
    res = st.gather([1], trajectories=True)
    assert res.nan_steps.tolist() == [1]  # position 3 never written
    assert res.truncated.tolist() == [True] and res.n_dropped.tolist() == [1]
    np.testing.assert_allclose(res.trajectories["full"][0], np.log([2, 16, 32]), atol=1e-6)
    st.record(row(4), zero, one, positions=torch.tensor([1]))  # rewind: count = 2
    res = st.gather([1], trajectories=True)
    assert res.n_steps.tolist() == [2] and not res.truncated[0]
    np.testing.assert_allclose(res.trajectories["full"][0], np.log([2, 4]), atol=1e-6)


def test_repeated_scratch_slot_and_negative_position_leave_others_intact():
    st = SlotState(3, 4, series=("full",))
    x = torch.zeros(4, 8)  # entropy ln 8
    x[1, 1:] = NEG  # entropy 0
    scratch = 2
    slots = torch.tensor([0, 1, scratch, scratch])
    st.record(x, torch.arange(4), slots, positions=torch.zeros(4, dtype=torch.long))
    st.record(x, torch.tensor([0, 1]), torch.tensor([0, 1]), positions=torch.tensor([1, -1]))
    res = st.gather([0, 1], trajectories=True)
    assert res.n_steps.tolist() == [2, 1] and res.nan_steps.tolist() == [0, 0]
    np.testing.assert_allclose(res.trajectories["full"][0], [math.log(8)] * 2, atol=1e-6)
    np.testing.assert_allclose(res.trajectories["full"][1], [0.0], atol=1e-6)


def test_append_nan_row_counts_and_appends_nothing():
    st = SlotState(1, 5, series=("full", "top1"))
    x = torch.randn(2, 30)
    x[1, 3] = float("nan")
    st.record(x, torch.tensor([1]), torch.tensor([0]))
    st.record(x, torch.tensor([0]), torch.tensor([0]))
    res = st.gather(0)
    assert res.n_steps.tolist() == [1] and res.nan_steps.tolist() == [1]


def test_record_selects_rows_by_either_route():
    # Few rows of a large batch (index_select route) and most rows (compute-all route).
    st = SlotState(10, 4, series=("full", "top3"))
    x = torch.randn(10, 80) * 2
    st.record(x, torch.tensor([7]), torch.tensor([2]))
    st.record(x, torch.tensor([9, 8, 7, 6, 5, 4]), torch.tensor([0, 1, 2, 3, 4, 5]))
    res = st.gather([2, 0], trajectories=True)
    ref = ref_values(x, st.series)
    np.testing.assert_allclose(res.trajectories["top3"][0], ref[[7, 7], 1], atol=1e-5)
    np.testing.assert_allclose(res.trajectories["full"][1], ref[[9], 0], atol=1e-5)


def test_packed_gather_route_round_trips_counters():
    # The CUDA route of gather packs int64 counters as float32 bits beside the rows.
    from sentinel_vllm.kernels.slot_state import _gather_packed

    st = SlotState(4, 3, series=("full", "top2"))
    st.buf.copy_(torch.arange(24, dtype=torch.float32).reshape(4, 2, 3))
    st.count.copy_(torch.tensor([0, 2**40 + 3, 5, 1]))
    st.nan_count.copy_(torch.tensor([7, 0, 2**33, 1]))
    count, nan, data = _gather_packed(st.buf, st.count, st.nan_count, torch.tensor([2, 1]))
    assert count.tolist() == [5, 2**40 + 3] and nan.tolist() == [2**33, 0]
    np.testing.assert_array_equal(data, st.buf.numpy()[[2, 1]])


@pytest.mark.parametrize("op", [
    lambda st: st.reset([-1]),
    lambda st: st.reset(torch.tensor([4])),
    lambda st: st.reset([1.5]),
    lambda st: st.reset(torch.tensor([True, False, False, False])),
    lambda st: st.move([-1], [0]),
    lambda st: st.move([0], [-1]),
    lambda st: st.move(torch.tensor([0]), torch.tensor([0.0])),
    lambda st: st.swap([-1], [0]),
    lambda st: st.gather([-1]),
    lambda st: st.gather(torch.tensor([7])),
])
def test_bad_slot_indices_raise_and_leave_every_slot_intact(op):
    # A negative index used to wrap onto the last slot (reset/move/swap/gather
    # on CPU), a float was truncated and a bool mask read as indices 0/1.
    st = SlotState(4, 8, series=("full", "top5"))
    st.record(torch.randn(4, 50), torch.arange(4), torch.arange(4))
    before = [t.clone() for t in (st.buf, st.count, st.nan_count)]
    with pytest.raises(ValueError, match="slot indices"):
        op(st)
    for b, a in zip(before, (st.buf, st.count, st.nan_count)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_record_length_mismatch_raises():
    st = SlotState(2, 4)
    with pytest.raises(ValueError, match="same length"):
        st.record(torch.randn(2, 30), torch.tensor([0, 1]), torch.tensor([0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_record_does_not_synchronise_on_cuda():
    st = SlotState(8, 16, device="cuda")
    x = torch.randn(8, 5000, device="cuda")
    rows = torch.arange(8, device="cuda")
    st.record(x, rows, rows)  # first call: JIT compile and cached constants (H2D copies)
    st.record(x, rows, rows, positions=rows)
    st.reset(list(range(8)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            st.record(x, rows, rows)
            st.record(x, rows, rows, positions=rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    res = st.gather(list(range(8)))
    assert (res.n_steps + res.nan_steps).tolist() == list(range(1, 9))  # count = position + 1
