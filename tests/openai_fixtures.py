"""Hand-made OpenAI-format responses (chat, completions; whole, streamed) for the black-box tests.

Shapes follow the OpenAI API reference (and vLLM's server): chat choices carry
``logprobs.content[t] = {"token", "logprob", "bytes", "top_logprobs": [...]}``;
completions choices carry ``logprobs = {"tokens", "token_logprobs",
"top_logprobs": [{text: logprob}], "text_offset"}``; stream chunks carry the same
per token, the finish_reason on the last chunk of each choice.
"""

import numpy as np


def step_logprobs(rng, k, vocab=200):
    """The k largest logprobs (descending) of a random full softmax over ``vocab`` tokens."""
    x = rng.normal(0.0, 2.5, size=vocab)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    return np.sort(lp)[::-1][:k]


def choice_steps(seed, n_steps, k):
    """Per step, the k largest logprobs of a random distribution (list of arrays)."""
    rng = np.random.default_rng(seed)
    return [step_logprobs(rng, k) for _ in range(n_steps)]


def _entry(t, lps, sampled=0):
    tok = f"tok{t}_{sampled}"
    return {
        "token": tok,
        "logprob": float(lps[sampled]) if len(lps) else -1.0,
        "bytes": list(tok.encode()),
        "top_logprobs": [
            {"token": f"tok{t}_{j}", "logprob": float(v), "bytes": list(f"tok{t}_{j}".encode())}
            for j, v in enumerate(lps)
        ],
    }


def chat_response(steps_per_choice, *, with_logprobs=True, model="m"):
    """A ``chat.completion`` with one choice per element of ``steps_per_choice``."""
    choices = []
    for i, steps in enumerate(steps_per_choice):
        content = "".join(f"tok{t}_0" for t in range(len(steps)))
        lp = {"content": [_entry(t, s) for t, s in enumerate(steps)], "refusal": None}
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "logprobs": lp if with_logprobs else None,
                "finish_reason": "stop",
            }
        )
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


def chat_stream(steps_per_choice, *, with_logprobs=True, model="m", usage_chunk=True):
    """The chunks of a streamed ``chat.completion.chunk`` response, choices interleaved."""
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [
        dict(
            base,
            choices=[
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
        for i in range(len(steps_per_choice))
    ]
    longest = max(len(s) for s in steps_per_choice)
    for t in range(longest):
        for i, steps in enumerate(steps_per_choice):
            if t >= len(steps):
                continue
            last = t == len(steps) - 1
            lp = {"content": [_entry(t, steps[t])], "refusal": None} if with_logprobs else None
            chunks.append(
                dict(
                    base,
                    choices=[
                        {
                            "index": i,
                            "delta": {"content": f"tok{t}_0"},
                            "logprobs": lp,
                            "finish_reason": "stop" if last else None,
                        }
                    ],
                )
            )
    if usage_chunk:
        chunks.append(
            dict(
                base,
                choices=[],
                usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            )
        )
    return chunks


def completion_response(steps_per_choice, *, model="m"):
    """A ``text_completion`` whose ``top_logprobs`` are keyed by decoded text."""
    choices = []
    for i, steps in enumerate(steps_per_choice):
        toks = [f"tok{t}_0" for t in range(len(steps))]
        choices.append(
            {
                "index": i,
                "text": "".join(toks),
                "finish_reason": "length",
                "logprobs": {
                    "tokens": toks,
                    "token_logprobs": [float(s[0]) for s in steps],
                    "top_logprobs": [
                        {f"tok{t}_{j}": float(v) for j, v in enumerate(s)}
                        for t, s in enumerate(steps)
                    ],
                    "text_offset": list(range(len(steps))),
                },
            }
        )
    return {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": choices,
    }
