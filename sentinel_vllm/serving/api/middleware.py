"""The API-server side of the sentinel: an ASGI middleware on vLLM's OpenAI app.

The endpoint plugin (:mod:`~sentinel_vllm.serving.api.plugin`) adds it to the app of plain
``vllm serve`` and of ``sentinel-vllm serve`` when ``--additional-config`` has the
``"sentinel"`` key; vLLM's own ``--middleware`` option works too (docs/serving.md)::

    SENTINEL_VLLM_SENTINEL=s.onnx vllm serve MODEL \\
        --logits-processors <processor class> \\
        --worker-extension-cls sentinel_vllm.serving.worker.extension.SentinelWorkerExtension \\
        --middleware sentinel_vllm.serving.api.middleware.SentinelMiddleware

For ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` it

1. sets ``vllm_xargs["sentinel_id"]`` to a fresh server-chosen id (client ids are
   overwritten; :func:`~sentinel_vllm.serving.api.response.prepare_request`);
2. lets vLLM serve the request; when the response is complete (JSON) or reaches
   its end (``data: [DONE]``, or ``response.completed`` for the Responses API),
   asks the worker for the request's statistics with ONE batched
   ``collective_rpc("sentinel_fetch")`` for all requests finished in the last few
   milliseconds (:class:`BatchFetcher`), scores them with the ONNX sentinel in a
   thread (never on the event loop), updates the metrics;
3. adds the ``sentinel`` block (non-stream: into the JSON; stream: into the chunk
   that carries each choice's ``finish_reason``, held back until the block is
   ready, or into the ``response.completed`` event). Any sentinel failure gives
   ``{"error": ...}``, never a failed response; an aborted request's worker
   state is discarded.

Every other JSON request body it forwards loses its client ``sentinel*`` keys
(the worker only tracks ids the server minted). Nothing of the sentinel acts on
a request vLLM refuses: with ``--api-key`` an unauthenticated request passes
through untouched (vLLM's own check, :meth:`SentinelMiddleware._authorized`);
the slice label is claimed only once vLLM answered 200; a 4xx answer causes no
engine RPC.

It also answers ``GET /sentinel/stats`` (the worker's ``sentinel_stats``, rank 0) and
``POST /sentinel/labels`` (human labels by block id: :mod:`~sentinel_vllm.serving.api.labels`)
and ``GET /sentinel/labels/suggest`` (which ids to label: :mod:`~sentinel_vllm.serving.api.suggest`),
all behind the API key like vLLM's ``/v1`` routes, and refreshes the window and
audit gauges before each ``GET /metrics`` scrape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from sentinel_vllm.serving.api.audit_store import ServingAudit
from sentinel_vllm.serving.api.fetch import BatchFetcher, engine_rpc
from sentinel_vllm.serving.api.labels import LABELS_PATH, handle_labels, send_json
from sentinel_vllm.serving.api.response import (
    SENTINEL_PATHS,
    json_object,
    new_sentinel_id,
    prepare_request,
    strip_client_keys,
)
from sentinel_vllm.serving.api.rewriter import ResponseRewriter
from sentinel_vllm.serving.api.scoring import SentinelScorer, error_block
from sentinel_vllm.serving.api.suggest import SUGGEST_PATH, handle_suggest
from sentinel_vllm.serving.contract import (
    CONFIG_ENV,
    RPC_STATS,
    SENTINEL_ENV,
    XARG_FAULT,
    merge_answers,
)

__all__ = ["CONFIG_ENV", "SentinelMiddleware", "ServerConfig"]

log = logging.getLogger("sentinel_vllm.serving")
MULTI_PROMPT = "the sentinel scores one prompt per /v1/completions request"


@dataclass
class ServerConfig:
    """Settings of the serving sentinel (all from ``sentinel-vllm serve`` options).

    Attributes
    ----------
    sentinel : str
        ONNX sentinel path (or ``"default"``).
    slices : list of str or None
        Slice allowlist; None: any label up to ``max_slices``.
    max_slices : int
    drift_margin : float
        Accuracy points below baseline that raise the drift alert.
    baseline : str or None
        Baseline JSON path (:func:`sentinel_vllm.serving.api.metrics.load_baseline`).
    replica : str or None
        Replica label (default: hostname).
    window_count : int
    window_seconds : float or None
    min_samples : int
    batch_delay_s : float
        How long finished requests are collected before one fetch RPC (seconds).
    fetch_timeout_s : float
        How long a finished request's statistics are waited for (seconds).
    return_trajectory : bool
        Add ``"trajectory"`` (the per-step entropies of the sentinel's series,
        nats) to each block: one more RPC (``sentinel_trajectories``) per batch.
        For debugging and the end-to-end test.
    audit_db, audit_retention_s, audit_max_rows : str or None, float, int
        The audit store (:mod:`~sentinel_vllm.serving.api.audit_store`): its SQLite file,
        shared by the API-server processes (None: per process, in memory), age limit (s), row cap.
    fault_injection : bool
        Tests only: a request with ``vllm_xargs.sentinel_fault = "scoring"`` makes
        the ONNX call of its batch raise (the error path of a real failure).
        When False that key is stripped like any other client sentinel key.
    """

    sentinel: str = ""
    slices: list[str] | None = None
    max_slices: int = 32
    drift_margin: float = 0.05
    baseline: str | None = None
    replica: str | None = None
    window_count: int = 1000
    window_seconds: float | None = 3600.0
    min_samples: int = 20
    batch_delay_s: float = 0.005
    fetch_timeout_s: float = 10.0
    return_trajectory: bool = False
    audit_db: str | None = None
    audit_retention_s: float = 7 * 86400.0
    audit_max_rows: int = 1_000_000
    fault_injection: bool = False
    extra: dict = field(default_factory=dict)

    def to_env(self) -> str:
        """JSON for :data:`CONFIG_ENV`."""
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ServerConfig":
        """Read :data:`CONFIG_ENV` (or just :data:`SENTINEL_ENV`).

        Raises
        ------
        ValueError
            Neither variable set, or bad JSON.
        """
        raw = os.environ.get(CONFIG_ENV)
        if raw:
            try:
                return cls(**json.loads(raw))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"bad {CONFIG_ENV}: {exc}") from exc
        if os.environ.get(SENTINEL_ENV):
            return cls(sentinel=os.environ[SENTINEL_ENV])
        raise ValueError(
            f"SentinelMiddleware needs the sentinel file: set {SENTINEL_ENV}=path.onnx "
            "(or launch with `sentinel-vllm serve MODEL --sentinel path.onnx`)"
        )


class _State:
    """Per-process objects created on the first request or scrape (they need the engine client)."""

    def __init__(self, mw: "SentinelMiddleware", app_state):
        from sentinel_vllm.serving.api.metrics import SentinelMetrics, metrics_options

        cfg = mw.config
        engine = getattr(app_state, "engine_client", None)
        if engine is None:
            raise RuntimeError("app.state.engine_client is missing: not a vLLM OpenAI server")
        mc = getattr(engine, "model_config", None)
        if mw.scorer.vocab_size is None and mc is not None:
            try:
                mw.scorer.vocab_size = int(mc.get_vocab_size())
            except Exception:  # noqa: BLE001
                pass
        model = _served_name(mc)
        factory = mw.metrics_factory or SentinelMetrics
        self.metrics = factory(model=model, sentinel_id=mw.scorer.id, band=mw.scorer.band,
                               **metrics_options(cfg))

        self.rpc = rpc = engine_rpc(engine)  # every engine's workers (data parallel)
        self.audit = ServingAudit.open(cfg, self.metrics)  # None when the store failed (logged)
        self.fetcher = BatchFetcher(rpc, mw.scorer, self.metrics, batch_delay_s=cfg.batch_delay_s,
                                    timeout_s=cfg.fetch_timeout_s, audit=self.audit,
                                    return_trajectory=cfg.return_trajectory)


def _served_name(mc) -> str:
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", None) or "unknown"
    if isinstance(name, (list, tuple)):
        name = name[0] if name else "unknown"
    return str(name)


class SentinelMiddleware:
    """Pure ASGI middleware adding the sentinel to vLLM's OpenAI-compatible app.

    Parameters
    ----------
    app : ASGI app
    config : ServerConfig, optional
        Default :meth:`ServerConfig.from_env`.
    metrics_factory : callable, optional
        Builds the metrics object (tests pass one with a private registry).

    Raises
    ------
    ValueError
        At app build time, for a missing/corrupt/non-ONNX sentinel, so a server
        never starts without a usable sentinel.
    """

    def __init__(self, app, config: ServerConfig | None = None, metrics_factory=None):
        self.app = app
        self.config = config or ServerConfig.from_env()
        self.scorer = SentinelScorer.from_path(self.config.sentinel)
        self.metrics_factory = metrics_factory
        self._state: _State | None = None
        self._verify = None  # (app, vLLM's verify_token or None)
        #: Requests that ended before their response did (client gone): state discarded.
        self.discarded = 0
        try:  # n > 1: give each child its choice index (see serving/api/child_index.py)
            from sentinel_vllm.serving.api.child_index import install_child_index_patch

            install_child_index_patch()
        except ImportError:
            pass

    def state(self, scope) -> _State:
        """The per-process state (built on first use)."""
        if self._state is None:
            self._state = _State(self, scope["app"].state)
        return self._state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if (method, path) == ("GET", "/sentinel/stats") or path in (LABELS_PATH, SUGGEST_PATH):
            if not self._authorized(scope):
                return await send_json(send, 401, {"error": "Unauthorized"})
            if path == LABELS_PATH:  # 405 but for POST
                return await handle_labels(lambda: self.state(scope).audit, receive, send, method)
            if path == SUGGEST_PATH:  # 405 but for GET
                return await handle_suggest(lambda: self.state(scope).audit, scope, send)
            return await self._stats(scope, send)
        if method == "POST" and path in SENTINEL_PATHS and self._authorized(scope):
            return await self._tracked(scope, receive, send)
        if method in ("POST", "PUT", "PATCH"):  # also unauthenticated ones: vLLM answers 401
            return await self._stripped(scope, receive, send)
        if path.startswith("/metrics"):  # built here too: a kept store's gauges on the first scrape
            try:
                st = self.state(scope)
            except Exception:  # noqa: BLE001 (no engine client: the first request logs why)
                st = None
            if st is not None:
                st.metrics.refresh()  # expire old window entries before the scrape
                if st.audit is not None:
                    await st.audit.refresh()  # audited estimates of the shared store
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        """vLLM's own API-key check (``--api-key`` / ``VLLM_API_KEY``) for this request.

        This middleware sits outside vLLM's ``AuthenticationMiddleware``; it finds
        that middleware among the app's and calls its ``verify_token`` (same
        tokens, same Bearer rule, constant-time compare). True when vLLM runs
        without a key.
        """
        app = scope.get("app")
        if self._verify is None or self._verify[0] is not app:
            self._verify = (app, _vllm_token_check(app))
        check = self._verify[1]
        if check is None:
            return True
        from starlette.datastructures import Headers

        return bool(check(Headers(scope=scope)))

    async def _stats(self, scope, send) -> None:
        try:
            stats = merge_answers(await self.state(scope).rpc(RPC_STATS, ())) or {}
            status, body = 200, {"sentinel": self.scorer.id, "worker": stats,
                                 "api": {"discarded": self.discarded}}
        except Exception as exc:  # noqa: BLE001
            status, body = 503, {"error": f"{type(exc).__name__}: {exc}"}
        await send_json(send, status, body)

    async def _stripped(self, scope, receive, send) -> None:
        """Any other request with a JSON body: forward it without client sentinel keys."""
        ctype = dict(scope.get("headers", [])).get(b"content-type", b"").lower()
        if ctype.startswith((b"multipart/", b"application/x-www-form-urlencoded")):
            return await self.app(scope, receive, send)
        raw, tail = await _read_body(receive)
        obj = json_object(raw)
        if obj is not None and tail is None:
            new, _ = strip_client_keys(obj)
            if new is not obj:
                raw = json.dumps(new).encode()
                scope = _with_length(scope, len(raw))
        return await self.app(scope, _replay(raw, receive, tail), send)

    async def _tracked(self, scope, receive, send) -> None:
        raw, tail = await _read_body(receive)
        obj = json_object(raw)
        if obj is None or tail is not None:  # vLLM reports bad JSON; a disconnect ends it
            return await self.app(scope, _replay(raw, receive, tail), send)
        xa = obj.get("vllm_xargs") if isinstance(obj.get("vllm_xargs"), dict) else {}
        fault = self.config.fault_injection and xa.get(XARG_FAULT) == "scoring"
        if XARG_FAULT in xa:
            obj = dict(obj, vllm_xargs={k: v for k, v in xa.items() if k != XARG_FAULT})
        responses_api = scope["path"] == "/v1/responses"
        if responses_api and obj.get("background"):  # answered before generation: not scored
            obj = dict(obj, vllm_xargs=dict(xa, sentinel=False))
        body, opts = prepare_request(obj, new_sentinel_id(), has_n=not responses_api)
        multi_prompt = scope["path"] == "/v1/completions" and _n_prompts(obj.get("prompt")) > 1
        if multi_prompt and opts.enabled:  # one id cannot follow several prompts
            for key in ("sentinel_id", "sentinel_n"):
                body["vllm_xargs"].pop(key)
            body["vllm_xargs"] = body["vllm_xargs"] or None
        new_raw = json.dumps(body).encode()
        scope = _with_length(scope, len(new_raw))
        if not opts.enabled:
            return await self.app(scope, _replay(new_raw, receive), send)
        # several prompts: every choice of every prompt gets the "unsupported" block
        n_choices = opts.n * (_n_prompts(obj.get("prompt")) if multi_prompt else 1)

        async def blocks_fn(n, finish_reasons=None):  # once vLLM answered 200 and finished
            try:
                st = self.state(scope)
                label = st.metrics.label_slice(opts.slice)  # claimed only now
            except Exception as exc:  # noqa: BLE001
                log.exception("sentinel state")
                return {i: error_block(f"sentinel unavailable: {exc}", "internal") for i in range(n)}
            if multi_prompt:
                for _ in range(n):
                    st.metrics.error("unsupported")
                return {i: error_block(MULTI_PROMPT, "unsupported", label) for i in range(n)}
            return await st.fetcher.blocks(opts.sentinel_id, n, label, fault=fault,
                                           finish_reasons=finish_reasons)
        rw = ResponseRewriter(send, blocks_fn, n_choices)
        try:
            await self.app(scope, _replay(new_raw, receive), rw.send)
        finally:
            # An engine RPC only for a request the engine may hold: not for one
            # vLLM refused (4xx: auth, validation, unknown model) before the engine.
            reached = rw.status is None or not 400 <= rw.status < 500
            if not rw.completed and not multi_prompt and reached:
                try:
                    fetcher = self.state(scope).fetcher
                except Exception:  # noqa: BLE001 (no engine client: nothing to free)
                    log.exception("sentinel state")
                else:
                    self.discarded += 1
                    asyncio.ensure_future(fetcher.discard([opts.sentinel_id]))


async def _read_body(receive):
    """The whole request body, and a message to replay after it (a disconnect) or None."""
    chunks, more = [], True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            return b"".join(chunks), msg
        chunks.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    return b"".join(chunks), None


def _with_length(scope, length: int):
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return dict(scope, headers=headers)


def _vllm_token_check(app):
    """``verify_token`` of vLLM's ``AuthenticationMiddleware`` on ``app``, or None."""
    for m in getattr(app, "user_middleware", None) or ():
        cls = getattr(m, "cls", None)
        if getattr(cls, "__name__", "") == "AuthenticationMiddleware" and hasattr(cls, "verify_token"):
            return cls(None, *getattr(m, "args", ()), **getattr(m, "kwargs", {})).verify_token
    return None


def _n_prompts(prompt) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _replay(body: bytes, receive, extra=None):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if extra is not None:
            return extra
        return await receive()

    return replay
