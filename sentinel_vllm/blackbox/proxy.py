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
   (:class:`~sentinel_vllm.blackbox.client.TopLogprobsScorer`, in a worker thread)
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

The upstream must return logprobs of the RAW model distribution (vLLM's
default ``--logprobs-mode raw_logprobs``) for the entropy to equal the
in-engine one; see :mod:`sentinel_vllm.blackbox.client` for the k rules.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from sentinel_vllm.blackbox.client import (
    ChoiceLogprobs,
    TopLogprobsScorer,
    add_choice,
    request_sampling,
)
from sentinel_vllm.blackbox.rewrite import (
    HOP_HEADERS,
    LogprobsAsk,
    client_options,
    dumps,
    error_body,
    event_end,
    loads,
    upstream_error,
)

__all__ = ["ProxyConfig", "build_app", "client_json", "TRACKED_PATHS"]

log = logging.getLogger("sentinel_vllm.proxy")
TRACKED_PATHS = ("/v1/chat/completions", "/v1/completions")


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
    model_label: str | None = None
    slices: list[str] | None = None
    max_slices: int = 32
    window_count: int = 1000
    window_seconds: float | None = 3600.0
    baseline: str | None = None
    drift_margin: float = 0.05
    min_samples: int = 20
    replica: str | None = None


