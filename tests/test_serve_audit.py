"""The human audit in serving: audit store, ``POST /sentinel/labels``, audited gauges (no model).

The store is checked against hand-set rows; the endpoint through the middleware on the fake
vLLM app of ``test_serve_middleware`` (blocks carry ``id``; labels posted for them move the
slice's audited estimate, which must equal :func:`sentinel_vllm.audit.audit_slice` of the
blocks' ``p_correct`` and the posted labels). Two processes share one store file and one
``PROMETHEUS_MULTIPROC_DIR``, as ``--api-server-count 2`` does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")

from test_serve_middleware import FakeEngine, _auth_env, _middleware, make_app, tiny  # noqa: E402,F401

from sentinel_vllm.audit import MIN_LABELS, audit_slice, read_labels  # noqa: E402
from sentinel_vllm.serving.api.audit_store import AuditStore, audit_id  # noqa: E402
from sentinel_vllm.serving.api.labels import MAX_LABELS, BodyError, parse_body  # noqa: E402

LAB = {"model": "fake-model", "replica": "r0", "slice": "gsm8k"}


def run(coro):
    return asyncio.run(coro)


# ---- ids and the store ------------------------------------------------------------------

def test_audit_id_format():
    sid = "snt-" + "0" * 32
    assert audit_id(sid, 0, 1) == sid
    assert [audit_id(sid, c, 3) for c in range(3)] == [sid + ".0", sid + ".1", sid + ".2"]


def test_store_labels_relabel_unknown_and_estimate():
    st = AuditStore()
    p = [0.9, 0.8, 0.3, 0.6, 0.2, 0.7]
    st.add([(f"r{i}", "a", v) for i, v in enumerate(p)] + [("b0", "b", 0.5)])
    st.add([("r0", "a", 0.1)])  # a known id keeps its first row
    res = st.label({"r0": True, "r2": False, "nope": True})
    assert (res.accepted, res.updated, res.unknown, res.slices) == (2, 0, ["nope"], ["a"])
    res = st.label({"r2": True, "r4": False})  # r2: a reviewer's correction
    assert (res.accepted, res.updated, res.unknown) == (1, 1, [])
    assert st.counts() == {"a": (6, 3), "b": (1, 0)}
    got_p, got_labels = st.arrays("a")
    assert got_p.tolist() == p and got_labels == [True, None, True, None, False, None]
    est = st.audit("a")
    ref = audit_slice("a", np.array(p), [True, None, True, None, False, None])
    assert est == ref and ref.n_labelled == 3
    # hand check of the labels-only part: 2 of 3 correct
    assert est.labels_only == pytest.approx(2 / 3, abs=1e-12)
    assert est.unlabelled == pytest.approx(sum(p) / 6, abs=1e-12)


def test_store_retention_and_row_cap():
    now = [1000.0]
    st = AuditStore(retention_s=100.0, max_rows=3, prune_every_s=60.0, clock=lambda: now[0])
    assert st.maybe_prune() == 0
    for i in range(5):  # t = 1000, 1010, ..., 1040
        st.add([(f"r{i}", "a", 0.5)])
        now[0] += 10
    assert st.counts() == {"a": (5, 0)}  # add never prunes
    assert st.maybe_prune() == 0  # the last prune was at t = 1000, 50 s ago
    now[0] += 10
    assert st.maybe_prune() == 2  # the cap keeps the 3 newest
    assert [r[0] for r in st._db.execute("SELECT id FROM responses ORDER BY t")] == ["r2", "r3", "r4"]
    assert st.prune() == 0
    now[0] = 1125.0  # cutoff 1025: r2 (t = 1020) goes, r3 (t = 1030) stays
    assert st.prune() == 1
    assert st.label({"r2": True, "r3": False}).unknown == ["r2"]
    with pytest.raises(ValueError, match="retention"):
        AuditStore(retention_s=0)


def test_two_store_objects_on_one_file_see_each_others_rows(tmp_path):
    path = str(tmp_path / "audit.sqlite")
    a, b = AuditStore(path), AuditStore(path)
    assert a._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    v_b = b.version()
    a.add([("x1", "s", 0.25), ("x2", "s", 0.75)])
    assert b.version() != v_b  # b sees that another connection wrote
    assert b.label({"x1": False, "x2": True}).accepted == 2
    b.add([("x3", "s", 0.5)])
    assert a.counts() == {"s": (3, 2)}
    assert a.arrays("s")[1] == [False, True, None]
    with pytest.raises(ValueError, match="cannot open the audit store"):
        AuditStore(str(tmp_path / "no" / "such" / "dir.sqlite"))


# ---- request bodies ---------------------------------------------------------------------

def test_parse_body_forms_and_errors(tmp_path):
    items = [{"id": "a", "correct": True}, {"id": "b", "correct": False, "note": "x"}]
    want = {"a": True, "b": False}
    assert parse_body(json.dumps(items).encode()) == want
    assert parse_body(json.dumps({"labels": items}).encode()) == want
    jsonl = "".join(json.dumps(i) + "\n" for i in items)
    assert parse_body(jsonl.encode()) == want
    (tmp_path / "l.jsonl").write_text(jsonl)  # the same file `sentinel-vllm audit --labels` reads
    assert read_labels(tmp_path / "l.jsonl") == want
    assert parse_body(b'{"id": "a", "correct": true}') == {"a": True}
    for body, status, msg in [
        ([{"id": "a", "correct": True}, {"id": "b", "correct": "yes"}], 400,
         "item 1: 'correct' must be true or false, got 'yes'"),
        ([{"id": "a", "correct": True}, {"id": "a", "correct": False}], 400,
         "item 1: id 'a' labelled both true and false"),
        ([{"id": "", "correct": True}], 400, "item 0: 'id' must be a non-empty string"),
        ([{"correct": True}], 400, "item 0: a label needs 'id' and 'correct'"),
        ([], 400, "no labels"),
        ({"labels": 3}, 400, "must be a list"),
        ([{"id": f"i{i}", "correct": True} for i in range(MAX_LABELS + 1)], 413, "at most 10000"),
    ]:
        with pytest.raises(BodyError, match=msg) as ei:
            parse_body(json.dumps(body).encode())
        assert ei.value.status == status
    with pytest.raises(BodyError, match="line 2: not JSON"):
        parse_body(b'{"id": "a", "correct": true}\n{oops\n')
    with pytest.raises(BodyError, match="not JSON"):
        parse_body(b"{oops")


# ---- the endpoint through the middleware ------------------------------------------------

@pytest.fixture
def env(tiny):  # noqa: F811
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    app = make_app(engine, tiny[0], reg)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return engine, reg, client, tiny[1][0]


def _chat(client, i, n=1):
    body = {"messages": [], "max_tokens": 2 + i % 5, "n": n, "vllm_xargs": {"sentinel_slice": "gsm8k"}}
    r = run(client.post("/v1/chat/completions", json=body))
    assert r.status_code == 200
    return [r.json()["sentinel"]] if n == 1 else [c["sentinel"] for c in r.json()["choices"]]


def _gauges(reg, sid, slice_label="gsm8k"):
    lab = dict(LAB, sentinel=sid, slice=slice_label)
    return {name: reg.get_sample_value(name, lab) for name in (
        "sentinel_audited_accuracy", "sentinel_audited_accuracy_ci_low",
        "sentinel_audited_accuracy_ci_high", "sentinel_audit_labels", "sentinel_audit_responses")}


def test_labels_update_the_audited_estimate(env):
    engine, reg, client, sid = env
    blocks = [b for i in range(6) for b in _chat(client, i)] + _chat(client, 9, n=2)
    ids = [b["id"] for b in blocks]
    assert ids[0] == engine.seen_xargs[0]["sentinel_id"]  # n = 1: the sentinel id
    assert ids[-2:] == [engine.seen_xargs[-1]["sentinel_id"] + s for s in (".0", ".1")]
    labels = {ids[0]: True, ids[2]: False, ids[5]: True, ids[7]: False}
    r = run(client.post("/sentinel/labels", json=[{"id": k, "correct": v} for k, v in labels.items()]))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["labels"], out["accepted"], out["updated"], out["unknown"]) == (4, 4, 0, 0)
    p = np.array([b["p_correct"] for b in blocks])
    ref = audit_slice("gsm8k", p, [labels.get(i) for i in ids])
    assert out["slices"] == [ref.as_dict()]
    g = _gauges(reg, sid)
    assert g == {"sentinel_audited_accuracy": pytest.approx(ref.estimate, abs=1e-12),
                 "sentinel_audited_accuracy_ci_low": pytest.approx(ref.ci_low, abs=1e-12),
                 "sentinel_audited_accuracy_ci_high": pytest.approx(ref.ci_high, abs=1e-12),
                 "sentinel_audit_labels": 4, "sentinel_audit_responses": 8}
    # relabel (a correction) and unknown ids, in one request: counted, never dropped silently
    r = run(client.post("/sentinel/labels", json={"labels": [
        {"id": ids[2], "correct": True}, {"id": "snt-expired", "correct": True}]}))
    out = r.json()
    assert (out["accepted"], out["updated"], out["unknown"], out["unknown_ids"]) == (0, 1, 1, ["snt-expired"])
    labels[ids[2]] = True
    # new unlabelled responses move the estimate at the next scrape
    blocks += _chat(client, 11)
    run(client.get("/metrics"))  # the fake app answers 404; the middleware refreshed first
    p = np.array([b["p_correct"] for b in blocks])
    ref = audit_slice("gsm8k", p, [labels.get(b["id"]) for b in blocks])
    g = _gauges(reg, sid)
    assert g["sentinel_audited_accuracy"] == pytest.approx(ref.estimate, abs=1e-12)
    assert g["sentinel_audited_accuracy_ci_high"] == pytest.approx(ref.ci_high, abs=1e-12)
    assert (g["sentinel_audit_labels"], g["sentinel_audit_responses"]) == (4, 9)


def test_bad_batch_stores_nothing_and_big_body_is_413(env):
    engine, reg, client, sid = env
    ids = [_chat(client, i)[0]["id"] for i in range(3)]
    store = _middleware(client)._state.audit.store
    bad = [{"id": ids[0], "correct": True}, {"id": ids[1], "correct": None}]
    r = run(client.post("/sentinel/labels", json=bad))
    assert r.status_code == 400 and r.json() == {"error": "item 1: 'correct' must be true or false, got None"}
    assert store.counts() == {"gsm8k": (3, 0)}
    r = run(client.post("/sentinel/labels", content=b"x" * (4 * 1024 * 1024 + 1)))
    assert r.status_code == 413
    r = run(client.post("/sentinel/labels", json=[{"id": i, "correct": False} for i in ids[:MIN_LABELS - 1]]))
    assert r.status_code == 200 and r.json()["slices"][0]["estimate"] is None
    g = _gauges(reg, sid)  # too few labels: counts, no estimate (and no NaN)
    assert g["sentinel_audited_accuracy"] is None and g["sentinel_audit_labels"] == MIN_LABELS - 1
    assert g["sentinel_audit_responses"] == 3


def test_labels_need_the_api_key(tiny):  # noqa: F811
    engine, reg, client = _auth_env(tiny)
    key = {"Authorization": "Bearer sk-test"}
    r = run(client.post("/v1/chat/completions", headers=key, json={"messages": []}))
    ident = r.json()["sentinel"]["id"]
    body = [{"id": ident, "correct": True}]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert run(client.post("/sentinel/labels", json=body, headers=headers)).status_code == 401
    assert _middleware(client)._state.audit.store.counts() == {"default": (1, 0)}
    r = run(client.post("/sentinel/labels", json=body, headers=key))
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_store_failure_never_costs_a_response(env, monkeypatch):
    engine, reg, client, sid = env
    _chat(client, 0)
    audit = _middleware(client)._state.audit

    def broken(rows):
        raise OSError("disk full")

    monkeypatch.setattr(audit.store, "add", broken)
    b = _chat(client, 1)[0]
    assert b["p_correct"] >= 0 and b["id"].startswith("snt-")
    assert reg.get_sample_value("sentinel_errors_total", {
        "model": "fake-model", "sentinel": sid, "replica": "r0", "reason": "audit"}) == 1
    r = run(client.post("/sentinel/labels", json=[{"id": b["id"], "correct": True}]))
    assert r.json()["unknown_ids"] == [b["id"]]  # reported, not silently dropped


# ---- two API-server processes: one store file, one PROMETHEUS_MULTIPROC_DIR --------------

CHILD = """
import asyncio, json, sys
from prometheus_client import CollectorRegistry
from sentinel_vllm.serving.api.audit_store import ServingAudit
from sentinel_vllm.serving.api.metrics import SentinelMetrics
from sentinel_vllm.serving.api.middleware import ServerConfig
m = SentinelMetrics(model="smol", sentinel_id="s-1", replica="r1")
assert m.multiprocess
audit = ServingAudit.open(ServerConfig(sentinel="x", audit_db=sys.argv[1]), m)
rows, labels = json.loads(sys.argv[2]), json.loads(sys.argv[3])
async def main():
    await audit.record([tuple(r) for r in rows])
    print(json.dumps(await audit.post(labels) if labels else {}))
    await audit.refresh()
