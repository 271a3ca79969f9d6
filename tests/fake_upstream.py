"""A small OpenAI-compatible upstream (Starlette under uvicorn, in a thread) with fault modes.

The request's ``model`` picks the behaviour:

* ``ok``: a chat/completions answer whose choices carry as many ``top_logprobs``
  as asked (fixtures from :mod:`openai_fixtures`), streamed when asked;
* ``gated``: a stream that sends its first content chunk, then waits for
  :attr:`FakeUpstream.gate` before the rest (proves chunks are not buffered);
* ``slow``: answers after ``slow_s`` seconds; ``stall``: streams one chunk, then stalls;
* ``fail500``: HTTP 500; ``auth``: 401 unless ``Authorization: Bearer good``;
* ``nologprobs``: a 200 answer without logprobs; ``notjson``: a 200 text/plain body.

Every request's body and headers are kept in :attr:`FakeUpstream.seen`.
"""

import asyncio
import json
import socket
import threading
import time

from openai_fixtures import chat_response, chat_stream, choice_steps, completion_response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread (``start`` waits until it listens)."""

    def __init__(self, app, port=None):
        import uvicorn

        self.port = port or free_port()
        cfg = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server thread did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


N_STEPS = (9, 5)  # tokens of choice 0 and 1


def steps_for(index, k):
    return choice_steps(100 + index, N_STEPS[index % 2], max(k, 1))[: N_STEPS[index % 2]]


class FakeUpstream:
    def __init__(self, slow_s=2.0):
        self.seen: list[dict] = []
        self.gate = threading.Event()
        self.slow_s = slow_s
        self.thread = ServerThread(self.app()).start()
        self.url = self.thread.url

    def stop(self):
        self.thread.stop()

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
        from starlette.routing import Route

        async def models(request):
            self.seen.append({"path": request.url.path, "headers": dict(request.headers)})
            return JSONResponse({"object": "list", "data": [{"id": "ok", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.seen.append(
                {"path": request.url.path, "body": body, "headers": dict(request.headers)}
            )
            chat = request.url.path.endswith("/chat/completions")
            model = body.get("model")
            k = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
            n = int(body.get("n") or 1)
            steps = [[s for s in steps_for(i, k)] for i in range(n)]
            if model == "fail500":
                return JSONResponse({"error": {"message": "boom", "code": 500}}, status_code=500)
            if model == "auth" and request.headers.get("authorization") != "Bearer good":
                return JSONResponse({"error": {"message": "bad key", "code": 401}}, status_code=401)
            if model == "slow":
                await asyncio.sleep(self.slow_s)
            if model == "notjson":  # a misconfigured upstream (an HTML error page, say)
                return PlainTextResponse("upstream says hi", headers={"server": "fake-up"})
            if model == "nologprobs":
                return JSONResponse(chat_response(steps, with_logprobs=False, model=model))
            if body.get("stream") or model in ("gated", "stall"):
                chunks = chat_stream(steps, model=model, usage_chunk=True)

                async def gen():
                    for j, c in enumerate(chunks):
                        yield f"data: {json.dumps(c)}\n\n".encode()
                        if j == len(steps) and model == "gated":  # after the first content chunk
                            for _ in range(500):
                                if self.gate.is_set():
                                    break
                                await asyncio.sleep(0.01)
                        if j == len(steps) and model == "stall":
                            await asyncio.sleep(self.slow_s)
                    yield b"data: [DONE]\n\n"

                return StreamingResponse(gen(), media_type="text/event-stream")
            resp = (
                chat_response(steps, model=model)
                if chat
                else completion_response(steps, model=model)
            )
            return JSONResponse(resp)

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/v1/chat/completions", completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )
