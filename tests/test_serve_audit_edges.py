"""Edges of the serving audit and the middleware's body handling (no model).

Deeply nested JSON bodies, a kept store's gauges on the first scrape, gauges of slices the
retention emptied, other methods on ``/sentinel/labels``, the multi-prompt error block, an
unrelated SQLite file as the store, BOM-prefixed label bodies.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")

from test_serve_middleware import FakeEngine, _auth_env, _find_cfg, make_app, tiny  # noqa: E402,F401

from sentinel_vllm.audit import MIN_LABELS, audit_slice  # noqa: E402
from sentinel_vllm.serving.api.audit_gauges import AuditGauges  # noqa: E402
from sentinel_vllm.serving.api.audit_store import AuditStore, ServingAudit  # noqa: E402
from sentinel_vllm.serving.api.labels import BodyError, parse_body  # noqa: E402
from sentinel_vllm.serving.api.middleware import SentinelMiddleware, ServerConfig  # noqa: E402

BASE = {"model": "m", "sentinel": "s", "replica": "r"}
NAMES = ("sentinel_audited_accuracy", "sentinel_audited_accuracy_ci_low",
         "sentinel_audited_accuracy_ci_high", "sentinel_audit_labels", "sentinel_audit_responses")


def run(coro):
    return asyncio.run(coro)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- D1: nested JSON in a label body ------------------------------------------------------

def test_deeply_nested_label_body_is_400_and_stores_nothing(tiny):  # noqa: F811
    body = ('[{"id": "x", "correct": ' + deep(1100) + "}]").encode()
    with pytest.raises(BodyError, match="the body is not JSON") as ei:
        parse_body(body)
    assert ei.value.status == 400
    lines = (json.dumps({"id": "a", "correct": True}) + "\n" + '{"id": "b", "correct": ' + deep(1100)
             + "}\n").encode()
    with pytest.raises(BodyError, match="line 2: not JSON") as ei:
        parse_body(lines)  # JSON Lines: the nested line is named
    assert ei.value.status == 400
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine, tiny[0], reg)),
                               base_url="http://t")
    r = run(client.post("/v1/chat/completions", json={"messages": []}))
    ident = r.json()["sentinel"]["id"]
    body = ('[{"id": "' + ident + '", "correct": true}, {"id": "y", "correct": ' + deep(1100)
            + "}]").encode()
    r = run(client.post("/sentinel/labels", content=body))
    assert r.status_code == 400 and r.json()["error"].startswith("the body is not JSON")
    mw = _mw(client)
    assert mw._state.audit.store.counts() == {"default": (1, 0)}


def test_label_body_bom_and_integer_ids_and_single_object():
    assert parse_body(b'\xef\xbb\xbf[{"id": "a", "correct": true}]') == {"a": True}
    assert parse_body(b'\xef\xbb\xbf{"id": "a", "correct": false}\n{"id": 7, "correct": true}\n') == {
        "a": False, "7": True}
    assert parse_body(b'{"id": 12, "correct": true}') == {"12": True}


# ---- D2: nested JSON on the OpenAI routes: forwarded untouched ---------------------------

def _mw(client):
    app = client._transport.app
    node = app.middleware_stack = app.middleware_stack or app.build_middleware_stack()
    while not isinstance(node, SentinelMiddleware):
        node = node.app
    return node


def test_unparseable_bodies_are_forwarded_untouched(tiny):  # noqa: F811
    seen = []

    async def inner(scope, receive, send):  # stands for vLLM: its own 400 for a body it cannot parse
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        seen.append((scope["path"], body, dict(scope["headers"]).get(b"content-length")))
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"vllm: bad body"})

    mw = SentinelMiddleware(inner, config=ServerConfig(sentinel=str(tiny[0])))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t")
    untouched = set()
    for depth in (20000, 1100, *range(900, 1010, 10)):  # around the parser's limit here (~977)
        body = ('{"messages": [], "x": ' + deep(depth) + "}").encode()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
            r = run(client.post(path, content=body, headers={"content-type": "application/json"}))
            assert (r.status_code, r.text) == (400, "vllm: bad body"), (depth, path)
            got = seen.pop()
            assert got[0] == path and (depth < 1000 or got[1] == body), (depth, path)
            if got[1] == body and path != "/v1/messages":  # no client keys there: never rewritten
                untouched.add(depth)
    assert {20000, 1100, 1000} <= untouched and 900 not in untouched  # parsed and rewritten below
    assert mw._state is None  # nothing of the sentinel happened


def test_proxy_client_body_parse_survives_deep_nesting(monkeypatch):
    from sentinel_vllm.blackbox import proxy

    for loads in (json.loads, proxy.loads):  # orjson where installed, and the stdlib fallback
        monkeypatch.setattr(proxy, "loads", loads)
        assert proxy.client_json(("[" * 20000 + "]" * 20000).encode()) is None
        assert proxy.client_json(b'{"a": [1]}') == {"a": [1]}
        assert proxy.client_json(b"[1]") is None and proxy.client_json(b"{oops") is None


# ---- D3: a kept store's gauges on the first scrape ----------------------------------------

def test_kept_store_gauges_on_the_first_scrape(tiny, tmp_path):  # noqa: F811
    db = str(tmp_path / "keep.db")
    st = AuditStore(db)
    p = [0.9, 0.2, 0.7, 0.6]
    st.add([(f"k{i}", "gsm8k", v) for i, v in enumerate(p)])
    st.label({"k0": True, "k1": False, "k2": True})
    st.close()
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    app = make_app(engine, tiny[0], reg)
    _find_cfg(app).audit_db = db  # a restart with --sentinel-audit-db keep.db
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    run(client.get("/metrics"))  # the first request after start
    ref = audit_slice("gsm8k", np.array(p), [True, False, True, None])
    lab = dict(BASE, model="fake-model", sentinel=tiny[1][0], replica="r0", slice="gsm8k")
    got = {n: reg.get_sample_value(n, lab) for n in NAMES}
    assert got == {"sentinel_audited_accuracy": pytest.approx(ref.estimate, abs=1e-12),
                   "sentinel_audited_accuracy_ci_low": pytest.approx(ref.ci_low, abs=1e-12),
                   "sentinel_audited_accuracy_ci_high": pytest.approx(ref.ci_high, abs=1e-12),
                   "sentinel_audit_labels": 3, "sentinel_audit_responses": 4}
    assert engine.calls == []  # no engine RPC for it


# ---- D4: slices the retention emptied, or left with too few labels -------------------------

@pytest.mark.parametrize("multiprocess", [False, True])
def test_pruned_slices_leave_no_stale_gauges(multiprocess):
    now = [1000.0]
    reg = prometheus_client.CollectorRegistry()
    audit = ServingAudit(AuditStore(retention_s=100.0, clock=lambda: now[0]),
                         AuditGauges(reg, BASE, multiprocess=multiprocess))

    def gauges(s):
        return [reg.get_sample_value(n, dict(BASE, slice=s)) for n in NAMES]

    async def go():
        await audit.record([("a0", "a", 0.8), ("a1", "a", 0.3), ("b0", "b", 0.6), ("b1", "b", 0.4)])
        await audit.post({"a0": True, "a1": False, "b0": True, "b1": True})
        now[0] = 1050.0
        await audit.record([("b2", "b", 0.5)])  # b keeps one unlabelled row after the prune
        await audit.refresh()
        ref_a = audit_slice("a", np.array([0.8, 0.3]), [True, False])
        assert gauges("a") == pytest.approx([ref_a.estimate, ref_a.ci_low, ref_a.ci_high, 2, 2])
        assert gauges("b")[3:] == [2, 3] and math.isfinite(gauges("b")[0])
        now[0] = 1120.0  # a0, a1, b0, b1 are past the retention
        assert audit.store.prune() == 4
        await audit.refresh()

    run(go())
    if multiprocess:  # series cannot be removed: zero counts, no estimate (NaN)
        a, b = gauges("a"), gauges("b")
        assert a[3:] == [0, 0] and all(math.isnan(v) for v in a[:3])
        assert b[3:] == [0, 1] and all(math.isnan(v) for v in b[:3])
    else:
        assert gauges("a") == [None] * 5
        assert gauges("b") == [None, None, None, 0, 1]


def test_multiprocess_slice_below_min_labels_reads_nan_even_if_another_process_exported():
    reg = prometheus_client.CollectorRegistry()
    store = AuditStore()
    store.add([("x0", "x", 0.5), ("x1", "x", 0.7)])
    store.label({"x0": True})
    assert MIN_LABELS > 1
    fresh = ServingAudit(store, AuditGauges(reg, BASE, multiprocess=True))
    run(fresh.refresh())  # this process never exported x's estimate; another one may have
    assert math.isnan(reg.get_sample_value("sentinel_audited_accuracy", dict(BASE, slice="x")))
    assert reg.get_sample_value("sentinel_audit_labels", dict(BASE, slice="x")) == 1


# ---- M1: other methods on /sentinel/labels -------------------------------------------------

def test_labels_other_methods_are_405_after_the_key(tiny):  # noqa: F811
    engine, _, client = _auth_env(tiny)
    key = {"Authorization": "Bearer sk-test"}
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        assert run(client.request(method, "/sentinel/labels")).status_code == 401
        r = run(client.request(method, "/sentinel/labels", headers=key))
        assert r.status_code == 405 and r.headers["allow"] == "POST", method
        assert r.json() == {"error": "Method Not Allowed: POST only"}
    assert engine.calls == [] and engine.seen_xargs == []


# ---- M3: the multi-prompt error block --------------------------------------------------------

def test_multi_prompt_block_has_slice_and_reason(tiny):  # noqa: F811
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine, tiny[0], reg)),
                               base_url="http://t")
    r = run(client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2,
                                                 "vllm_xargs": {"sentinel_slice": "gsm8k"}}))
    want = {"error": "the sentinel scores one prompt per /v1/completions request",
            "reason": "unsupported", "slice": "gsm8k"}
    assert [c["sentinel"] for c in r.json()["choices"]] == [want, want]
    lab = {"model": "fake-model", "sentinel": tiny[1][0], "replica": "r0", "reason": "unsupported"}
    # counted per choice vLLM makes: 2 prompts x n = 2 (the fake answers only n choices)
    assert reg.get_sample_value("sentinel_errors_total", lab) == 4
    assert engine.calls == []


# ---- M10: an unrelated SQLite file -----------------------------------------------------------

def test_unrelated_sqlite_file_is_not_an_audit_store(tmp_path):
    for i, ddl in enumerate(["CREATE TABLE responses (id TEXT, body TEXT)",
                             "CREATE TABLE users (name TEXT)"]):
        path = tmp_path / f"other{i}.db"
        db = sqlite3.connect(path)
        db.execute(ddl)
        db.commit()
        db.close()
        with pytest.raises(ValueError, match="not a sentinel audit store"):
            AuditStore(str(path))
        db = sqlite3.connect(path)  # left as it was: no table or index added
        names = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master"))
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
        db.close()
        assert names == (["responses"] if i == 0 else ["users"])
    (tmp_path / "text.db").write_text("hello, not a database at all" * 10)
    with pytest.raises(ValueError, match="cannot open the audit store"):
        AuditStore(str(tmp_path / "text.db"))
    AuditStore(str(tmp_path / "new.db")).close()
    AuditStore(str(tmp_path / "new.db")).close()  # our own store opens again
