"""The Triton entropy kernel against the float64 definitions.

On a CUDA machine the tests run on the GPU. Without CUDA they run under the
Triton interpreter: ``TRITON_INTERPRET=1`` must be set before triton is first
imported, so ``test_interpreter_subprocess`` reruns this file in a fresh
interpreter with the variable set (the torch tests in the same pytest run stay
unaffected). Shapes are small: the interpreter is slow.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sentinel_vllm.kernels import SlotState, entropy_step, triton_available
from test_kernels import (
    check_against_reference,
    edge_rows,
    invalid_rows,
    run_random_model,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
RUN_HERE = triton_available() and (INTERP or CUDA)
DEV = "cuda" if CUDA and not INTERP else "cpu"
here = pytest.mark.skipif(not RUN_HERE, reason="needs CUDA or TRITON_INTERPRET=1 (subprocess test)")

# Under the interpreter, masked lanes compute exp(-inf - -inf) etc. in numpy
# before the tl.where guards select the finite branch.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.skipif(RUN_HERE or not triton_available(), reason="runs in place")
def test_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", SENTINEL_VLLM_NO_COMPILE="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]


@here
@pytest.mark.parametrize("v, block", [(40, None), (300, 64), (1023, 128), (257, 16)])
def test_random_and_edge_rows_match_reference(v, block):
    g = torch.Generator().manual_seed(v)
    x = torch.cat([torch.randn(2, v, generator=g) * 3, edge_rows(v)]).to(DEV)
    full, _, _ = check_against_reference(x, (1, 5, 20), "triton", block)
    assert full[2].item() == pytest.approx(float(np.log(v)), abs=1e-5)
    assert full[3].item() == 0.0


@here
def test_k64_and_k_larger_than_vocab():
    x = torch.randn(3, 200).to(DEV)
    check_against_reference(x, (64,), "triton", 32)
    small = torch.randn(2, 10).to(DEV)
    full, topk, renorm = check_against_reference(small, (5, 20), "triton")
    torch.testing.assert_close(topk[:, 1], full)
    torch.testing.assert_close(renorm[:, 1], full)


@here
def test_ties_at_kth_value_multi_block():
    x = torch.full((2, 256), -1.0)
    x[0, ::16] = 3.0
    x[1, 7::16] = 3.0
    x[1, 100] = 3.5
    check_against_reference(x.to(DEV), (1, 2, 5, 20), "triton", 16)


@here
def test_invalid_rows_and_full_only():
    x = torch.cat([invalid_rows(100), torch.randn(1, 100)]).to(DEV)
    full, topk, renorm = entropy_step(x, (1, 20), backend="triton", block_size=32)
    assert torch.isnan(full[:3]).all() and torch.isnan(topk[:3]).all()
    assert torch.isnan(renorm[:3]).all()
    assert torch.isfinite(full[3]) and torch.isfinite(topk[3]).all()
    full2, topk2, _ = entropy_step(x, (), backend="triton", block_size=32)
    assert topk2.shape == (4, 0)
    torch.testing.assert_close(full2, full, equal_nan=True)


@here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_strides(dtype):
    base = (torch.randn(4, 600) * 4).to(dtype)
    base[0, ::7] = float("-inf")
    check_against_reference(base[:, ::2].to(DEV), (1, 20), "triton", 64)


@here
def test_triton_matches_torch_path():
    x = torch.randn(3, 700) * 2
    a = entropy_step(x.to(DEV), (1, 7, 20), backend="triton", block_size=128)
    b = entropy_step(x, (1, 7, 20), backend="torch")
    for u, w in zip(a, b):
        torch.testing.assert_close(u.cpu(), w, atol=1e-5, rtol=0)


@here
def test_slot_state_with_triton_backend():
    st = SlotState(4, 40, series=("full", "top3", "top3_renorm"), device=DEV, backend="triton")
    run_random_model(st, 30, seed=3, vocab=48, batch=3, positioned=True)


@here
@pytest.mark.parametrize("v, scale", [(151936, 3.0), (262144, 1.0)])
def test_real_vocab_sizes_default_block(v, scale):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(2, v, generator=g) * scale
    x[0, :5] += 20.0  # a peaked row
    check_against_reference(x.to(DEV), (1, 20, 64), "triton")
