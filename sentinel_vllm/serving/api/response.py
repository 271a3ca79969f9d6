"""Pure request/response rewriting of the OpenAI-compatible API (no vLLM, no I/O).

Request side (:func:`prepare_request`): the server sets
``vllm_xargs["sentinel_id"]`` itself on every chat/completions request,
overwriting any id a client sent, so no client can read or disturb another
request's worker state. Clients may pass only ``vllm_xargs.sentinel_slice`` (a
slice label) and ``vllm_xargs.sentinel = false`` (opt out).

Response side: :func:`attach_blocks` adds the ``sentinel`` block to a JSON
response (top level when ``n = 1`` and for a Responses API object, per choice
when ``n > 1``); :class:`SSERewriter` passes a ``text/event-stream`` through and
holds back only the chunks that carry a ``finish_reason`` (and the usage chunk)
or the final ``response.completed`` event until the blocks are ready, then
releases them with the blocks inside: no extra chunk, no repeated choice.
"""

from __future__ import annotations

import json
import uuid

from sentinel_vllm.serving.contract import XARG_ID, XARG_N, XARG_OPT, XARG_SLICE

__all__ = [
    "SentinelOptions",
    "prepare_request",
    "strip_client_keys",
    "is_client_key",
    "new_sentinel_id",
    "attach_blocks",
    "attach_stream_blocks",
    "SSERewriter",
    "SENTINEL_PATHS",
    "json_object",
]

# Endpoints whose requests are tracked.
SENTINEL_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def new_sentinel_id() -> str:
    """A fresh, unguessable sentinel id (``"snt-"`` + 32 hex digits)."""
    return "snt-" + uuid.uuid4().hex


class SentinelOptions:
    """What the server decided for one request.

    Attributes
    ----------
    sentinel_id : str or None
        The id set in ``vllm_xargs`` (None when the client opted out).
    slice : str or None
        The client's raw slice label (bound it with the metrics labeler).
    n : int
        Number of choices requested.
    stream : bool
    """

    __slots__ = ("sentinel_id", "slice", "n", "stream")

    def __init__(self, sentinel_id, slice_label, n, stream):
        self.sentinel_id, self.slice, self.n, self.stream = sentinel_id, slice_label, n, stream

    @property
    def enabled(self) -> bool:
        """False when the client opted out."""
        return self.sentinel_id is not None


def json_object(raw: bytes, loads=json.loads) -> dict | None:
    """A client body's JSON object, or None: not JSON, nested too deeply for the parser
    (``RecursionError``), or not an object. The caller then forwards the body untouched
    and lets the server answer it. ``loads``: the parser (the proxy passes its own)."""
    try:
        obj = loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def is_client_key(key) -> bool:
    """True for a key the sentinel reserves (``sentinel`` and every ``sentinel*`` key).

    Such keys in a client's ``vllm_xargs`` are read by the API side (slice,
    opt-out) and never reach the engine: the worker tracks only ids the server
    minted (:data:`~sentinel_vllm.serving.contract.CLIENT_KEYS` and any future
    ``sentinel_*`` key alike).
    """
    return isinstance(key, str) and key.lower().startswith("sentinel")


def strip_client_keys(body: dict) -> tuple[dict, dict]:
    """Remove every sentinel key a client put where vLLM reads ``extra_args``.

    vLLM copies ``vllm_xargs`` (chat, completions, responses, messages, speech)
    and ``sampling_params.extra_args`` (token-in/token-out ``generate``) into
    ``SamplingParams.extra_args``, where the worker looks for
    ``sentinel_id``; both are cleaned.

    Parameters
    ----------
    body : dict
        Parsed JSON request body (not modified).

    Returns
    -------
    (dict, dict)
        The body without those keys (the same object when nothing was removed;
        an emptied ``vllm_xargs`` is dropped) and the removed ``vllm_xargs``
        keys with their values.
    """
    removed: dict = {}
    out = body
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and any(is_client_key(k) for k in xargs):
        removed = {k: v for k, v in xargs.items() if is_client_key(k)}
        kept = {k: v for k, v in xargs.items() if not is_client_key(k)}
        out = dict(body)
        if kept:
            out["vllm_xargs"] = kept
        else:
            out.pop("vllm_xargs")
    sp = body.get("sampling_params")
    extra = sp.get("extra_args") if isinstance(sp, dict) else None
    if isinstance(extra, dict) and any(is_client_key(k) for k in extra):
        kept = {k: v for k, v in extra.items() if not is_client_key(k)}
        out = dict(out) if out is body else out
        out["sampling_params"] = dict(sp, extra_args=kept or None)
    return out, removed


