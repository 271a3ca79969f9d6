"""OpenAI-compatible reverse proxy that adds the sentinel to any upstream server.

``sentinel-vllm proxy --upstream URL --sentinel S.onnx`` (Starlette + httpx).
For ``POST /v1/chat/completions`` and ``/v1/completions`` it

1. asks the upstream for ``top_logprobs`` (chat: ``logprobs: true,
   top_logprobs: k``; completions: ``logprobs: k``; k = the sentinel's, or more if
   the client asked more) and takes the client's sentinel options out of the
   body (``vllm_xargs.sentinel_slice`` / ``vllm_xargs.sentinel = false``, as
   in-engine, or the headers ``X-Sentinel-Slice`` / ``X-Sentinel: off``);
2. forwards the request with every other header untouched (``Authorization``
   included; ``--api-key-env VAR`` adds ``Bearer $VAR`` only when the client sent
   no ``Authorization``);
3. on a 200 answer, scores each choice from its ``top_logprobs``
   (:class:`~sentinel_vllm.blackbox.client.TopLogprobsScorer`, on the event loop)
   and adds the ``sentinel`` block exactly where the in-engine server puts it
   (top level for ``n = 1``, per choice otherwise); streams are forwarded chunk by
   chunk as they arrive and the block rides on the chunk that carries each
   choice's ``finish_reason`` (no extra chunk); logprobs the client did not ask
   for are removed (``"logprobs": null``) or cut to the client's
   ``top_logprobs``; the Prometheus metrics are those of the in-engine path
   (:class:`~sentinel_vllm.serving.api.metrics.SentinelMetrics`), served at
   ``GET /metrics``.

Anything else (``/v1/models``, ``/health``, ...) is forwarded untouched. A
non-200 upstream answer is returned as it came, and nothing of the sentinel acts
on it. An unreachable upstream gives 502, a timeout 504 (OpenAI error envelope
with a message); a stream that stalls past the timeout after it started ends
with an SSE ``error`` event. A sentinel failure never costs a response: the
block is then ``{"error": ..., "reason": ...}``.

Bounded against a hostile upstream (memory per request, time per request):

* a JSON body is read up to ``max_response_bytes`` (default 64 MiB); beyond it the
  client gets 502 with a message, and the body is never held whole;
* every request ends at ``deadline_s`` after it came (504, or an SSE ``error`` event
  on a stream that already started; a relayed body just ends), whatever the
  upstream's pace (``timeout_s`` bounds each read);
* a stream's unfinished event is bounded by ``max_response_bytes``, each choice keeps
  at most ``max_steps`` steps of alternatives (beyond, its block is an error block
  ``reason: "unsupported"`` that says so), and only as many choices as the request
  can have (``n`` per prompt).

One :class:`Proxy` per process holds one httpx connection pool to the upstream
(HTTP/1.1 keep-alive); ``sentinel-vllm proxy --workers N`` runs N such processes on
one port, their metrics merged by prometheus-client's multiprocess mode.

The upstream must return logprobs of the RAW model distribution (vLLM's
default ``--logprobs-mode raw_logprobs``) for the entropy to equal the
in-engine one; see :mod:`sentinel_vllm.blackbox.client` for the k rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from sentinel_vllm.blackbox.client import (
    ChoiceLogprobs,
    TopLogprobsScorer,
    add_choice,
    request_sampling,
)
from sentinel_vllm.blackbox.rewrite import (
    HOP_HEADERS,
    EventSplitter,
    EventTooLarge,
    LogprobsAsk,
    client_options,
    dumps,
    error_body,
    loads,
    sse_error,
    upstream_error,
)

__all__ = [
    "CONFIG_ENV",
    "TRACKED_PATHS",
    "Proxy",
    "ProxyConfig",
    "app_from_env",
    "build_app",
    "client_json",
]

log = logging.getLogger("sentinel_vllm.proxy")
TRACKED_PATHS = ("/v1/chat/completions", "/v1/completions")
CONFIG_ENV = "SENTINEL_PROXY_CONFIG"  # the config of --workers N processes (JSON)
MiB = 1 << 20
_NO_RESULT = {"error": "no sentinel result", "reason": "internal"}


def client_json(raw: bytes) -> dict | None:
    """A client body's JSON object, or None (not JSON, nested too deeply for the parser,
    not an object): then the body goes to the upstream untouched and it answers."""
    from sentinel_vllm.serving.api.response import json_object

    return json_object(raw, loads)


def _error(status: int, message: str, kind: str):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, message, kind), status_code=status)


@dataclass
class ProxyConfig:
    """Settings of the proxy (the ``sentinel-vllm proxy`` options).

    Attributes
    ----------
    upstream : str
        Root URL of the OpenAI-compatible server (a trailing ``/v1`` is dropped).
    sentinel : str
        ONNX sentinel of entropy kind top-k.
    k, allow_k_mismatch, short_steps
        See :class:`~sentinel_vllm.blackbox.client.TopLogprobsScorer`.
    request_top_logprobs : int or None
        ``top_logprobs`` asked of the upstream (default k; k + 1 avoids vLLM's
        chat cut when sampling, if the server allows it).
    api_key_env : str or None
        Environment variable holding a key sent upstream when the client sent none.
    timeout_s : float
        Upstream read timeout (between two chunks of a stream), seconds.
    connect_timeout_s : float
    deadline_s : float
        Whole-request limit, seconds: the answer (or stream) ends then, whatever the
        upstream's pace.
    max_response_bytes : int
        Largest JSON body read from the upstream (502 beyond), and largest unfinished
        event of a stream.
    max_steps : int
        Steps of alternatives kept per choice (beyond, the choice is not scored).
    model_label : str or None
        ``model`` label of the metrics (default: the upstream's host:port).
    slices, max_slices, window_count, window_seconds, baseline, drift_margin,
    min_samples, replica
        As for ``sentinel-vllm serve``.
    """

    upstream: str
    sentinel: str
    k: int | None = None
    allow_k_mismatch: bool = False
    short_steps: str = "refuse"
    request_top_logprobs: int | None = None
    api_key_env: str | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    deadline_s: float = 1800.0
    max_response_bytes: int = 64 * MiB
    max_steps: int = 65536
    model_label: str | None = None
    slices: list[str] | None = None
    max_slices: int = 32
    window_count: int = 1000
    window_seconds: float | None = 3600.0
    baseline: str | None = None
    drift_margin: float = 0.05
    min_samples: int = 20
    replica: str | None = None


class ResponseTooLarge(Exception):
    """The upstream's body is longer than ``max_response_bytes``."""


class DeadlineExceeded(Exception):
    """The request's ``deadline_s`` passed while the upstream was still answering."""


class _ReadAhead:
    """Read an async iterator ahead, in a task: each :meth:`batches` step gives every item
    already read (at least one).

    An idle stream passes each item on as it comes; when the consumer falls behind (the
    proxy busy), what piled up goes out in one write instead of one write per event. At
    most ``limit`` items wait (memory stays bounded); the source's exception is raised in
    the consumer, in order.
    """

    _END = object()

    def __init__(self, source, limit: int = 64):
        import asyncio

        self._q: asyncio.Queue = asyncio.Queue(limit)
        self._task = asyncio.ensure_future(self._run(source))

    async def _run(self, source) -> None:
        try:
            async for item in source:
                await self._q.put(item)
            await self._q.put(self._END)
        except Exception as exc:  # noqa: BLE001 (handed to the consumer)
            await self._q.put(exc)

    async def batches(self):
        q = self._q
        while True:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            for i, item in enumerate(items):
                if item is self._END or isinstance(item, Exception):
                    if items[:i]:
                        yield items[:i]
                    if item is self._END:
                        return
                    raise item
            yield items

    async def aclose(self) -> None:
        import asyncio

        self._task.cancel()
        await asyncio.wait([self._task])


def _coalescing_backend():
    """httpcore's network backend whose streams send a request in one write.

    httpcore writes the request line and headers, then the body, as two socket writes; on
    a loopback or LAN hop each write wakes the upstream and costs more than the bytes. The
    writes are kept (up to 64 kB) until the first read, then sent at once."""
    import httpcore

    class Stream(httpcore.AsyncNetworkStream):
        def __init__(self, inner):
            self._inner, self._pending, self._size = inner, [], 0

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            if buffer:
                self._pending.append(buffer)
                self._size += len(buffer)
            if self._size >= 1 << 16:
                await self._flush(timeout)

        async def _flush(self, timeout) -> None:
            if self._pending:
                data, self._pending, self._size = b"".join(self._pending), [], 0
                await self._inner.write(data, timeout)

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            await self._flush(timeout)
            return await self._inner.read(max_bytes, timeout)

        async def aclose(self) -> None:
            await self._inner.aclose()

        async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            await self._flush(timeout)
            return Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

        def get_extra_info(self, info: str):
            return self._inner.get_extra_info(info)

    class Backend(httpcore.AsyncNetworkBackend):
        def __init__(self):
            self._inner = httpcore.AnyIOBackend()

        async def connect_tcp(self, *args, **kwargs):
            return Stream(await self._inner.connect_tcp(*args, **kwargs))

        async def connect_unix_socket(self, *args, **kwargs):
            return Stream(await self._inner.connect_unix_socket(*args, **kwargs))

        async def sleep(self, seconds: float) -> None:
            await self._inner.sleep(seconds)

    return Backend()


def _is_upstream(resp) -> bool:
    """An upstream answer (httpx), not one of the proxy's own error answers."""
    import httpx

    return isinstance(resp, httpx.Response)


class _Stream:
    """What one streamed answer carries between its events."""

    __slots__ = ("acc", "ask", "label", "sampling", "split")

    def __init__(self, ask: LogprobsAsk, label: str, max_event_bytes: int,
                 sampling: dict | None = None):
        self.ask, self.label, self.sampling = ask, label, sampling
        self.acc: dict[int, ChoiceLogprobs] = {}
        self.split = EventSplitter(max_event_bytes)


class Proxy:
    """The proxy of one process: its scorer, metrics and connection pool to the upstream.

    Parameters
    ----------
    config : ProxyConfig
    registry : prometheus_client.CollectorRegistry, optional
        Where the metrics live (default: the global registry, merged across processes
        when ``PROMETHEUS_MULTIPROC_DIR`` is set); tests pass their own.
    transport : httpx transport, optional
        For tests.

    Raises
    ------
    ValueError
        Unusable sentinel (e.g. full-vocabulary, or another k), or ``api_key_env``
        naming an unset variable.
    """

    def __init__(self, config: ProxyConfig, *, registry=None, transport=None):
        import httpx

        from sentinel_vllm.serving.api.metrics import SentinelMetrics, metrics_options

        self.config, self.registry, self._transport = config, registry, transport
        self.scorer = TopLogprobsScorer(config.sentinel, k=config.k,
                                        allow_k_mismatch=config.allow_k_mismatch,
                                        short_steps=config.short_steps)
        self.want = int(config.request_top_logprobs or self.scorer.k)
        if self.want < self.scorer.k:
            raise ValueError(
                f"request_top_logprobs={self.want} is below the sentinel's k={self.scorer.k}")
        for name in ("deadline_s", "max_response_bytes", "max_steps"):
            if not getattr(config, name) > 0:
                raise ValueError(f"{name}={getattr(config, name)}: must be > 0")
        base = config.upstream.rstrip("/")
        self.base = base.removesuffix("/v1")
        self.key = None
        if config.api_key_env:
            self.key = os.environ.get(config.api_key_env)
            if not self.key:
                raise ValueError(f"--api-key-env {config.api_key_env}: the variable is not set")
        self.metrics = SentinelMetrics(
            model=config.model_label or httpx.URL(self.base).netloc.decode(),
            sentinel_id=self.scorer.id, band=self.scorer.scorer.band, registry=registry,
            **metrics_options(config))
        self._timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        # keep-alive below uvicorn's 5 s (vLLM's server): never reuse a connection it closes
        self._limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256,
                                    keepalive_expiry=2.0)
        self._client = None

    # ---- the upstream connection pool (one per process, made in its event loop) ----

    @property
    def client(self):
        if self._client is None:
            import httpx

            transport = self._transport
            if transport is None:
                transport = httpx.AsyncHTTPTransport(limits=self._limits)
                pool = getattr(transport, "_pool", None)  # httpx keeps httpcore's pool there
                if hasattr(pool, "_network_backend"):  # else (another httpx): two writes
                    pool._network_backend = _coalescing_backend()
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=self._limits,
                                             transport=transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def app(self):
        """The Starlette app: the two tracked routes, ``GET /metrics``, the rest forwarded."""
        from starlette.applications import Starlette
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await self.aclose()

        routes = [Route(p, self.tracked, methods=["POST"]) for p in TRACKED_PATHS]
        routes += [
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/{path:path}", self.passthrough,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        ]
        app = Starlette(routes=routes, lifespan=lifespan)
        app.state.proxy, app.state.config = self, self.config
        app.state.scorer, app.state.metrics = self.scorer, self.metrics
        return app

    # ---- routes ----

    async def passthrough(self, request):
        """Any other path: forwarded untouched, the answer relayed as it comes."""
        deadline = time.monotonic() + self.config.deadline_s
        resp = await self._open(request, None, False, deadline)
        return self._relayed(resp, deadline) if _is_upstream(resp) else resp

    async def tracked(self, request):
        """Chat and completions: ask the alternatives, score, strip, attach the block."""
        from starlette.responses import StreamingResponse

        deadline = time.monotonic() + self.config.deadline_s
        raw = await request.body()
        body = client_json(raw)
        enabled, raw_slice, ask = False, None, None
        if body is not None:
            sent, (body, enabled, raw_slice) = body, client_options(body, request.headers)
            if enabled:
                ask = LogprobsAsk(body, request.url.path.endswith("/chat/completions"), self.want)
            if enabled or body is not sent:  # else the client's bytes go as they are
                raw = dumps(body)
        resp = await self._open(request, raw, enabled, deadline)
        if not _is_upstream(resp):  # our own error answer
            return resp
        if not enabled or resp.status_code != 200:
            return self._relayed(resp, deadline)
        headers = self._back_headers(resp, True)
        label = self.metrics.label_slice(raw_slice)
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._sse(resp, ask, label, deadline, request_sampling(body)),
                                     status_code=200, headers=headers)
        return await self._json_answer(resp, ask, label, headers, deadline,
                                       request_sampling(body))

    async def metrics_route(self, request):
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            REGISTRY,
            CollectorRegistry,
            generate_latest,
            multiprocess,
        )
        from starlette.responses import Response

        self.metrics.refresh()
        reg = self.registry or REGISTRY
        if self.metrics.multiprocess:  # every worker's series, merged
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    # ---- the upstream request ----

    async def _open(self, request, body: bytes | None, tracked: bool, deadline: float):
        """The upstream's answer (headers read, body not), or our error answer (502/504)."""
        import anyio
        import httpx

        query = request.url.query
        url = httpx.URL(self.base + request.url.path + ("?" + query if query else ""))
        content = body
        if body is None and ("content-length" in request.headers
                             or "transfer-encoding" in request.headers):
            content = request.stream()  # uploads stream through
        req = self.client.build_request(request.method, url, content=content,
                                        headers=self._out_headers(request, tracked))
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                return await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            return _error(*upstream_error(exc))
        except TimeoutError:
            return _error(504, self._deadline_message(), "upstream_timeout")

    def _out_headers(self, request, tracked: bool) -> dict:
        h = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if tracked:
            h["accept-encoding"] = "identity"  # bodies are rewritten: no compression upstream
        if self.key and "authorization" not in request.headers:
            h["authorization"] = f"Bearer {self.key}"
        return h

    def _back_headers(self, resp, drop_encoding: bool) -> dict:
        # uvicorn writes its own Date and Server: the upstream's would appear twice
        skip = HOP_HEADERS | {"date", "server"} | ({"content-encoding"} if drop_encoding else set())
        return {k: v for k, v in resp.headers.items() if k.lower() not in skip}

    def _deadline_message(self) -> str:
        return (f"upstream did not finish within the request deadline "
                f"({self.config.deadline_s:g} s, --deadline)")

    async def _reads(self, resp, deadline: float, raw: bool):
        """The upstream body as it comes, ended by :class:`DeadlineExceeded` at the deadline.

        While more than the read timeout is left, that timeout bounds every read (no
        cancel scope per chunk); after, each read is bounded by what is left."""
        import anyio

        if resp.headers.get("content-encoding", "identity") == "identity":
            raw = True  # nothing to decode: one layer of generators less per chunk
        it = (resp.aiter_raw() if raw else resp.aiter_bytes()).__aiter__()
        read_timeout = self.config.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                if left > read_timeout:
                    chunk = await it.__anext__()
                else:
                    chunk = None
                    with anyio.move_on_after(max(left, 0.0)):
                        chunk = await it.__anext__()
                    if chunk is None:
                        raise DeadlineExceeded(self._deadline_message())
            except StopAsyncIteration:
                return
            yield chunk

    # ---- answers ----

    def _relayed(self, resp, deadline: float):
        from starlette.responses import StreamingResponse

        return StreamingResponse(self._relay(resp, deadline), status_code=resp.status_code,
                                 headers=self._back_headers(resp, False))

    async def _relay(self, resp, deadline: float):
        import httpx

        try:
            async for chunk in self._reads(resp, deadline, raw=True):
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("upstream stream failed: %s", exc)
        except DeadlineExceeded as exc:
            log.warning("relayed answer ended: %s", exc)
        finally:
            await resp.aclose()

    async def _json_answer(self, resp, ask: LogprobsAsk, label: str, headers: dict,
                           deadline: float, sampling: dict | None = None):
        import httpx
        from starlette.responses import Response

        try:
            data = await self._read_bounded(resp, deadline)
        except ResponseTooLarge as exc:
            log.warning("%s", exc)
            self.metrics.error("upstream")
            return _error(502, str(exc), "upstream_too_large")
        except DeadlineExceeded as exc:
            return _error(504, str(exc), "upstream_timeout")
        except httpx.HTTPError as exc:
            return _error(*upstream_error(exc))
        finally:
            await resp.aclose()
        # parse and score on the event loop: a thread would add its hand-offs and gain
        # nothing (the GIL), and the work is a few milliseconds
        out = self._json_body(data, ask, label, sampling)
        if out is None:  # not an OpenAI answer: returned as it came, counted as a failure
            log.warning("upstream answered 200 with a body that is not an OpenAI completion "
                        "(content-type %r): returned without a sentinel block",
                        resp.headers.get("content-type", ""))
            self.metrics.error("upstream")
            return Response(bytes(data), status_code=200, headers=headers)
        return Response(out, status_code=200, headers=headers, media_type="application/json")

    async def _read_bounded(self, resp, deadline: float) -> bytearray:
        """The whole body, at most ``max_response_bytes`` (:class:`ResponseTooLarge`)."""
        cap = self.config.max_response_bytes
        size = resp.headers.get("content-length", "")
        if size.isdigit() and int(size) > cap:
            raise ResponseTooLarge(self._too_large(f"{int(size)} bytes"))
        buf = bytearray()
        async for chunk in self._reads(resp, deadline, raw=False):
            buf += chunk
            if len(buf) > cap:
                raise ResponseTooLarge(self._too_large(f"more than {cap} bytes"))
        return buf

    def _too_large(self, what: str) -> str:
        return (f"upstream answer too large: {what}, over --max-response-bytes "
                f"{self.config.max_response_bytes}; not relayed")

    def _json_body(self, data: bytearray, ask: LogprobsAsk, label: str,
                   sampling: dict | None = None) -> bytes | None:
        """The client's body: parse once, score, strip, attach (None: not an OpenAI answer)."""
        from sentinel_vllm.serving.api.response import attach_blocks
        from sentinel_vllm.serving.api.scoring import error_block

        try:
            obj = loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return None
        choices = obj["choices"]
        try:
            acc: dict[int, ChoiceLogprobs] = {}
            for pos, c in enumerate(choices):
                if isinstance(c, dict):
                    self._fold(acc, c, pos, ask)
            scored = self.scorer.score_choices(dict(sorted(acc.items())), label, sampling)
            self._record(scored, label)
            blocks = {i: s.block for i, s in scored.items()}
            for c in choices:
                if isinstance(c, dict):
                    ask.strip(c)
        except Exception as exc:
            log.exception("sentinel scoring")
            self.metrics.error("internal")
            blocks = {i: error_block(f"{type(exc).__name__}: {exc}", "internal", label)
                      for i in range(max(ask.n, len(choices)))}
        attach_blocks(obj, blocks, ask.n)
        return dumps(obj)

    def _fold(self, acc: dict, choice: dict, pos: int, ask: LogprobsAsk) -> None:
        """Add a choice's alternatives to ``acc``, within the request's bounds."""
        if len(acc) >= ask.max_choices and int(choice.get("index", pos) or 0) not in acc:
            return  # more choices than the request can have: not kept (block: no result)
        add_choice(acc, choice, pos, self.config.max_steps)

    def _record(self, scored: dict, label: str) -> None:
        for s in scored.values():
            if s.reason is None:
                self.metrics.observe(label, s.p_correct, s.mean_entropy)
            else:
                self.metrics.error(s.reason)

    async def _sse(self, resp, ask: LogprobsAsk, label: str, deadline: float,
                   sampling: dict | None = None):
        """The stream, event by event as it comes; each read's events go out in one write."""
        import httpx

        st = _Stream(ask, label, self.config.max_response_bytes, sampling)
        ahead = _ReadAhead(self._reads(resp, deadline, raw=False))
        try:
            async for batch in ahead.batches():
                events = [ev for data in batch for ev in st.split.feed(data)]
                if events:
                    yield b"".join([self._event(ev, st) for ev in events])
            rest = st.split.rest()
            if rest.strip():
                yield self._event(rest, st)
        except httpx.HTTPError as exc:
            yield sse_error(*upstream_error(exc))
        except DeadlineExceeded as exc:
            log.warning("stream ended: %s", exc)
            yield sse_error(504, str(exc), "upstream_timeout")
        except EventTooLarge as exc:
            log.warning("stream ended: %s", exc)
            self.metrics.error("upstream")
            yield sse_error(502, f"{exc} (--max-response-bytes): stream ended",
                            "upstream_too_large")
        finally:
            try:
                await ahead.aclose()
            finally:
                await resp.aclose()

    def _event(self, event: bytes, st: _Stream) -> bytes:
        """One event for the client: as it came unless logprobs were cut or a block added."""
        try:
            obj, finished = self._fold_event(event, st)
            if obj is None:
                return event + b"\n\n"
            if finished:
                self._attach_stream_blocks(obj, finished, st)
            if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:
                return b"data: " + dumps(obj) + b"\n\n"
            other = [ln for ln in event.splitlines() if not ln.startswith(b"data:")]
            return b"\n".join([*other, b"data: " + dumps(obj)]) + b"\n\n"
        except Exception:
            log.exception("sentinel stream rewrite")
            self.metrics.error("internal")
            return event + b"\n\n"

    def _fold_event(self, event: bytes, st: _Stream) -> tuple[dict | None, dict]:
        """Parse one event once, fold its alternatives, strip them: ``(chunk or None, finished)``.

        None when the event goes out unchanged (not a chunk, nothing cut, nothing finished)."""
        if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:
            payload = event[5:]  # the usual one-line event
        else:
            payload = b"\n".join(ln[5:] for ln in event.splitlines() if ln.startswith(b"data:"))
        if not payload.strip() or payload.strip() == b"[DONE]":
            return None, {}
        try:
            obj = loads(payload)
        except ValueError:
            return None, {}
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return None, {}
        changed, finished = False, {}
        for pos, c in enumerate(obj["choices"]):
            if not isinstance(c, dict):
                continue
            self._fold(st.acc, c, pos, st.ask)
            changed |= st.ask.strip(c)
            if c.get("finish_reason") is not None:
                finished[int(c.get("index", pos) or 0)] = c
        return (obj if changed or finished else None), finished

    def _attach_stream_blocks(self, obj: dict, finished: dict, st: _Stream) -> None:
        done = {i: st.acc.pop(i) for i in finished if i in st.acc}
        scored = self.scorer.score_choices(done, st.label, st.sampling)
        self._record(scored, st.label)
        for i, c in finished.items():
            block = scored[i].block if i in scored else _NO_RESULT
            if st.ask.n == 1 and len(obj["choices"]) == 1:
                obj["sentinel"] = block
            else:
                c["sentinel"] = block


def build_app(config: ProxyConfig, *, registry=None, transport=None):
    """The Starlette app of the proxy (:class:`Proxy`; ``app.state.proxy`` is it).

    Parameters
    ----------
    config : ProxyConfig
    registry : prometheus_client.CollectorRegistry, optional
        Where the metrics live (default: the global registry); tests pass their own.
    transport : httpx transport, optional
        For tests.

    Returns
    -------
    starlette.applications.Starlette

    Raises
    ------
    ValueError
        Unusable sentinel (e.g. full-vocabulary, or another k), or ``api_key_env``
        naming an unset variable.
    """
    return Proxy(config, registry=registry, transport=transport).app()


def config_to_env(config: ProxyConfig) -> str:
    """The config as the JSON that :func:`app_from_env` reads in each worker process."""
    return json.dumps(asdict(config))


def app_from_env():
    """The app of one ``--workers N`` process, from ``$SENTINEL_PROXY_CONFIG`` (uvicorn factory)."""
    return build_app(ProxyConfig(**json.loads(os.environ[CONFIG_ENV])))
