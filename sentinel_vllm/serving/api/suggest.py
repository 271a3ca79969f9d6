"""``GET /sentinel/labels/suggest?slice=S&n=N[&seed=K]``: which responses to label (active labelling).

Draws ``n`` of the slice's responses in the audit store, favouring those the sentinel is
least sure of (:func:`sentinel_vllm.active_audit.suggest`, the design of ``sentinel-vllm
audit --suggest``), and records the design in the store: the population (the slice's
responses now, their count and time window), each draw's probability and P(correct), the
seed. Labels posted for those ids (``POST /sentinel/labels``) are then weighted by the
design in the slice's audited gauges (:meth:`~sentinel_vllm.serving.api.audit_store.AuditStore.audit`).
The 200 answer: ``{"plan", "slice", "n", "ids", "population", "window": [first, last
time], "method", "eta", "seed"}``; an id drawn twice is listed twice (label it once).
400 for a missing or bad parameter, 404 when the store holds no response of the slice,
503 when the store is not available. Behind the API key like ``/sentinel/stats``;
another method than GET gets 405 (``Allow: GET``).
"""

from __future__ import annotations

import logging
import secrets
from urllib.parse import parse_qs

from sentinel_vllm.serving.api.labels import audit_or_503, send_json

__all__ = ["MAX_SUGGEST", "SUGGEST_PATH", "handle_suggest", "parse_query"]

log = logging.getLogger("sentinel_vllm.serving")

SUGGEST_PATH = "/sentinel/labels/suggest"
MAX_SUGGEST = 10_000


def parse_query(query: bytes) -> tuple[str, int, int]:
    """``(slice, n, seed)`` of a query string (a random seed when none is given).

    Raises
    ------
    ValueError
        A missing or repeated ``slice`` or ``n``, ``n`` not an integer in 1..MAX_SUGGEST,
        or ``seed`` not a non-negative integer.
    """
    try:
        args = parse_qs(query.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ValueError("the query string is not UTF-8") from None
    for key in ("slice", "n"):
        if len(args.get(key, [])) != 1 or not args[key][0]:
            raise ValueError(f"give one '{key}' (GET {SUGGEST_PATH}?slice=S&n=N)")
    n = _int(args["n"][0], "n")
    if not 1 <= n <= MAX_SUGGEST:
        raise ValueError(f"n must be in 1..{MAX_SUGGEST}, got {n}")
    seed = _int(args["seed"][0], "seed") if args.get("seed") else secrets.randbits(32)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return args["slice"][0], n, seed


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {text[:40]!r}") from None


async def handle_suggest(get_audit, scope, send) -> None:
    """Answer one (authorized) request to ``/sentinel/labels/suggest``."""
    if scope.get("method", "GET") != "GET":
        return await send_json(send, 405, {"error": "Method Not Allowed: GET only"}, [(b"allow", b"GET")])
    try:
        slice_label, n, seed = parse_query(scope.get("query_string", b""))
    except ValueError as exc:
        return await send_json(send, 400, {"error": str(exc)})
    audit = await audit_or_503(get_audit, send)
    if audit is None:
        return
    try:
        body = await audit.suggest(slice_label, n, seed)
    except LookupError as exc:
        return await send_json(send, 404, {"error": str(exc.args[0])})
    except Exception as exc:  # noqa: BLE001 (nothing was stored: the transaction rolled back)
        log.exception("sentinel audit store: suggest")
        audit.error()
        return await send_json(send, 503, {"error": f"audit store: {type(exc).__name__}: {exc}"})
    await send_json(send, 200, body)
