"""``POST /sentinel/labels``: human labels for served responses, by audit id.

Body: a JSON list of ``{"id": "<block id>", "correct": true|false}``, or
``{"labels": [...]}``, or JSON Lines of the same objects (the format
``sentinel-vllm audit --labels`` reads; one definition,
:func:`sentinel_vllm.audit.parse_label`); a single object is one label, an integer
id is taken as its decimal string, a leading UTF-8 byte order mark is skipped.
Validation is all or nothing: any bad item gives 400 naming it (``item 3: ...`` /
``line 3: ...``) and nothing is stored; JSON nested too deeply for the parser is
"not JSON" (400). More than :data:`MAX_LABELS` labels, or a body over
:data:`MAX_BODY_BYTES`, gives 413. The 200 answer counts the distinct ids
(``labels``), those ``accepted`` (new), ``updated`` (replacing an earlier label) and
``unknown`` (ids the store does not hold, the first few listed in ``unknown_ids``),
with the audited estimate of every slice the labels touched (``slices``:
:meth:`sentinel_vllm.audit.AuditEstimate.as_dict`). The middleware checks the API
key first, as for ``/sentinel/stats``; another method than POST then gets 405
(``Allow: POST``).
"""

from __future__ import annotations

import json
import logging

__all__ = ["LABELS_PATH", "MAX_LABELS", "MAX_BODY_BYTES", "parse_body", "handle_labels"]

log = logging.getLogger("sentinel_vllm.serving")

LABELS_PATH = "/sentinel/labels"
MAX_LABELS = 10_000
MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyError(ValueError):
    """A request the endpoint refuses: ``status`` (400 or 413) and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_body(raw: bytes) -> dict[str, bool]:
    """``{id: correct}`` of a request body.

    Raises
    ------
    BodyError
        400 for bad JSON or a bad item (its index named), or no labels; 413 for more
        than :data:`MAX_LABELS`.
    """
    from sentinel_vllm.audit import labels_from

    try:
        text = raw.decode("utf-8-sig")  # a leading byte order mark is accepted
    except UnicodeDecodeError:
        raise BodyError(400, "the body is not UTF-8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if len(lines) < 2:
            raise BodyError(400, f"the body is not JSON ({exc})") from None
        records = []
        for i, ln in lines:  # JSON Lines
            try:
                records.append((f"line {i}", json.loads(ln)))
            except (ValueError, RecursionError) as e:
                raise BodyError(400, f"line {i}: not JSON ({e})") from None
    else:
        if isinstance(obj, dict) and "labels" in obj:
            obj = obj["labels"]
        elif isinstance(obj, dict):
            obj = [obj]
        if not isinstance(obj, list):
            raise BodyError(400, 'the body must be a list of {"id": ..., "correct": true|false} '
                                 'or {"labels": [...]}')
        records = [(f"item {i}", item) for i, item in enumerate(obj)]
    if len(records) > MAX_LABELS:
        raise BodyError(413, f"{len(records)} labels in one request; at most {MAX_LABELS}")
    try:
        labels = labels_from(records)
    except ValueError as exc:
        raise BodyError(400, str(exc)) from None
    if not labels:
        raise BodyError(400, "no labels")
    return labels


async def read_capped(receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body; :class:`BodyError` 413 once it passes ``limit`` bytes."""
    chunks, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            raise BodyError(400, "the client went away")
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyError(413, f"the body is larger than {limit} bytes")
        more = msg.get("more_body", False)
    return b"".join(chunks)


async def handle_labels(get_audit, receive, send, method: str = "POST") -> None:
    """Answer one (authorized) request to ``/sentinel/labels``: 405 unless ``POST``.

    ``get_audit()`` returns the process's ServingAudit, or None (or raises) when the
    store is not available: 503.
    """
    if method != "POST":
        return await send_json(send, 405, {"error": "Method Not Allowed: POST only"},
                               [(b"allow", b"POST")])
    try:
        labels = parse_body(await read_capped(receive))
    except BodyError as exc:
        return await send_json(send, exc.status, {"error": str(exc)})
    audit = await audit_or_503(get_audit, send)
    if audit is None:
        return
    try:
        body = await audit.post(labels)
    except Exception as exc:  # noqa: BLE001 (nothing was stored: the transaction rolled back)
        log.exception("sentinel audit store: labels")
        audit.error()
        return await send_json(send, 503, {"error": f"audit store: {type(exc).__name__}: {exc}"})
    await send_json(send, 200, body)


async def audit_or_503(get_audit, send):
    """The process's audit store, or None after answering 503 (no store, or it failed)."""
    try:
        audit = get_audit()
    except Exception:  # noqa: BLE001 (no engine client)
        log.exception("sentinel state")
        audit = None
    if audit is None:
        await send_json(send, 503, {"error": "the audit store is not available "
                                             "(see the server log)"})
    return audit


async def send_json(send, status: int, body: dict, headers=()) -> None:
    """A complete JSON response (strict JSON), with extra ``headers`` (bytes pairs)."""
    data = json.dumps(body, allow_nan=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})