def prepare_request(body: dict, sentinel_id: str, *, has_n: bool = True
                    ) -> tuple[dict, SentinelOptions]:
    """Rewrite a request body so the worker tracks it under a server-chosen id.

    Parameters
    ----------
    body : dict
        Parsed JSON of a ``/v1/chat/completions`` or ``/v1/completions`` request.
    sentinel_id : str
        The id to set (e.g. :func:`new_sentinel_id`).
    has_n : bool
        False for endpoints without ``n`` (``/v1/responses``): one choice,
        whatever the body says.

    Returns
    -------
    (dict, SentinelOptions)
        A new body (the input is not modified) whose ``vllm_xargs`` holds
        ``sentinel_id`` and ``sentinel_n`` (unless the client sent
        ``sentinel: false``) and none of the client's sentinel keys
        (:func:`is_client_key`: ``sentinel_id``, ``sentinel_slice``, ``sentinel``,
        ``sentinel_child``, ``sentinel_n``, any other ``sentinel*``), with ``n``
        written as a JSON integer when the client sent one vLLM coerces
        (``"3"``, ``3.0``); and the options.
    """
    body, client = strip_client_keys(body)
    body = dict(body)
    xargs = body.get("vllm_xargs")
    xargs = dict(xargs) if isinstance(xargs, dict) else {}
    opt_out = client.get(XARG_OPT) is False or str(client.get(XARG_OPT)).lower() in (
        "false",
        "0",
        "off",
    )
    slice_label = client.get(XARG_SLICE)
    n = _requested_n(body.get("n")) if has_n else 1
    if n is None:
        n = 1  # absent or invalid (vLLM rejects an invalid n itself)
    elif has_n and (body.get("n") != n or type(body.get("n")) is not int):
        body["n"] = n  # "3" or 3.0: vLLM's pydantic model would read 3; make that explicit
    if not opt_out:
        xargs[XARG_ID] = sentinel_id
        xargs[XARG_N] = n  # the worker's child bookkeeping (serving/worker/identity.py)
    if xargs:
        body["vllm_xargs"] = xargs
    else:
        body.pop("vllm_xargs", None)
    opts = SentinelOptions(None if opt_out else sentinel_id, slice_label, n, body.get("stream") is True)
    return body, opts


def _requested_n(raw) -> int | None:
    """``n`` as vLLM's request model (pydantic, lax mode) reads it, or None.

    vLLM accepts ``"3"`` and ``3.0`` as ``n = 3`` and ``true`` as 1; the
    sentinel's choice bookkeeping (``sentinel_n``, blocks per choice) must
    agree with the number of choices vLLM will really generate.
    """
    if raw is None:
        return None
    try:
        from pydantic import TypeAdapter

        n = TypeAdapter(int).validate_python(raw)
    except ImportError:  # no pydantic (no vLLM server either): JSON integers only
        n = raw if isinstance(raw, int) else None
    except Exception:  # noqa: BLE001 (pydantic.ValidationError: not an integer)
        return None
    return int(n) if n is not None and n > 0 else None


_MISSING = {"error": "no sentinel result", "reason": "internal"}
#: Last event of a Responses API stream (there is no ``data: [DONE]``).
RESPONSES_FINAL = ("response.completed", "response.incomplete", "response.failed")


def finish_reasons(obj) -> dict[int, str]:
    """``{choice index: finish_reason}`` of a response object or a stream chunk (final ones only).

    A Responses API object has one output (index 0): ``"length"`` when it is
    ``incomplete`` for ``max_output_tokens``, else ``"stop"`` once completed.
    Used by feature sets with the ``length`` group (``truncated`` =
    ``finish_reason == "length"``).
    """
    if not isinstance(obj, dict):
        return {}
    resp = obj.get("response") if isinstance(obj.get("response"), dict) else obj
    if resp.get("object") == "response":
        details = resp.get("incomplete_details") or {}
        if resp.get("status") == "incomplete" and isinstance(details, dict):
            return {0: "length" if details.get("reason") == "max_output_tokens" else "stop"}
        return {0: "stop"} if resp.get("status") == "completed" else {}
    out = {}
    for pos, c in enumerate(obj.get("choices") or ()):
        if isinstance(c, dict) and c.get("finish_reason") is not None:
            try:
                out[int(c.get("index", pos) or 0)] = str(c["finish_reason"])
            except (TypeError, ValueError):
                continue
    return out


def attach_blocks(response: dict, blocks: dict[int, dict], n: int) -> dict:
    """Add the sentinel block(s) to a non-streaming JSON response, in place.

    Parameters
    ----------
    response : dict
        ``chat.completion``, ``text_completion`` or ``response`` (Responses API) object.
    blocks : dict of int to dict
        Block per choice index.
    n : int
        Choices requested: with ``n == 1`` the block goes to the top level,
        otherwise into each choice (matched by its ``index``). A Responses
        object has one output: its block is top level.

    Returns
    -------
    dict
        ``response``.
    """
    if response.get("object") == "response" or (
            n == 1 and len(response.get("choices") or ()) <= 1):
        response["sentinel"] = blocks.get(0, _MISSING)
        return response
    for choice in response.get("choices") or ():
        idx = choice.get("index", 0)
        choice["sentinel"] = blocks.get(idx, _MISSING)
    return response


