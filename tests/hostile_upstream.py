"""An upstream that behaves as an attacker would (raw HTTP/1.1 on asyncio, bytes made on the fly).

The request's ``model`` (POST) or the path (GET) picks the behaviour:

* ``huge``: a 200 JSON answer of ``HUGE_BYTES`` (300 MB), chunked, no length given;
* ``huge_cl``: the same with ``Content-Length`` (the proxy can refuse before reading);
* ``drip``: a 200 JSON answer that sends one byte every 20 ms, forever;
* ``endless``: an SSE stream of chunks with 20 alternatives each, one per 2 ms, forever;
* ``long``: an SSE stream of ``max_tokens`` chunks with 20 alternatives, then the finish;
* ``noend``: an SSE stream whose one event never ends (1 MB pieces without a separator);
* ``GET /v1/endless``: a plain body that never ends (the proxy's pass-through path).

Nothing is held: every body is one cached piece written again and again, so 300 MB cost
the upstream no memory. :class:`HostileUpstream` serves from a thread of the test process.
"""

import asyncio
import contextlib
import json
import threading

HUGE_BYTES = 300 * 10**6
PIECE = 1 << 20


def _entry(t: int) -> dict:
    alts = [{"token": f"t{j}", "logprob": -0.1 - 0.25 * j, "bytes": [116]} for j in range(20)]
    return {"token": f"t{t}", "logprob": -0.1, "bytes": [116], "top_logprobs": alts}


def _chunk(t: int, finish: str | None = None) -> bytes:
    c = {"index": 0, "delta": {"content": "x"}, "logprobs": {"content": [_entry(t)]},
         "finish_reason": finish}
    obj = {"id": "h", "object": "chat.completion.chunk", "created": 1, "model": "h", "choices": [c]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class HostileUpstream:
    """Serve the behaviours above on 127.0.0.1 (``url``), in a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = None

        async def main():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        def run():
            with contextlib.suppress(RuntimeError):  # stop() ends the loop under serve_forever
                self.loop.run_until_complete(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {k.lower(): v.strip() for k, v in
                       (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = {}
            if method == "POST":
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
            what = body.get("model") if method == "POST" else "get_" + path.split("?")[0].rsplit("/", 1)[-1]
            await getattr(self, f"_{what}")(writer, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the proxy hung up: what an attacker's upstream sees
        finally:
            writer.close()

    @staticmethod
    async def _start(writer, ctype: str, length: int | None = None):
        size = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\n{size}\r\n"
                     "connection: close\r\n\r\n".encode())
        await writer.drain()

    async def _huge(self, writer, body, *, with_length=False):
        head = b'{"id":"h","object":"chat.completion","choices":[{"index":0,"logprobs":{"content":['
        entry = json.dumps(_entry(0)).encode() + b","
        piece = entry * (PIECE // len(entry))
        await self._start(writer, "application/json", HUGE_BYTES if with_length else None)
        sent = 0
        while sent < HUGE_BYTES:
            data = head if sent == 0 else piece[: HUGE_BYTES - sent]
            writer.write(data if with_length else _http_chunk(data))
            sent += len(data)
            await writer.drain()
        if not with_length:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _huge_cl(self, writer, body):
        await self._huge(writer, body, with_length=True)

    async def _drip(self, writer, body):
        await self._start(writer, "application/json")
        writer.write(_http_chunk(b'{"choices": ['))
        while True:
            await asyncio.sleep(0.02)
            writer.write(_http_chunk(b" "))
            await writer.drain()

    async def _endless(self, writer, body):
        await self._start(writer, "text/event-stream")
        t = 0
        while True:
            writer.write(_http_chunk(_chunk(t)))
            await writer.drain()
            t += 1
            await asyncio.sleep(0.002)

    async def _long(self, writer, body):
        n = int(body["max_tokens"])
        await self._start(writer, "text/event-stream")
        for t in range(n):
            writer.write(_http_chunk(_chunk(t, "length" if t == n - 1 else None)))
        writer.write(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def _noend(self, writer, body):
        await self._start(writer, "text/event-stream")
        writer.write(_http_chunk(b'data: {"choices": ['))
        piece = b"1," * (PIECE // 2)
        while True:
            writer.write(_http_chunk(piece))
            await writer.drain()

    async def _get_endless(self, writer, body):
        await self._start(writer, "text/plain")
        while True:
            writer.write(_http_chunk(b"x" * 1000))
            await writer.drain()
            await asyncio.sleep(0.002)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
