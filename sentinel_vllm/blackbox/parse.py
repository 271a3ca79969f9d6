"""Parse OpenAI-compatible responses: the alternatives of each choice, token by token.

Accepts a JSON body (dict, str or bytes), an ``openai`` SDK object (``model_dump()``)
or the list of chunks of one stream (dicts, SSE ``data:`` payloads, SDK chunks).
Chat choices carry ``logprobs.content[t].top_logprobs`` (a list: every entry kept,
even two tokens with the same text); completions choices carry
``logprobs.top_logprobs[t]`` (an object keyed by decoded text). Rules and the
entropy: :mod:`sentinel_vllm.blackbox.client`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChoiceLogprobs", "add_choice", "as_dict", "extract_choices"]


@dataclass
class ChoiceLogprobs:
    """The alternatives of one choice, step by step.

    Attributes
    ----------
    index : int
        The choice's ``index``.
    steps : list of list of float
        Per generated token, the logprobs (nats, full softmax) of the alternatives
        the response lists, every entry kept.
    present : bool
        False if no ``logprobs`` object was seen for this choice.
    finish_reason : str or None
    overflow : int
        0, or the cap (``max_steps`` of :func:`add_choice`) the choice went past: its steps
        are then dropped (memory stays bounded) and it is not scored.
    chosen : list of float or None
        Per generated token, the drawn token's own logprob (chat ``content[t].logprob``,
        completions ``token_logprobs[t]``); None where the response has none.
    """

    index: int
    steps: list[list[float]] = field(default_factory=list)
    chosen: list[float | None] = field(default_factory=list)
    present: bool = False
    finish_reason: str | None = None
    overflow: int = 0


def as_dict(obj) -> Any:
    """A response or chunk as plain JSON data (dict/list), whatever form it came in.

    Accepts dicts, JSON text (str/bytes, an SSE ``data: ...`` line too), and
    objects with ``model_dump()`` (``openai`` SDK, pydantic) or ``to_dict()``.
    """
    if isinstance(obj, (bytes, bytearray)):
        obj = obj.decode()
    if isinstance(obj, str):
        s = obj.strip()
        if s.startswith("data:"):
            s = s[5:].strip()
        return json.loads(s)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj


def _step_values(entry) -> list[float] | None:
    """Alternatives of one chat ``logprobs.content`` entry."""
    if not isinstance(entry, dict):  # JSON objects are dicts (as_dict); no ABC check per token
        return None
    top = entry.get("top_logprobs")
    if top is None:
        return []
    return [a["logprob"] if type(a) is dict else a for a in top]


def add_choice(
    acc: dict[int, ChoiceLogprobs], choice: Mapping, pos: int, max_steps: int | None = None
) -> ChoiceLogprobs:
    """Fold one response or chunk choice into ``acc`` (per index; steps appended in order).

    ``max_steps``: a choice that would hold more steps is marked ``overflow`` and its steps
    are dropped (the proxy's bound on what one response may make it keep). Returns the
    choice's entry in ``acc``.
    """
    idx = int(choice.get("index", pos) or 0)
    c = acc.get(idx)
    if c is None:
        c = acc[idx] = ChoiceLogprobs(idx)
    if choice.get("finish_reason") is not None:
        c.finish_reason = choice["finish_reason"]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return c
    if isinstance(lp.get("content"), list) or "content" in lp:  # chat
        c.present = True
        for entry in lp.get("content") or ():
            vals = _step_values(entry)
            if vals is not None:
                c.steps.append(vals)
                c.chosen.append(entry.get("logprob"))
    elif "top_logprobs" in lp or "token_logprobs" in lp:  # completions
        c.present = True
        tops = lp.get("top_logprobs")
        own = lp.get("token_logprobs") or ()
        n = len(lp.get("tokens") or lp.get("token_logprobs") or tops or ())
        for t in range(n):
            step = tops[t] if tops is not None and t < len(tops) else None
            c.steps.append(list(step.values()) if isinstance(step, dict) else [])
            c.chosen.append(own[t] if t < len(own) else None)
    if max_steps is not None and (c.overflow or len(c.steps) > max_steps):
        c.overflow, c.steps, c.chosen = max_steps, [], []
    return c


def extract_choices(response) -> dict[int, ChoiceLogprobs]:
    """Per choice index, the alternatives of every generated token.

    Parameters
    ----------
    response : dict, str, bytes, SDK object, or list of chunks
        A whole chat/completions response, or the chunks of one stream in order.

    Returns
    -------
    dict of int to ChoiceLogprobs
        Sorted by index.

    Raises
    ------
    ValueError
        The input is not a response (no ``choices``) nor a list of chunks.
    """
    parts = response if isinstance(response, (list, tuple)) else [response]
    acc: dict[int, ChoiceLogprobs] = {}
    seen = False
    for part in parts:
        if isinstance(part, (str, bytes)) and part.strip().removeprefix(
            b"data:" if isinstance(part, bytes) else "data:"
        ).strip() in ("[DONE]", b"[DONE]"):
            continue
        obj = as_dict(part)
        if not isinstance(obj, dict):
            raise ValueError(f"not an OpenAI response or chunk: {type(obj).__name__}")
        choices = obj.get("choices")
        if choices is None:
            continue  # e.g. a usage-only chunk
        seen = True
        for pos, choice in enumerate(choices):
            add_choice(acc, choice, pos)
    if not seen:
        raise ValueError("not an OpenAI chat/completions response: no 'choices'")
    return dict(sorted(acc.items()))
