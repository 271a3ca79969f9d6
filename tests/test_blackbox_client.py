"""Client helper: top-k entropy, features and block from OpenAI-format responses.

Every trajectory is checked value by value against ``entropy.entropy_from_top_logprobs``
(the one definition) and, for the literal fixture, against hand-computed numbers.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from openai_fixtures import chat_response, chat_stream, choice_steps, completion_response
from serving_helpers import make_tiny_sentinel, reference_p

from sentinel_vllm.blackbox.client import (
    MissingLogprobsError,
    TooFewAlternativesError,
    TopLogprobsScorer,
    extract_choices,
    score_response,
    trajectories,
)
from sentinel_vllm.entropy import entropy_from_top_logprobs
from sentinel_vllm.features import FEATURE_NAMES, compute_features

FIX = Path(__file__).parent / "fixtures" / "openai"


def _h(lps):
    """-sum p ln p of the given logprobs, written out."""
    return sum(-math.exp(v) * v for v in lps)


def _ref(steps, k):
    return np.array([entropy_from_top_logprobs([s], k=k)[0] for s in steps])


@pytest.fixture(scope="module")
def top20(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "top20.onnx"
    parts = make_tiny_sentinel(path, entropy="topk", k=20)
    return path, parts


def test_literal_fixture_hand_computed():
    body = json.loads((FIX / "chat_k2.json").read_text())
    tr = trajectories(body, k=2)[0]
    # step 1 has two alternatives with the same text " ": both kept (a dict would merge them)
    want = [_h([-0.1, -2.5]), _h([-0.5, -1.0]), 0.0]
    assert want == pytest.approx([0.2956962, 0.6711447, 0.0], abs=1e-6)
    np.testing.assert_allclose(tr.entropy, want, rtol=0, atol=1e-12)
    assert tr.effective_k == 2 and tr.short_steps == 0
    # bytes and str input give the same
    np.testing.assert_array_equal(
        trajectories((FIX / "chat_k2.json").read_bytes(), k=2)[0].entropy, tr.entropy
    )


def test_chat_nonstream_k20_value_by_value():
    steps = choice_steps(1, 17, 20)
    tr = trajectories(chat_response([steps]))[0]
    assert tr.entropy.shape == (17,)
    np.testing.assert_array_equal(tr.entropy, _ref(steps, 20))
    np.testing.assert_allclose(tr.entropy, [_h(s) for s in steps], rtol=1e-12)
    np.testing.assert_array_equal(tr.features, compute_features(_ref(steps, 20)))


def test_more_alternatives_than_k_uses_the_k_largest():
    steps = choice_steps(2, 9, 25)
    tr = trajectories(chat_response([steps]), k=20)[0]
    np.testing.assert_allclose(tr.entropy, [_h(s[:20]) for s in steps], rtol=1e-12)
    # order in the list does not matter: reversed alternatives give the same
    rev = [s[::-1] for s in steps]
    np.testing.assert_array_equal(trajectories(chat_response([rev]), k=20)[0].entropy, tr.entropy)


def test_stream_chunks_equal_nonstream_n2():
    a, b = choice_steps(3, 11, 20), choice_steps(4, 6, 20)
    whole = trajectories(chat_response([a, b]))
    chunks = chat_stream([a, b])
    streamed = trajectories(chunks)
    assert sorted(streamed) == [0, 1]
    for i, steps in enumerate([a, b]):
        np.testing.assert_array_equal(streamed[i].entropy, _ref(steps, 20))
        np.testing.assert_array_equal(streamed[i].entropy, whole[i].entropy)
    # SSE payload strings (with the trailing [DONE]) parse the same
    sse = [f"data: {json.dumps(c)}" for c in chunks] + ["data: [DONE]"]
    np.testing.assert_array_equal(trajectories(sse)[1].entropy, whole[1].entropy)
    ch = extract_choices(chunks)
    assert ch[0].finish_reason == "stop" and len(ch[1].steps) == 6


def test_completions_format():
    steps = choice_steps(5, 8, 20)
    tr = trajectories(completion_response([steps]))[0]
    np.testing.assert_array_equal(tr.entropy, _ref(steps, 20))


def test_openai_sdk_objects():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    a, b = choice_steps(6, 5, 20), choice_steps(7, 4, 20)
    obj = ChatCompletion.model_validate(chat_response([a, b]))
    chunks = [ChatCompletionChunk.model_validate(c) for c in chat_stream([a, b])]
    for src in (obj, chunks):
        tr = trajectories(src)
        np.testing.assert_array_equal(tr[0].entropy, _ref(a, 20))
        np.testing.assert_array_equal(tr[1].entropy, _ref(b, 20))


def test_missing_logprobs_refused_and_error_block(top20):
    steps = choice_steps(8, 4, 20)
    with pytest.raises(MissingLogprobsError, match="top_logprobs=20"):
        trajectories(chat_response([steps], with_logprobs=False))
    with pytest.raises(MissingLogprobsError):
        trajectories(chat_stream([steps], with_logprobs=False))
    block = score_response(chat_response([steps], with_logprobs=False), top20[0])[0]
    assert block["reason"] == "missing_series" and "no logprobs" in block["error"]


def test_fewer_than_k_refuse_or_effective(top20):
    steps = choice_steps(9, 6, 20)
    steps[2] = steps[2][:5]  # a provider capped at 5 on one step
    steps[4] = steps[4][:7]
    resp = chat_response([steps])
    with pytest.raises(TooFewAlternativesError, match="step 2 has 5 alternatives"):
        trajectories(resp)
    tr = trajectories(resp, short_steps="effective")[0]
    np.testing.assert_array_equal(tr.entropy, _ref(steps, 20))
    assert tr.entropy[2] == pytest.approx(_h(steps[2]), rel=1e-12)
    assert (tr.effective_k, tr.short_steps) == (5, 2)
    refused = score_response(resp, top20[0])[0]
    assert refused["reason"] == "missing_series" and "fewer than k=20" in refused["error"]
    block = score_response(resp, top20[0], short_steps="effective")[0]
    assert block["effective_k"] == 5 and block["short_steps"] == 2 and block["k"] == 20
    # a step with no alternative at all is never scored
    steps[3] = steps[3][:0]
    with pytest.raises(TooFewAlternativesError):
        trajectories(chat_response([steps]), short_steps="effective")


def test_block_shape_and_p_correct_n2(top20):
    path, parts = top20
    a, b = choice_steps(10, 12, 20), choice_steps(11, 30, 20)
    scorer = TopLogprobsScorer(path)
    blocks = scorer.blocks(chat_response([a, b]), slice_label="gsm8k")
    for i, steps in enumerate([a, b]):
        bl = blocks[i]
        assert set(bl) == {"p_correct", "features", "entropy", "k", "n_steps", "model", "slice"}
        assert list(bl["features"]) == list(FEATURE_NAMES)
        x = compute_features(_ref(steps, 20))
        np.testing.assert_allclose([bl["features"][f] for f in FEATURE_NAMES], x, rtol=0, atol=0)
        assert bl["p_correct"] == pytest.approx(float(reference_p(parts, x[None])[0]), abs=1e-6)
        assert (bl["entropy"], bl["k"], bl["n_steps"], bl["slice"]) == (
            "topk",
            20,
            len(steps),
            "gsm8k",
        )
        assert bl["model"] == scorer.id


def test_sentinel_k_mismatch_and_full_refused(tmp_path, top20):
    from sentinel_vllm.sentinel_file import SentinelFileError

    with pytest.raises(SentinelFileError, match="trained on top-20 entropy; scoring top-5"):
        TopLogprobsScorer(top20[0], k=5)
    sc = TopLogprobsScorer(top20[0], k=5, allow_k_mismatch=True)
    steps = choice_steps(12, 7, 20)
    bl = sc.blocks(chat_response([steps]))[0]
    assert (bl["k"], bl["sentinel_k"]) == (5, 20)
    assert bl["features"]["sum"] == pytest.approx(float(_ref(steps, 5).sum()), rel=1e-12)
    full = tmp_path / "full.onnx"
    make_tiny_sentinel(full, entropy="full")
    with pytest.raises(SentinelFileError, match="full-vocabulary"):
        TopLogprobsScorer(full)


def test_not_a_response():
    with pytest.raises(ValueError, match="no 'choices'"):
        extract_choices({"object": "list", "data": []})


def test_blackbox_imports_neither_vllm_nor_torch():
    """API-only users install no vLLM: every blackbox module imports without vLLM and torch."""
    from test_layout import _import_blocked, _modules

    mods = _modules("sentinel_vllm.blackbox") + ["sentinel_vllm.cli.proxy"]
    assert {"sentinel_vllm.blackbox.proxy", "sentinel_vllm.blackbox.parse"} <= set(mods)
    r = _import_blocked(mods, ["vllm", "torch"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"ok {len(mods)}"
