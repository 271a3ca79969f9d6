"""The Triton kernel on CUDA over the serving grid (issue 19 item 1), against float64.

Grid: logits dtype float32 / bfloat16 / float16 x vocab 32,000 / 131,072 /
151,936 / 262,144 x batch 1 / 3 / 64 / 1,024, each batch with NaN, all ``-inf``
and partly ``-inf`` rows where it has room. The kernel runs on every row; the
float64 numpy reference (:mod:`sentinel_vllm.entropy`) runs on a subsample of
at most 8 rows (the special rows, the first and last, and a few random ones),
and every other row is checked for range (finite, in ``[0, ln V]``). The
reference is computed on the upcast logits the kernel read, so the tolerance is
that of fp32 accumulation for every dtype: 1e-4 nats (the lower precision of a
half dtype is in the inputs, not in the comparison).

Skipped without CUDA (the interpreter is far too slow at these sizes); the grid
helper itself is exercised on CPU with the torch path and a small vocabulary.
"""

import math

import numpy as np
import pytest
import torch

from sentinel_vllm.entropy import full_entropy, topk_entropy, topk_entropy_renorm
from sentinel_vllm.kernels import entropy_step, triton_available

CUDA = torch.cuda.is_available() and triton_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [32000, 131072, 151936, 262144]
BATCHES = [1, 3, 64, 1024]
KS = (1, 20, 64)
ATOL = 1e-4


def grid_logits(batch: int, vocab: int, dtype, device, seed: int = 0):
    """Logits of one grid case and the indices of its special rows.

    Returns
    -------
    x : torch.Tensor (batch, vocab) of ``dtype`` on ``device``
    special : dict of str to int
        ``nan``, ``all_neg_inf`` (invalid rows), ``part_neg_inf``, ``peaked``
        (valid), each present only when the batch has room for it.
    """
    g = torch.Generator(device=device).manual_seed(seed * 7919 + batch * 31 + vocab)
    x = torch.randn(batch, vocab, generator=g, device=device) * 3.0  # on the device: 1 GiB at most
    names = ["peaked", "nan", "all_neg_inf", "part_neg_inf"][: max(batch - 1, 1)]
    special = {}
    for j, name in enumerate(names):
        r = batch - 1 - j  # from the end: row 0 stays an ordinary row when batch >= 2
        special[name] = r
        if name == "peaked":
            x[r, vocab // 2] += 25.0
            x[r, :7] += 12.0
        elif name == "nan":
            x[r, vocab // 3] = float("nan")
        elif name == "all_neg_inf":
            x[r] = float("-inf")
        else:
            x[r, ::2] = float("-inf")
    return x.to(dtype), special


def check_grid_case(batch: int, vocab: int, dtype, device, backend: str, max_ref_rows: int = 8):
    """Run ``entropy_step`` on one grid case; compare sampled rows with float64.

    Returns the number of rows compared with the reference.
    """
    x, special = grid_logits(batch, vocab, dtype, device)
    full, topk, renorm = entropy_step(x, KS, backend=backend)
    invalid = {special[k] for k in ("nan", "all_neg_inf") if k in special}
    rows = sorted({0, batch - 1, *special.values()})
    g = np.random.default_rng(batch + vocab)
    extra = g.choice(batch, size=min(batch, max_ref_rows), replace=False).tolist()
    for r in extra:
        if len(rows) >= max_ref_rows:
            break
        rows = sorted(set(rows) | {r})
    idx = torch.as_tensor(rows, device=x.device)
    ref_x = x.index_select(0, idx).float().cpu().double().numpy()
    f, t, n = (a.index_select(0, idx).cpu().numpy() for a in (full, topk, renorm))
    np.testing.assert_allclose(f, full_entropy(ref_x), atol=ATOL, rtol=0)
    for j, k in enumerate(KS):
        np.testing.assert_allclose(t[:, j], topk_entropy(ref_x, k), atol=ATOL, rtol=0)
        np.testing.assert_allclose(n[:, j], topk_entropy_renorm(ref_x, k), atol=ATOL, rtol=0)
    # every row: invalid rows NaN in all outputs, valid rows finite and in range
    bad = torch.zeros(batch, dtype=torch.bool)
    bad[sorted(invalid)] = True  # (rows of x modified after the cast keep their NaN / -inf)
    outs = torch.cat([full[:, None], topk, renorm], 1).cpu()
    assert torch.isnan(outs[bad]).all()
    ok = outs[~bad]
    assert torch.isfinite(ok).all()
    assert (ok >= 0).all() and (ok <= math.log(vocab) + ATOL).all()
    return len(rows)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton (no interpreter at these sizes)")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cuda_grid_matches_float64(dtype, vocab, batch):
    n = check_grid_case(batch, vocab, dtype, "cuda", "triton")
    assert n == min(batch, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_grid_helper_on_cpu_torch_path(monkeypatch, dtype):
    """The same helper on CPU (torch path, small vocab): special rows land where claimed."""
    monkeypatch.setenv("SENTINEL_VLLM_NO_COMPILE", "1")
    x, special = grid_logits(64, 500, dtype, "cpu")
    assert set(special) == {"peaked", "nan", "all_neg_inf", "part_neg_inf"}
    assert torch.isnan(x[special["nan"]].float()).sum() == 1
    assert torch.isneginf(x[special["all_neg_inf"]].float()).all()
    assert torch.isneginf(x[special["part_neg_inf"]].float()).sum() == 250
    assert check_grid_case(64, 500, dtype, "cpu", "torch") == 8
    assert check_grid_case(1, 500, dtype, "cpu", "torch") == 1
