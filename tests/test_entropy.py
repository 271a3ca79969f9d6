"""Entropy definitions against hand-computed values and an independent float64 loop."""

import math

import numpy as np
import pytest

from sentinel_vllm import entropy as E


def _ref_entropy(row, k=None, renorm=False):
    """Plain-python reference: softmax, sort, sum -p ln p."""
    m = max(v for v in row if v != -math.inf)
    ex = [math.exp(v - m) if v != -math.inf else 0.0 for v in row]
    s = sum(ex)
    p = sorted((e / s for e in ex), reverse=True)
    if k is not None:
        p = p[:k]
    if renorm:
        t = sum(p)
        p = [x / t for x in p]
    return -sum(x * math.log(x) for x in p if x > 0)


def test_uniform_and_one_hot():
    V = 1000
    assert E.full_entropy(np.zeros((1, V)))[0] == pytest.approx(math.log(V), abs=1e-12)
    # k largest of a uniform: k * (1/V) * ln V
    assert E.topk_entropy(np.zeros(V), k=20)[0] == pytest.approx(20 / V * math.log(V), abs=1e-12)
    assert E.topk_entropy_renorm(np.zeros(V), k=20)[0] == pytest.approx(math.log(20), abs=1e-12)
    one_hot = np.full(V, -np.inf)
    one_hot[7] = 3.0
    assert E.full_entropy(one_hot)[0] == 0.0
    assert E.topk_entropy(one_hot, k=5)[0] == 0.0


def test_two_token_hand_computed():
    # p = (1/(1+e), e/(1+e)) for logits (0, 1)
    p1 = 1 / (1 + math.e)
    h = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert E.full_entropy([0.0, 1.0])[0] == pytest.approx(h, abs=1e-14)
    assert E.topk_entropy([0.0, 1.0], k=1)[0] == pytest.approx(-(1 - p1) * math.log(1 - p1), abs=1e-14)


@pytest.mark.parametrize("k", [1, 3, 20, 64, 500])
def test_random_rows_against_reference(k):
    rng = np.random.default_rng(k)
    x = rng.normal(0, 3, size=(6, 257))
    x[1, :100] = -np.inf  # partly masked
    x[2, 10:20] = x[2, 5]  # ties at the k-th value
    for i in range(x.shape[0]):
        assert E.full_entropy(x)[i] == pytest.approx(_ref_entropy(x[i]), abs=1e-10)
        assert E.topk_entropy(x, k)[i] == pytest.approx(_ref_entropy(x[i], k), abs=1e-10)
        assert E.topk_entropy_renorm(x, k)[i] == pytest.approx(_ref_entropy(x[i], k, True), abs=1e-10)


def test_k_greater_than_vocab_equals_full():
    x = np.random.default_rng(0).normal(size=(3, 17))
    np.testing.assert_allclose(E.topk_entropy(x, k=100), E.full_entropy(x), atol=1e-12)


def test_invalid_rows_flagged_and_validate_raises():
    x = np.zeros((4, 5))
    x[1, 2] = np.nan
    x[2, :] = -np.inf
    x[3, 0] = np.inf
    h = E.full_entropy(x)
    assert h[0] == pytest.approx(math.log(5))
    assert np.isnan(h[1:]).all()
    assert E.invalid_rows(x).tolist() == [False, True, True, True]
    with pytest.raises(E.InvalidLogitsError):
        E.full_entropy(x, validate=True)
    with pytest.raises(ValueError):
        E.topk_entropy(x, k=0)


def test_from_top_logprobs_matches_logits():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, size=(5, 300))
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    steps_dict = [{str(i): float(v) for i, v in enumerate(row)} for row in logp]
    steps_openai = [[{"token": str(i), "logprob": float(v)} for i, v in enumerate(row)] for row in logp]
    np.testing.assert_allclose(E.entropy_from_top_logprobs(steps_dict, k=20), E.topk_entropy(x, 20), atol=1e-12)
    np.testing.assert_allclose(E.entropy_from_top_logprobs(steps_openai), E.full_entropy(x), atol=1e-10)
    np.testing.assert_allclose(E.entropy_from_top_logprobs(steps_dict, k=20, renormalize=True),
                               E.topk_entropy_renorm(x, 20), atol=1e-12)
    with pytest.raises(ValueError):
        E.entropy_from_top_logprobs([[0.5]])


def test_torch_versions_match_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(0, 4, size=(5, 1023)).astype(np.float32)
    x[1, 500:] = -np.inf
    x[4, 3] = np.nan
    t = torch.from_numpy(x)
    np.testing.assert_allclose(E.full_entropy_torch(t).numpy(), E.full_entropy(x), atol=1e-4)
    np.testing.assert_allclose(E.topk_entropy_torch(t, 20).numpy(), E.topk_entropy(x, 20), atol=1e-4)
    np.testing.assert_allclose(E.topk_entropy_torch(t, 20, renormalize=True).numpy(),
                               E.topk_entropy_renorm(x, 20), atol=1e-4)
