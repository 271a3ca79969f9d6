"""The response side of the middleware: an ASGI ``send`` wrapper (JSON body or SSE stream).

The pure rewriting rules (where a block goes) are in
:mod:`sentinel_vllm.serving.api.response`; this wrapper applies them to what vLLM
sends: a JSON body is buffered and rewritten with its ``content-length`` fixed;
an SSE stream flows through :class:`~sentinel_vllm.serving.api.response.SSERewriter`,
which holds back only the finish / usage / ``response.completed`` events until the
blocks are ready. A non-200 answer passes untouched.
"""

from __future__ import annotations

import json
import logging

from sentinel_vllm.serving.api.response import SSERewriter, attach_blocks, finish_reasons
from sentinel_vllm.serving.api.scoring import error_block

__all__ = ["ResponseRewriter"]

log = logging.getLogger("sentinel_vllm.serving")


class ResponseRewriter:
    """ASGI ``send`` wrapper that adds the sentinel blocks to a 200 response.

    Parameters
    ----------
    send : ASGI send callable
    blocks_fn : async callable ``(n, finish_reasons) -> {choice index: block}``
        Called once, when the response is complete (JSON) or the stream reached
        its end; never for a non-200 answer. ``finish_reasons``: ``{choice index:
        finish_reason}`` read from the response (the ``length`` features need it).
    n : int
        Choices requested.

    Attributes
    ----------
    status : int or None
        Status vLLM answered (None until it started the response).
    completed : bool
        The blocks were asked for (the worker state was fetched and freed).
    """

    def __init__(self, send, blocks_fn, n: int):
        self._send, self._blocks_fn, self.n = send, blocks_fn, n
        self.mode, self.start, self.completed, self.status = None, None, False, None
        self._buf: list[bytes] = []
        self._sse = SSERewriter(n)

    async def _blocks(self, finish: dict[int, str]) -> dict[int, dict]:
        try:
            return await self._blocks_fn(self.n, finish)
        except Exception as exc:  # noqa: BLE001 (the response must be served)
            log.exception("sentinel blocks")
            return {i: error_block(f"{type(exc).__name__}: {exc}", "internal") for i in range(self.n)}

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
            self.status = message.get("status")
            if message.get("status") != 200:
                self.mode = "pass"
            elif ctype.startswith(b"text/event-stream"):
                self.mode = "sse"
            else:
                self.mode, self.start = "json", message
                return
            return await self._send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self._send(message)
        body, more = message.get("body", b""), message.get("more_body", False)
        if self.mode == "sse":
            out = self._sse.feed(body)
            if self._sse.done and not self.completed:
                self.completed = True
                out += self._sse.release(await self._blocks(self._sse.finish_reasons))
            if not more:
                out += self._sse.flush()
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self._buf.append(body)
        if more:
            return
        data = b"".join(self._buf)
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or ("choices" not in obj and obj.get("object") != "response"):
                raise ValueError("not a completion object")
        except ValueError:
            pass
        else:
            blocks = await self._blocks(finish_reasons(obj))
            data = json.dumps(attach_blocks(obj, blocks, self.n)).encode()
            self.completed = True
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await self._send(dict(self.start, headers=headers))
        await self._send({"type": "http.response.body", "body": data, "more_body": False})
