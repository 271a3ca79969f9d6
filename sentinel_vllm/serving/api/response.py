"""Pure request/response rewriting of the OpenAI-compatible API (no vLLM, no I/O).

Request side (:func:`prepare_request`): the server sets
``vllm_xargs["sentinel_id"]`` itself on every chat/completions request,
overwriting any id a client sent, so no client can read or disturb another
request's worker state. Clients may pass only ``vllm_xargs.sentinel_slice`` (a
slice label) and ``vllm_xargs.sentinel = false`` (opt out).

Response side: :func:`attach_blocks` adds the ``sentinel`` block to a JSON
response (top level when ``n = 1``, per choice when ``n > 1``);
:class:`SSERewriter` passes a ``text/event-stream`` through untouched and, when
it meets ``data: [DONE]``, lets the caller insert one extra chunk
(:func:`final_chunk`) that carries the block(s).
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
    "final_chunk",
    "SSERewriter",
    "SENTINEL_PATHS",
]

# Endpoints whose requests are tracked.
SENTINEL_PATHS = ("/v1/chat/completions", "/v1/completions")


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


def attach_blocks(response: dict, blocks: dict[int, dict], n: int) -> dict:
    """Add the sentinel block(s) to a non-streaming JSON response, in place.

    Parameters
    ----------
    response : dict
        ``chat.completion`` or ``text_completion`` object.
    blocks : dict of int to dict
        Block per choice index.
    n : int
        Choices requested: with ``n == 1`` the block goes to the top level,
        otherwise into each choice (matched by its ``index``).

    Returns
    -------
    dict
        ``response``.
    """
    if n == 1 and len(response.get("choices") or ()) <= 1:
        response["sentinel"] = blocks.get(0, {"error": "no sentinel result", "reason": "internal"})
        return response
    for choice in response.get("choices") or ():
        idx = choice.get("index", 0)
        choice["sentinel"] = blocks.get(idx, {"error": "no sentinel result", "reason": "internal"})
    return response


def final_chunk(template: dict | None, blocks: dict[int, dict], n: int) -> dict:
    """The extra SSE chunk sent just before ``data: [DONE]``.

    Parameters
    ----------
    template : dict or None
        A previous chunk of the stream (its ``id``, ``object``, ``created`` and
        ``model`` are copied).
    blocks : dict of int to dict
    n : int

    Returns
    -------
    dict
        ``{"id", "object", "created", "model", "choices": [], "sentinel": block}``
        for ``n == 1``; for ``n > 1`` ``choices`` holds
        ``{"index": i, "delta": {}, "sentinel": block_i}`` (``"text": ""`` for
        completions) and there is no top-level block.
    """
    template = template or {}
    chunk = {k: template[k] for k in ("id", "object", "created", "model") if k in template}
    chunk["choices"] = []
    if n == 1:
        chunk["sentinel"] = blocks.get(0, {"error": "no sentinel result", "reason": "internal"})
        return chunk
    is_chat = str(template.get("object", "chat.completion.chunk")).startswith("chat")
    for i in range(n):
        c = {"index": i, "finish_reason": None}
        c.update({"delta": {}} if is_chat else {"text": ""})
        c["sentinel"] = blocks.get(i, {"error": "no sentinel result", "reason": "internal"})
        chunk["choices"].append(c)
    return chunk


class SSERewriter:
    """Incremental parser of a ``text/event-stream`` body that holds back ``[DONE]``.

    Feed body pieces with :meth:`feed`; it returns the bytes to forward now
    (complete events up to, not including, ``data: [DONE]``). :attr:`done` is
    set once ``[DONE]`` was seen; the caller then sends its own chunk
    (:meth:`encode`) followed by :attr:`DONE`. :attr:`last_chunk` keeps the last
    JSON chunk (template for the final one) and :attr:`usage` the last usage seen.
    """

    DONE = b"data: [DONE]\n\n"

    def __init__(self):
        self._buf = b""
        self.done = False
        self.last_chunk: dict | None = None
        self.usage: dict | None = None

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
                out.append(self._buf)  # anything after [DONE] (should be nothing)
                self._buf = b""
                break
            if payload is not None:
                self._inspect(payload)
            out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """Bytes still held back (an incomplete trailing event) at end of stream."""
        rest, self._buf = self._buf, b""
        return rest

    def _inspect(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if isinstance(obj, dict):
            if "id" in obj:
                self.last_chunk = obj
            if obj.get("usage"):
                self.usage = obj["usage"]

    @staticmethod
    def encode(chunk: dict) -> bytes:
        """One SSE event for a JSON chunk."""
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


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
