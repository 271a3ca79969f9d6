"""Request id injection and response rewriting (sentinel_vllm.serving.api.response), no model."""

import json

from sentinel_vllm.serving.api.response import (
    SSERewriter,
    attach_blocks,
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


def _sse(*objs):
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n"
                    for o in objs)


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}


def test_sse_holds_finish_and_usage_chunks_across_arbitrary_splits():
    c1 = dict(HEAD, choices=[{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])
    c2 = dict(HEAD, choices=[{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}])
    c3 = dict(HEAD, choices=[], usage={"completion_tokens": 3})
    stream = _sse(c1, c2, c3, b"[DONE]")
    for cut in range(1, len(stream)):
        rw = SSERewriter(1)
        out = rw.feed(stream[:cut]) + rw.feed(stream[cut:])
        assert rw.done and out == _sse(c1)  # only the content chunk went out
        assert rw.usage == {"completion_tokens": 3}
        rest = rw.release({0: {"p_correct": 0.25}})
        assert rest == (b'data: ' + json.dumps(dict(c2, sentinel={"p_correct": 0.25}),
                                               separators=(",", ":")).encode() + b"\n\n"
                        + b'data: ' + json.dumps(c3, separators=(",", ":")).encode() + b"\n\n"
                        + b"data: [DONE]\n\n")


def test_sse_n2_finish_chunks_get_their_own_block_no_extra_chunk():
    def ch(i, fin):
        return dict(HEAD, choices=[{"index": i, "text": "t", "finish_reason": fin}])

    rw = SSERewriter(2)
    out = rw.feed(_sse(ch(0, None), ch(0, "length"), ch(1, None)))
    assert out == _sse(ch(0, None), ch(1, None))  # choice 1 goes on while choice 0's finish waits
    out += rw.feed(_sse(ch(1, "stop"), b"[DONE]"))
    assert rw.done and out == _sse(ch(0, None), ch(1, None))
    chunks = [json.loads(e[6:]) for e in _events(rw.release({0: {"p": 0}, 1: {"p": 1}}))[:-1]]
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"], c["choices"][0]["sentinel"])
            for c in chunks] == [(0, "length", {"p": 0}), (1, "stop", {"p": 1})]
    assert all("sentinel" not in c for c in chunks)


def test_sse_responses_api_block_in_completed_event():
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"a"}'
    done = {"type": "response.completed", "sequence_number": 9,
            "response": {"id": "resp_1", "object": "response", "output": []}}
    done_ev = b"event: response.completed\ndata: " + json.dumps(done).encode()
    rw = SSERewriter(1)
    out = rw.feed(delta + b"\n\n" + done_ev + b"\n\n")
    assert out == delta + b"\n\n" and rw.done
    ev = rw.release({0: {"p_correct": 0.5}})
    head, data = ev.rstrip(b"\n").split(b"\n")
    assert head == b"event: response.completed"
    assert json.loads(data[6:])["response"]["sentinel"] == {"p_correct": 0.5}


def test_sse_without_done_flushes_held_and_remainder():
    fin = dict(HEAD, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
    rw = SSERewriter()
    out = rw.feed(b"data: {\"id\": 1}\n\n" + _sse(fin) + b"data: partial")
    assert out == b"data: {\"id\": 1}\n\n" and not rw.done
    assert rw.flush() == b'data: ' + json.dumps(fin, separators=(",", ":")).encode() + b"\n\ndata: partial"


def test_attach_blocks_responses_object_top_level():
    r = {"object": "response", "output": [{"type": "message"}]}
    attach_blocks(r, {0: {"p_correct": 0.7}}, 1)
    assert r["sentinel"] == {"p_correct": 0.7}