def build_app(config: ProxyConfig, *, registry=None, transport=None):
    """The Starlette app of the proxy.

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
    import anyio
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from sentinel_vllm.serving.api.metrics import SentinelMetrics, metrics_options
    from sentinel_vllm.serving.api.response import attach_blocks
    from sentinel_vllm.serving.api.scoring import error_block

    scorer = TopLogprobsScorer(
        config.sentinel,
        k=config.k,
        allow_k_mismatch=config.allow_k_mismatch,
        short_steps=config.short_steps,
    )
    want = int(config.request_top_logprobs or scorer.k)
    if want < scorer.k:
        raise ValueError(f"request_top_logprobs={want} is below the sentinel's k={scorer.k}")
    base = config.upstream.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    key = None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {config.api_key_env}: the variable is not set")
    metrics = SentinelMetrics(
        model=config.model_label or httpx.URL(base).netloc.decode(),
        sentinel_id=scorer.id,
        registry=registry,
        **metrics_options(config),
    )
    timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
    # keep-alive below uvicorn's 5 s (vLLM's server): never reuse a connection the upstream closes
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=2.0)
    state: dict = {}

    def client() -> httpx.AsyncClient:
        if "client" not in state:
            state["client"] = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
        return state["client"]

    def out_headers(request, tracked: bool) -> dict:
        h = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if tracked:
            h["accept-encoding"] = "identity"  # bodies are rewritten: no compression upstream
        if key and "authorization" not in request.headers:
            h["authorization"] = f"Bearer {key}"
        return h

    def back_headers(resp, drop_encoding: bool) -> dict:
        # uvicorn writes its own Date and Server: the upstream's would appear twice
        skip = HOP_HEADERS | {"date", "server"} | ({"content-encoding"} if drop_encoding else set())
        return {k: v for k, v in resp.headers.items() if k.lower() not in skip}

    def record(scored: dict, label: str) -> None:
        for s in scored.values():
            if s.reason is None:
                metrics.observe(label, s.p_correct, s.mean_entropy)
            else:
                metrics.error(s.reason)

    async def send(request, body: bytes | None, tracked: bool):
        url = httpx.URL(base + request.url.path, query=request.url.query.encode())
        content = body
        if body is None and (
            "content-length" in request.headers or "transfer-encoding" in request.headers
        ):
            content = request.stream()  # uploads stream through
        req = client().build_request(
            request.method, url, headers=out_headers(request, tracked), content=content
        )
        return await client().send(req, stream=True)

    async def passthrough(request):
        try:
            resp = await send(request, None, False)
        except httpx.HTTPError as exc:
            return _error(*upstream_error(exc))
        return StreamingResponse(
            _raw(resp), status_code=resp.status_code, headers=back_headers(resp, False)
        )

    async def tracked(request):
        raw = await request.body()
        body = client_json(raw)
        enabled, raw_slice = False, None
        if body is not None:
            body, enabled, raw_slice = client_options(body, request.headers)
        ask = None
        if enabled:
            ask = LogprobsAsk(body, request.url.path.endswith("/chat/completions"), want)
        if body is not None:
            raw = dumps(body)
        try:
            resp = await send(request, raw, enabled)
        except httpx.HTTPError as exc:
            return _error(*upstream_error(exc))
        ctype = resp.headers.get("content-type", "")
        if not enabled or resp.status_code != 200:
            return StreamingResponse(
                _raw(resp), status_code=resp.status_code, headers=back_headers(resp, False)
            )
        headers = back_headers(resp, True)
        if ctype.startswith("text/event-stream"):
            return StreamingResponse(_sse(resp, ask, raw_slice, request_sampling(body)), status_code=200, headers=headers)
        try:
            data = await resp.aread()
        except httpx.HTTPError as exc:
            return _error(*upstream_error(exc))
        finally:
            await resp.aclose()
        try:
            obj = loads(data)
            if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
                raise ValueError
        except ValueError:  # not an OpenAI answer: returned as it came, counted as a failure
            log.warning("upstream answered 200 with a body that is not an OpenAI completion "
                        "(content-type %r): returned without a sentinel block", ctype)
            metrics.error("upstream")
            return Response(data, status_code=200, headers=headers)
        label = metrics.label_slice(raw_slice)
        try:
            scored = await anyio.to_thread.run_sync(scorer.score, obj, label,
                                                    request_sampling(body))
            record(scored, label)
            blocks = {i: s.block for i, s in scored.items()}
            for c in obj["choices"]:
                if isinstance(c, dict):
                    ask.strip(c)
        except Exception as exc:  # noqa: BLE001 (a sentinel failure never costs a response)
            log.exception("sentinel scoring")
            metrics.error("internal")
            blocks = {
                i: error_block(f"{type(exc).__name__}: {exc}", "internal", label)
                for i in range(max(ask.n, len(obj["choices"])))
            }
        attach_blocks(obj, blocks, ask.n)
        return Response(dumps(obj), status_code=200, headers=headers, media_type="application/json")

    async def _raw(resp):
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("upstream stream failed: %s", exc)
        finally:
            await resp.aclose()

    async def _sse(resp, ask: LogprobsAsk, raw_slice, sampling=None):
        label = metrics.label_slice(raw_slice)
        acc: dict[int, ChoiceLogprobs] = {}
        buf = b""
        try:
            async for data in resp.aiter_bytes():
                buf += data
                out = []  # the complete events of this read go out in one write, now
                while True:
                    cut, sep = event_end(buf)
                    if cut < 0:
                        break
                    event, buf = buf[:cut], buf[cut + sep :]
                    out.append(await _safe_rewrite(event, ask, acc, label, sampling) + b"\n\n")
                if out:
                    yield b"".join(out)
            if buf.strip():
                yield await _safe_rewrite(buf, ask, acc, label, sampling) + b"\n\n"
        except httpx.HTTPError as exc:
            yield b"event: error\ndata: " + dumps(error_body(*upstream_error(exc))) + b"\n\n"
        finally:
            await resp.aclose()

    async def _safe_rewrite(event: bytes, ask: LogprobsAsk, acc: dict, label: str,
                            sampling=None) -> bytes:
        try:
            return await _rewrite(event, ask, acc, label, sampling)
        except Exception:  # noqa: BLE001 (the event goes out as the upstream sent it)
            log.exception("sentinel stream rewrite")
            metrics.error("internal")
            return event

    async def _rewrite(event: bytes, ask: LogprobsAsk, acc: dict, label: str,
                       sampling=None) -> bytes:
        lines = event.splitlines()
        payload = b"\n".join(ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:"))
        if not payload or payload.strip() == b"[DONE]":
            return event
        try:
            obj = loads(payload)
        except ValueError:
            return event
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return event
        changed, finished = False, {}
        for pos, c in enumerate(obj["choices"]):
            if not isinstance(c, dict):
                continue
            add_choice(acc, c, pos)
            changed |= ask.strip(c)
            idx = int(c.get("index", pos) or 0)
            if c.get("finish_reason") is not None:
                finished[idx] = c
        if finished:
            done = {i: acc.pop(i) for i in finished if i in acc}
            scored = await anyio.to_thread.run_sync(scorer.score_choices, done, label, sampling)
            record(scored, label)
            for i, c in finished.items():
                block = (
                    scored[i].block
                    if i in scored
                    else {"error": "no sentinel result", "reason": "internal"}
                )
                if ask.n == 1 and len(obj["choices"]) == 1:
                    obj["sentinel"] = block
                else:
                    c["sentinel"] = block
            changed = True
        if not changed:
            return event
        other = [ln for ln in lines if not ln.startswith(b"data:")]
        return b"\n".join([*other, b"data: " + dumps(obj)])

    async def metrics_route(request):
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        metrics.refresh()
        return Response(generate_latest(registry or REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "client" in state:
            await state.pop("client").aclose()

    routes = [Route(p, tracked, methods=["POST"]) for p in TRACKED_PATHS]
    routes += [
        Route("/metrics", metrics_route, methods=["GET"]),
        Route(
            "/{path:path}",
            passthrough,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        ),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.scorer, app.state.metrics, app.state.config = scorer, metrics, config
    return app