class SSERewriter:
    """Incremental rewriter of a ``text/event-stream`` body: blocks ride on the finish chunks.

    Feed body pieces with :meth:`feed`; it returns the bytes to forward now. Every
    event passes through unchanged and in order, except the ones that must carry
    the block, which are held back until the stream's end is seen:

    * chat / completions: each chunk that carries a choice's ``finish_reason``
      (and the usage chunk, ``"choices": []``, sent only when the client asked
      ``stream_options.include_usage``, so that it stays last); the end is
      ``data: [DONE]``;
    * Responses API: the final ``response.completed`` (``.incomplete``,
      ``.failed``) event, which is the end.

    Once :attr:`done` is set the caller fetches the blocks and calls
    :meth:`release`, which returns the held events with the blocks in them: for
    ``n == 1`` the top-level ``"sentinel"`` of the finish chunk, for ``n > 1``
    each finished choice's ``"sentinel"``, for a Responses stream
    ``response.sentinel``. No chunk is added, none repeated, so the plain
    ``for chunk in stream: chunk.choices[0]`` loop of OpenAI clients keeps working.
    """

    DONE = b"data: [DONE]\n\n"

    def __init__(self, n: int = 1):
        self.n = n
        self._buf = b""
        self._held: list[tuple[list[bytes], dict]] = []
        self._tail = b""
        self.done = False
        self.usage: dict | None = None
        self.finish_reasons: dict[int, str] = {}  # per choice, from the held events

    def feed(self, data: bytes) -> bytes:
        """Consume bytes; return the bytes to forward now."""
        if self.done:
            return data
        self._buf += data
        out = []
        while True:
            cut, sep = _find_event_end(self._buf)
            if cut < 0:
                break
            event, self._buf = self._buf[:cut], self._buf[cut + sep :]
            payload = _event_data(event)
            if payload is not None and payload.strip() == b"[DONE]":
                self.done = True
                self._tail, self._buf = event + b"\n\n" + self._buf, b""
                break
            obj = _json(payload)
            kind = self._kind(obj)
            if kind is None:
                out.append(event + b"\n\n")
                continue
            self._held.append(([ln for ln in event.splitlines() if not ln.startswith(b"data:")], obj))
            self.finish_reasons.update(finish_reasons(obj))
            if kind == "final":
                self.done = True
                self._tail, self._buf = self._buf, b""
                break
        return b"".join(out)

    def _kind(self, obj) -> str | None:
        if not isinstance(obj, dict):
            return None
        if obj.get("type") in RESPONSES_FINAL and isinstance(obj.get("response"), dict):
            return "final"
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return None
        if not choices and obj.get("usage"):
            self.usage = obj["usage"]
            return "usage"
        if any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices):
            return "finish"
        return None

    def release(self, blocks: dict[int, dict]) -> bytes:
        """The held events with the blocks attached, then whatever followed the end."""
        out = []
        for other, obj in self._held:
            attach_stream_blocks(obj, blocks, self.n)
            out.append(b"\n".join([*other, b"data: " + json.dumps(obj, separators=(",", ":")).encode()])
                       + b"\n\n")
        out.append(self._tail)
        self._held, self._tail = [], b""
        return b"".join(out)

    def flush(self) -> bytes:
        """Held events (unchanged) and any incomplete trailing bytes, at an early end of stream."""
        out = [b"\n".join([*other, b"data: " + json.dumps(obj, separators=(",", ":")).encode()])
               + b"\n\n" for other, obj in self._held]
        rest, self._buf, self._held = self._buf, b"", []
        return b"".join(out) + rest


def attach_stream_blocks(chunk: dict, blocks: dict[int, dict], n: int) -> dict:
    """Put the block(s) into one held stream event, in place (see :class:`SSERewriter`)."""
    if chunk.get("type") in RESPONSES_FINAL and isinstance(chunk.get("response"), dict):
        chunk["response"]["sentinel"] = blocks.get(0, _MISSING)
        return chunk
    choices = chunk.get("choices") or []
    for pos, c in enumerate(choices):
        if not isinstance(c, dict) or c.get("finish_reason") is None:
            continue
        block = blocks.get(int(c.get("index", pos) or 0), _MISSING)
        if n == 1 and len(choices) == 1:
            chunk["sentinel"] = block
        else:
            c["sentinel"] = block
    return chunk


def _json(payload: bytes | None):
    if payload is None:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _find_event_end(buf: bytes) -> tuple[int, int]:
    """Index of the first event separator and its length, or (-1, 0)."""
    best, length = -1, 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep)
        if i >= 0 and (best < 0 or i < best):
            best, length = i, len(sep)
    return best, length


def _event_data(event: bytes) -> bytes | None:
    lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