asyncio.run(main())
"""


def test_two_processes_share_the_store_and_export_the_latest(tmp_path):
    from prometheus_client import CollectorRegistry, multiprocess

    db, prom = str(tmp_path / "audit.sqlite"), tmp_path / "prom"
    prom.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(prom), "PATH": "/usr/bin:/bin"}
    rows1 = [[f"a{i}", "x", p] for i, p in enumerate([0.9, 0.4, 0.7, 0.2])]
    rows2 = [[f"b{i}", "x", p] for i, p in enumerate([0.6, 0.8])]
    outs = []
    for rows, labels in ((rows1, {"a0": True}), (rows2, {"a1": False, "b0": True, "zz": True})):
        r = subprocess.run([sys.executable, "-c", CHILD, db, json.dumps(rows), json.dumps(labels)],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    # process 2 labelled a1, served by process 1; and saw process 1's label of a0
    assert (outs[1]["accepted"], outs[1]["unknown_ids"]) == (2, ["zz"])
    p = np.array([0.9, 0.4, 0.7, 0.2, 0.6, 0.8])
    ref = audit_slice("x", p, [True, False, None, None, True, None])
    assert outs[1]["slices"] == [ref.as_dict()]
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(prom))
    lab = {"model": "smol", "sentinel": "s-1", "replica": "r1", "slice": "x"}
    # one series per label set (no pid): the most recent value, process 2's
    assert reg.get_sample_value("sentinel_audited_accuracy", lab) == pytest.approx(ref.estimate, abs=1e-12)
    assert reg.get_sample_value("sentinel_audit_labels", lab) == 3
    assert reg.get_sample_value("sentinel_audit_responses", lab) == 6


def test_refresh_recomputes_only_changed_slices():
    from sentinel_vllm.serving.api.audit_store import AuditGauges, ServingAudit

    reg = prometheus_client.CollectorRegistry()
    base = {"model": "m", "sentinel": "s", "replica": "r"}
    audit = ServingAudit(AuditStore(), AuditGauges(reg, base))
    calls = []
    orig = audit.store.audit
    audit.store.audit = lambda s: calls.append(s) or orig(s)

    async def go():
        await audit.record([("a0", "a", 0.2), ("a1", "a", 0.9), ("a2", "a", 0.6), ("b0", "b", 0.4)])
        await audit.refresh()  # no slice has MIN_LABELS labels: counts only, no PPI
        assert calls == []
        await audit.post({"a0": False, "a1": True})
        await audit.refresh()  # nothing changed since the post exported "a"
        await audit.record([("b1", "b", 0.7)])
        await audit.refresh()
        await audit.post({"a1": True})  # the same label again: no change
        await audit.refresh()

    run(go())
    assert calls == ["a", "a"]  # the post, then its relabel post; "b" never needed PPI
    ref = audit_slice("a", np.array([0.2, 0.9, 0.6]), [False, True, None])
    lab = dict(base, slice="a")
    assert reg.get_sample_value("sentinel_audited_accuracy", lab) == pytest.approx(ref.estimate, abs=1e-12)
    assert reg.get_sample_value("sentinel_audit_responses", dict(base, slice="b")) == 2
    assert reg.get_sample_value("sentinel_audited_accuracy", dict(base, slice="b")) is None
