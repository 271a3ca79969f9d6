"""Pure request/response rewriting of the proxy (no I/O): logprobs asked and stripped, SSE events.

Used by :mod:`sentinel_vllm.blackbox.proxy`. JSON goes through orjson when it is
installed (3x faster on bodies with 20 alternatives per token, the proxy's main
cost), else the standard library.
"""

from __future__ import annotations

import json

from sentinel_vllm.serving.api.response import strip_client_keys
from sentinel_vllm.serving.contract import XARG_OPT, XARG_SLICE

__all__ = [
    "HOP_HEADERS",
    "EventSplitter",
    "EventTooLarge",
    "LogprobsAsk",
    "client_options",
    "dumps",
    "error_body",
    "loads",
    "sse_error",
    "upstream_error",
]

HOP_HEADERS = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}

try:  # 3x faster parsing of bodies with 20 alternatives per token (the proxy's main cost)
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    loads = json.loads

    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


def error_body(status: int, message: str, kind: str) -> dict:
    """The OpenAI error envelope ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": kind, "code": status}}


def sse_error(status: int, message: str, kind: str) -> bytes:
    """The ``event: error`` that ends a stream the proxy cannot finish (OpenAI error envelope)."""
    return b"event: error\ndata: " + dumps(error_body(status, message, kind)) + b"\n\n"


class EventTooLarge(ValueError):
    """An SSE event (bytes without an event separator) longer than the bound."""


class EventSplitter:
    """SSE events out of the reads of a stream, each byte scanned once.

    Separators are ``\\n\\n``, ``\\r\\n\\r\\n`` and ``\\r\\r`` (the first one found
    ends an event), as in the in-engine rewriting. The pending bytes of an unfinished
    event are bounded by ``max_event_bytes`` (:class:`EventTooLarge` beyond it), so a
    stream that never ends an event cannot grow the proxy's memory.
    """

    SEPS = (b"\n\n", b"\r\n\r\n", b"\r\r")

    def __init__(self, max_event_bytes: int):
        self.max_event_bytes = int(max_event_bytes)
        self._buf = bytearray()
        self._cr = False  # a \r was seen: the three separators are searched, else only \n\n

    def feed(self, data: bytes) -> list[bytes]:
        """The events completed by ``data`` (without their separator), in order."""
        buf = self._buf
        self._cr = self._cr or b"\r" in data
        if not buf and not self._cr:  # the usual read: whole events, split in C
            *events, rest = data.split(b"\n\n")
            buf += rest
            self._check(buf)
            return events
        start = max(len(buf) - 3, 0)  # a separator may straddle the previous read
        buf += data
        events, begin = [], 0
        if not self._cr:
            while (i := buf.find(b"\n\n", start)) >= 0:
                events.append(bytes(buf[begin:i]))
                begin = start = i + 2
        else:
            nxt = {sep: buf.find(sep, start) for sep in self.SEPS}
            while True:
                found = [(i, len(sep)) for sep, i in nxt.items() if i >= 0]
                if not found:
                    break
                i, n = min(found)
                events.append(bytes(buf[begin:i]))
                begin = start = i + n
                for sep, j in nxt.items():  # only those now behind us are searched again
                    if 0 <= j < start:
                        nxt[sep] = buf.find(sep, start)
        if begin:
            del buf[:begin]
        self._check(buf)
        return events

    def _check(self, buf: bytearray) -> None:
        if len(buf) > self.max_event_bytes:
            raise EventTooLarge(f"an upstream event is longer than {self.max_event_bytes} bytes")

    def rest(self) -> bytes:
        """The bytes after the last separator (the end of a stream without a final one)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


def upstream_error(exc) -> tuple[int, str, str]:
    """``(status, message, type)`` for an httpx failure: 504 for a timeout, else 502."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return 504, f"upstream timed out ({type(exc).__name__})", "upstream_timeout"
    return 502, f"upstream unreachable or failed: {type(exc).__name__}: {exc}", "upstream_error"


class LogprobsAsk:
    """What the client asked for, and the upstream request changed to carry ``want`` alternatives.

    Parameters
    ----------
    body : dict
        The parsed request body; modified in place (``logprobs``/``top_logprobs``).
    chat : bool
        ``/v1/chat/completions`` (else ``/v1/completions``).
    want : int
        Alternatives per token the sentinel needs.
    """

    def __init__(self, body: dict, chat: bool, want: int):
        self.chat, self.n = chat, _int(body.get("n"), 1)
        lp = body.get("logprobs")
        if chat:
            self.client_lp = lp is True
            self.client_top = _int(body.get("top_logprobs"), 0) if self.client_lp else 0
            if self.client_lp or body.get("top_logprobs") is None:  # else: the upstream judges it
                body["logprobs"] = True
                body["top_logprobs"] = max(self.client_top, want)
        else:
            self.client_lp = lp is not None and lp is not False and _int(lp, -1) >= 0
            self.client_top = _int(lp, 0) if self.client_lp else 0
            body["logprobs"] = max(self.client_top, want)
        self.want = want
        self.stream = body.get("stream") is True
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(
            prompt[0], int) else 1
        #: choices the answer may carry (n per prompt): the proxy keeps alternatives for no more
        self.max_choices = max(self.n, 1) * max(prompts, 1)

    def strip(self, choice: dict) -> bool:
        """Make ``choice``'s logprobs what the client asked for; True if changed."""
        lp = choice.get("logprobs")
        if lp is None or (self.client_lp and self.client_top >= self.want):
            return False
        if not self.client_lp:
            choice["logprobs"] = None
            return True
        m = self.client_top
        if self.chat:
            for e in lp.get("content") or ():
                if isinstance(e, dict) and isinstance(e.get("top_logprobs"), list):
                    e["top_logprobs"] = sorted(e["top_logprobs"], key=lambda a: -a["logprob"])[:m]
        else:
            toks = lp.get("tokens") or []
            tops = lp.get("top_logprobs") or []
            for t, d in enumerate(tops):
                if isinstance(d, dict):
                    keep = dict(sorted(d.items(), key=lambda kv: -kv[1])[:m])
                    if t < len(toks) and toks[t] in d:
                        keep[toks[t]] = d[toks[t]]  # the sampled token stays, as the server does
                    tops[t] = keep
        return True


def _int(v, default: int) -> int:
    if isinstance(v, bool) or v is None:
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def client_options(body: dict, headers) -> tuple[dict, bool, str | None]:
    """The body without any sentinel key, whether the client wants the sentinel, its raw slice.

    The keys are those the in-engine server takes (``vllm_xargs.sentinel_slice``,
    ``vllm_xargs.sentinel = false``; every ``sentinel*`` key is removed, by
    :func:`~sentinel_vllm.serving.api.response.strip_client_keys`), or the headers
    ``X-Sentinel-Slice`` and ``X-Sentinel: off``.
    """
    body, mine = strip_client_keys(body)
    off = str(mine.get(XARG_OPT, headers.get("x-sentinel", ""))).lower() in ("false", "0", "off")
    return body, not off, mine.get(XARG_SLICE, headers.get("x-sentinel-slice"))
