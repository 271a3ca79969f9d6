"""Active labelling in serving: ``GET /sentinel/labels/suggest``, the design in the audit store, the
weighted gauges (equal to ``sentinel-vllm audit --plan`` on the same responses and labels), the
store's schema migration (no model: the fake vLLM app of ``test_serve_middleware``)."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")

from test_serve_audit import _chat, _gauges, env, run  # noqa: F401
from test_serve_middleware import _auth_env, _middleware, tiny  # noqa: F401

from sentinel_vllm.active_audit import ETA, draw_probabilities, make_plan
from sentinel_vllm.audit import audit_slice
from sentinel_vllm.cli.audit import _planned
from sentinel_vllm.serving.api.audit_store import SCHEMA_VERSION, AuditStore
from sentinel_vllm.serving.api.suggest import parse_query

URL = "/sentinel/labels/suggest"


def test_suggest_label_and_the_gauges_equal_the_cli(env):  # noqa: F811
    _engine, reg, client, sid = env
    blocks = [b for i in range(10) for b in _chat(client, i)] + _chat(client, 10, n=2)
    ids, p = [b["id"] for b in blocks], np.array([b["p_correct"] for b in blocks])
    r = run(client.get(URL, params={"slice": "gsm8k", "n": 8, "seed": 5}))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["slice"], out["n"], out["population"], out["seed"], out["eta"]) == ("gsm8k", 8, 12, 5, ETA)
    # the design: q from the blocks' P(correct), 8 iid draws with seed 5 (what `audit --suggest` draws)
    q = draw_probabilities(p)
    assert out["ids"] == [ids[j] for j in np.random.default_rng(5).choice(12, 8, p=q)]
    store = _middleware(client)._state.audit.store
    got = store._db.execute("SELECT q, p FROM plan_draws WHERE plan = ? ORDER BY draw", (out["plan"],)).fetchall()
    assert [g[0] for g in got] == pytest.approx([q[ids.index(i)] for i in out["ids"]], abs=1e-12)
    # the CLI's plan from the same responses and seed draws the same ids
    traces = [SimpleNamespace(id=i, slice="gsm8k") for i in ids]
    plan = make_plan(sid, ["gsm8k"] * 12, ids, p, 8, seed=5)
    assert plan["slices"]["gsm8k"]["draws"] == out["ids"]
    truth = {i: k % 3 != 0 for k, i in enumerate(ids)}
    labels = {i: truth[i] for i in out["ids"]}
    r = run(client.post("/sentinel/labels", json=[{"id": k, "correct": v} for k, v in labels.items()]))
    assert r.status_code == 200 and r.json()["unknown"] == 0
    cli = _planned(plan, sid, traces, p, labels)[0]  # `sentinel-vllm audit --labels L --plan P`
    assert cli.n_labelled == 8 and cli.n == 12
    assert r.json()["slices"] == [cli.as_dict()]
    g = _gauges(reg, sid)
    assert g == {"sentinel_audited_accuracy": pytest.approx(cli.estimate, abs=1e-12),
                 "sentinel_audited_accuracy_ci_low": pytest.approx(cli.ci_low, abs=1e-12),
                 "sentinel_audited_accuracy_ci_high": pytest.approx(cli.ci_high, abs=1e-12),
                 "sentinel_audit_labels": 8, "sentinel_audit_responses": 12}
    random = audit_slice("gsm8k", p, [labels.get(i) for i in ids])  # what the labels alone would give
    assert random.estimate != pytest.approx(cli.estimate, abs=1e-6)
    # later traffic is outside the plan's population: the planned estimate stays at the next scrape
    _chat(client, 11)
    run(client.get("/metrics"))
    assert _gauges(reg, sid)["sentinel_audited_accuracy"] == pytest.approx(cli.estimate, abs=1e-12)


def test_a_plan_needs_labels_before_it_counts(env):  # noqa: F811
    _engine, reg, client, sid = env
    blocks = [b for i in range(8) for b in _chat(client, i)]
    ids, p = [b["id"] for b in blocks], np.array([b["p_correct"] for b in blocks])
    labels = {ids[0]: True, ids[1]: False, ids[2]: True}  # random labels, no plan: today's audit
    run(client.post("/sentinel/labels", json=[{"id": k, "correct": v} for k, v in labels.items()]))
    ref = audit_slice("gsm8k", p, [labels.get(i) for i in ids])
    assert _gauges(reg, sid)["sentinel_audited_accuracy"] == pytest.approx(ref.estimate, abs=1e-12)
    out = run(client.get(URL, params={"slice": "gsm8k", "n": 4, "seed": 1})).json()
    fresh = [i for i in out["ids"] if i not in labels]
    run(client.get("/metrics"))
    store = _middleware(client)._state.audit.store
    pre = store._db.execute("SELECT count(label) FROM plan_draws WHERE plan = ?", (out["plan"],)).fetchone()[0]
    assert pre == sum(i in labels for i in out["ids"]) == 1  # a label given earlier counts for the plan
    # fewer than MIN_LABELS planned labels: still the random-label audit
    assert _gauges(reg, sid)["sentinel_audited_accuracy"] == pytest.approx(ref.estimate, abs=1e-12)
    run(client.post("/sentinel/labels", json=[{"id": i, "correct": False} for i in fresh]))
    plan = make_plan(sid, ["gsm8k"] * 8, ids, p, 4, seed=1)
    traces = [SimpleNamespace(id=i, slice="gsm8k") for i in ids]
    want = _planned(plan, sid, traces, p, {**labels, **dict.fromkeys(fresh, False)})[0]
    assert _gauges(reg, sid)["sentinel_audited_accuracy"] == pytest.approx(want.estimate, abs=1e-12)


def test_suggest_errors_and_api_key(env, tiny):  # noqa: F811
    _engine, _reg, client, _sid = env
    _chat(client, 0)
    for params, status, msg in [({"n": 3}, 400, "give one 'slice'"), ({"slice": "gsm8k"}, 400, "give one 'n'"),
                                ({"slice": "gsm8k", "n": "x"}, 400, "n must be an integer"),
                                ({"slice": "gsm8k", "n": 0}, 400, "n must be in 1..10000"),
                                ({"slice": "gsm8k", "n": 2, "seed": -1}, 400, "seed must be >= 0"),
                                ({"slice": "nope", "n": 2}, 404, "no response of slice 'nope'")]:
        r = run(client.get(URL, params=params))
        assert (r.status_code, msg in r.json()["error"]) == (status, True), r.text
    r = run(client.post(URL, params={"slice": "gsm8k", "n": 2}))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert parse_query(b"slice=a%2Fb&n=3&seed=9") == ("a/b", 3, 9)
    assert 0 <= parse_query(b"slice=a&n=3")[2] < 2**32  # a random seed, returned to be recorded
    _engine, _reg, client = _auth_env(tiny)
    key = {"Authorization": "Bearer sk-test"}
    run(client.post("/v1/chat/completions", headers=key, json={"messages": []}))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert run(client.get(URL, params={"slice": "default", "n": 2}, headers=headers)).status_code == 401
    r = run(client.get(URL, params={"slice": "default", "n": 2}, headers=key))
    assert r.status_code == 200 and len(r.json()["ids"]) == 2


def test_store_migrates_a_version_0_file(tmp_path):
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)  # the schema before active labelling, with rows and a label
    db.executescript("CREATE TABLE responses (id TEXT PRIMARY KEY, slice TEXT NOT NULL, "
                     "p_correct REAL NOT NULL, t REAL NOT NULL, label INTEGER);"
                     "INSERT INTO responses VALUES ('a', 's', 0.25, 1.0, 1), ('b', 's', 0.75, 2.0, NULL);")
    db.close()
    st = AuditStore(path, clock=lambda: 3.0)
    assert st._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    assert st.counts() == {"s": (2, 1)} and st.arrays("s")[1] == [True, None]
    out = st.suggest("s", 3, seed=0)
    assert out["population"] == 2 and out["window"] == [1.0, 2.0]
    st.close()
    again = AuditStore(path)  # reopening a version-1 store changes nothing
    assert again._db.execute("SELECT count(*) FROM plan_draws").fetchone()[0] == 3
    again._db.execute("CREATE TABLE other (x)")
    again.close()
    with pytest.raises(ValueError, match="is not a sentinel audit store"):
        AuditStore(path)


def test_pruning_keeps_a_plans_labels_until_it_expires():
    now = [100.0]
    st = AuditStore(retention_s=50.0, clock=lambda: now[0])
    st.add([(f"r{i}", "s", v) for i, v in enumerate([0.2, 0.5, 0.8, 0.4])])
    out = st.suggest("s", 4, seed=2)
    now[0] = 140.0
    st.add([("late", "s", 0.6)])
    now[0] = 160.0  # the four responses expire; the plan (created at 100) is 60 s old: it goes too
    assert st.prune() == 4
    assert st._db.execute("SELECT count(*) FROM plans").fetchone()[0] == 0
    st2 = AuditStore(retention_s=50.0, clock=lambda: now[0])
    st2.add([(f"r{i}", "s", v) for i, v in enumerate([0.2, 0.5, 0.8, 0.4])])
    now[0] = 200.0
    out = st2.suggest("s", 4, seed=2)
    st2._db.execute("DELETE FROM responses")  # rows gone (row cap) while the plan is young
    res = st2.label(dict.fromkeys(out["ids"], True))
    assert (res.accepted, res.unknown, res.slices) == (len(set(out["ids"])), [], ["s"])
    design, labels = st2.design("s")
    assert design.population == 4 and set(labels) == set(out["ids"])
