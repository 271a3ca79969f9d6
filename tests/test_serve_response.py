"""Request id injection and response rewriting (sentinel_vllm.serving.api.response), no model."""

import json

from sentinel_vllm.serving.api.response import (
    SSERewriter,
    attach_blocks,
    final_chunk,
    new_sentinel_id,
    prepare_request,
)


def test_server_id_overwrites_client_id_and_strips_client_keys():
    body = {"model": "m", "messages": [], "n": 2,
            "vllm_xargs": {"sentinel_id": "victim-id", "sentinel_child": 1, "sentinel_n": 9,
                           "sentinel_slice": "gsm8k", "other": 3}}
    new, opts = prepare_request(body, "snt-server")
    assert new["vllm_xargs"] == {"sentinel_id": "snt-server", "sentinel_n": 2, "other": 3}
    assert opts.sentinel_id == "snt-server" and opts.slice == "gsm8k" and opts.n == 2
    assert opts.enabled and not opts.stream
    # the caller's dict is not modified
    assert body["vllm_xargs"]["sentinel_id"] == "victim-id"


def test_opt_out_removes_every_sentinel_key():
    new, opts = prepare_request({"vllm_xargs": {"sentinel": False, "sentinel_id": "x"},
                                 "stream": True}, "snt-1")
    assert "vllm_xargs" not in new
    assert not opts.enabled and opts.stream and opts.n == 1
    new, opts = prepare_request({"vllm_xargs": {"sentinel": "false"}}, "snt-1")
    assert not opts.enabled


def test_no_xargs_gets_id_and_bad_n_means_one():
    for bad in ("three", 0, -2, 2.5, None, [2], {"n": 2}):
        new, opts = prepare_request({"messages": [], "n": bad}, "snt-2")
        assert new["vllm_xargs"] == {"sentinel_id": "snt-2", "sentinel_n": 1}
        assert opts.n == 1 and new["n"] == bad  # left for vLLM to reject


def test_n_read_as_vllm_reads_it():
    # vLLM's pydantic request model reads "3" and 3.0 as n = 3 (lax mode); the
    # sentinel used to count them as n = 1, so both samples collided on child 0
    # and the response got one top-level block for several choices.
    for raw in ("3", 3.0, 3):
        new, opts = prepare_request({"messages": [], "n": raw}, "snt-2")
        assert new["vllm_xargs"] == {"sentinel_id": "snt-2", "sentinel_n": 3}
        assert opts.n == 3 and new["n"] == 3 and type(new["n"]) is int


def test_new_ids_are_unique():
    ids = {new_sentinel_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("snt-") and len(i) == 36 for i in ids)


def test_attach_top_level_for_n1_and_per_choice_for_n2():
    r = {"choices": [{"index": 0, "message": {}}]}
    attach_blocks(r, {0: {"p_correct": 0.5}}, 1)
    assert r["sentinel"] == {"p_correct": 0.5} and "sentinel" not in r["choices"][0]
    r = {"choices": [{"index": 1}, {"index": 0}]}
    attach_blocks(r, {0: {"p_correct": 0.1}, 1: {"p_correct": 0.9}}, 2)
    assert "sentinel" not in r
    assert r["choices"][0]["sentinel"]["p_correct"] == 0.9
    assert r["choices"][1]["sentinel"]["p_correct"] == 0.1
    r = {"choices": [{"index": 0}, {"index": 1}]}
    attach_blocks(r, {0: {"p_correct": 0.1}}, 2)  # a missing block is an error, not a KeyError
    assert "error" in r["choices"][1]["sentinel"]


def _events(data: bytes):
    return [e for e in data.split(b"\n\n") if e]


def test_sse_holds_back_done_across_arbitrary_splits():
    c1 = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
          "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    c2 = dict(c1, choices=[], usage={"completion_tokens": 3})
    stream = (b"data: " + json.dumps(c1).encode() + b"\n\n" + b"data: " + json.dumps(c2).encode()
              + b"\n\n" + b"data: [DONE]\n\n")
    for cut in range(1, len(stream)):
        rw = SSERewriter()
        out = rw.feed(stream[:cut]) + rw.feed(stream[cut:])
        assert rw.done
        assert out == stream[: -len(b"data: [DONE]\n\n")]
        assert rw.last_chunk == c2 and rw.usage == {"completion_tokens": 3}


def test_sse_without_done_flushes_remainder():
    rw = SSERewriter()
    out = rw.feed(b"data: {\"id\": 1}\n\ndata: partial")
    assert out == b"data: {\"id\": 1}\n\n" and not rw.done
    assert rw.flush() == b"data: partial"


def test_final_chunk_shapes():
    tmpl = {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": []}
    ch = final_chunk(tmpl, {0: {"p_correct": 0.3}}, 1)
    assert ch == {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m",
                  "choices": [], "sentinel": {"p_correct": 0.3}}
    ch = final_chunk(tmpl, {0: {"p_correct": 0.3}, 1: {"p_correct": 0.4}}, 2)
    assert "sentinel" not in ch
    assert [c["sentinel"]["p_correct"] for c in ch["choices"]] == [0.3, 0.4]
    assert ch["choices"][1] == {"index": 1, "finish_reason": None, "delta": {},
                                "sentinel": {"p_correct": 0.4}}
    ch = final_chunk(dict(tmpl, object="text_completion"), {0: {}, 1: {}}, 2)
    assert ch["choices"][0]["text"] == "" and "delta" not in ch["choices"][0]
    assert SSERewriter.encode({"a": 1}) == b'data: {"a":1}\n\n'
