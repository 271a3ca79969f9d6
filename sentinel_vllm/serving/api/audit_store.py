"""The human audit in serving: scored responses in a shared store, labels posted for them.

Every scored choice's block carries ``"id"``, its audit id (:func:`audit_id`). The API
side records ``(id, slice, p_correct, time)`` of every scored choice in an SQLite file
(WAL mode): all API-server processes of one ``sentinel-vllm serve`` open the same file,
so a label posted to any of them finds a response served by any other.
``POST /sentinel/labels`` (:mod:`sentinel_vllm.serving.api.labels`) sets labels; the
slice's audited accuracy is :func:`sentinel_vllm.audit.audit_slice` of the store's
rows of that slice (PPI++ 95% interval), or, once a plan of ``GET
/sentinel/labels/suggest`` (:mod:`sentinel_vllm.serving.api.suggest`; tables ``plans``
and ``plan_draws``) has labelled draws, :func:`sentinel_vllm.active_audit.audit_design`
of that plan's design, exported on ``/metrics`` by
:class:`~sentinel_vllm.serving.api.audit_gauges.AuditGauges`, recomputed when labels arrive and before a scrape when the
store changed.

Rows older than the retention (default 7 days) are dropped, and the oldest beyond a
row cap (default 1,000,000). A store failure never costs a response: it is logged and
counted in ``sentinel_errors_total{reason="audit"}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sentinel_vllm.serving.api.audit_gauges import AuditGauges

__all__ = ["AuditStore", "AuditGauges", "ServingAudit", "LabelResult", "audit_id",
           "DEFAULT_RETENTION_S", "DEFAULT_MAX_ROWS"]

log = logging.getLogger("sentinel_vllm.serving")

DEFAULT_RETENTION_S = 7 * 86400.0
DEFAULT_MAX_ROWS = 1_000_000
BUSY_TIMEOUT_S = 5.0
#: How many unknown ids an answer lists (it always counts them all).
MAX_UNKNOWN_LISTED = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, slice TEXT NOT NULL, p_correct REAL NOT NULL, t REAL NOT NULL,
    label INTEGER);
CREATE INDEX IF NOT EXISTS responses_slice_label ON responses (slice, label);
CREATE INDEX IF NOT EXISTS responses_t ON responses (t);
CREATE TABLE IF NOT EXISTS plans (
    plan INTEGER PRIMARY KEY, slice TEXT NOT NULL, created REAL NOT NULL, n INTEGER NOT NULL,
    seed INTEGER NOT NULL, eta REAL NOT NULL, population INTEGER NOT NULL, p_sum REAL NOT NULL,
    p_sum2 REAL NOT NULL, t_from REAL NOT NULL, t_to REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plan_draws (
    plan INTEGER NOT NULL, draw INTEGER NOT NULL, id TEXT NOT NULL, q REAL NOT NULL,
    p REAL NOT NULL, label INTEGER, PRIMARY KEY (plan, draw));
CREATE INDEX IF NOT EXISTS plan_draws_id ON plan_draws (id);
PRAGMA user_version = 1;
"""
#: Schema versions: 0 (``responses`` only), 1 (+ ``plans`` and ``plan_draws``: active
#: labelling). Opening a version-0 store adds the new tables and keeps its rows.
SCHEMA_VERSION = 1

_COLUMNS = {"responses": {"id", "slice", "p_correct", "t", "label"},
            "plans": {"plan", "slice", "created", "n", "seed", "eta", "population", "p_sum",
                      "p_sum2", "t_from", "t_to"},
            "plan_draws": {"plan", "draw", "id", "q", "p", "label"}}


def _check_schema(db, path) -> None:
    """ValueError for a database that holds other tables than the store's, or one of them
    without its columns (nothing is added to it)."""
    tables = {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    bad = tables - set(_COLUMNS) or [t for t in tables if not _COLUMNS[t] <= {
        r[1] for r in db.execute(f"PRAGMA table_info({t})")}]
    if bad or (tables and "responses" not in tables):
        db.close()
        cols = ", ".join(sorted(_COLUMNS["responses"]))
        raise ValueError(f"{path} is not a sentinel audit store (tables {sorted(tables)}; "
                         f"the store has responses ({cols}), plans and plan_draws)")


def audit_id(sentinel_id: str, child: int, n: int) -> str:
    """The audit id of choice ``child`` of a request: its sentinel id for ``n = 1``,
    ``"<sentinel id>.<choice index>"`` for ``n > 1`` (``snt-<32 hex>.1``)."""
    return sentinel_id if n == 1 else f"{sentinel_id}.{int(child)}"


@dataclass
class LabelResult:
    """What one batch of labels did.

    Attributes
    ----------
    accepted : int
        Ids labelled for the first time.
    updated : int
        Ids that had a label: replaced by the new one (a reviewer's correction).
    unknown : list of str
        Ids the store does not hold (expired, served by another replica, typo).
    slices : list of str
        Slices of the labelled responses.
    """

    accepted: int = 0
    updated: int = 0
    unknown: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)


class AuditStore:
    """Recent scored responses and their labels, in SQLite.

    Parameters
    ----------
    path : str or None
        Database file, shared by every process that opens it (WAL mode). None: a
        private in-memory store (one process).
    retention_s : float
        Rows older than this (seconds) are dropped.
    max_rows : int
        At most this many rows are kept (the oldest are dropped).
    prune_every_s : float
        :meth:`add` prunes at most this often (seconds); :meth:`prune` any time.
    clock : callable, default ``time.time``
        Wall-clock seconds (shared by processes and restarts); injected in tests.

    Raises
    ------
    ValueError
        The file cannot be opened or is not an audit store.
    """

    def __init__(self, path: str | None = None, *, retention_s: float = DEFAULT_RETENTION_S,
                 max_rows: int = DEFAULT_MAX_ROWS, prune_every_s: float = 60.0, clock=time.time):
        if not retention_s > 0 or max_rows < 1:
            raise ValueError(f"audit retention must be > 0 s and max rows >= 1, got "
                             f"{retention_s} and {max_rows}")
        self.path = path
        self.retention_s, self.max_rows, self.prune_every_s = float(retention_s), int(max_rows), prune_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._writes = 0
        self._last_prune = -math.inf
        try:
            self._db = sqlite3.connect(path or ":memory:", timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
            _check_schema(self._db, path)  # first: an unrelated file is left as it was
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the audit store {path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _write(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._writes += 1
            return out

    def add(self, rows) -> None:
        """Record scored responses: ``(id, slice, p_correct)`` triples, stamped now.

        An id already present keeps its first row.
        """
        now = self._clock()
        self._write(lambda db: db.executemany(
            "INSERT OR IGNORE INTO responses (id, slice, p_correct, t) VALUES (?, ?, ?, ?)",
            [(str(i), str(s), float(p), now) for i, s, p in rows]))

    def maybe_prune(self) -> int:
        """:meth:`prune` if the last one is ``prune_every_s`` old; returns rows dropped."""
        return self.prune() if self._clock() - self._last_prune >= self.prune_every_s else 0

    def prune(self) -> int:
        """Drop rows past the retention, then the oldest beyond ``max_rows``; returns how many."""
        self._last_prune = now = self._clock()

        def fn(db):
            old = [r[0] for r in db.execute("SELECT plan FROM plans WHERE created < ?",
                                            (now - self.retention_s,))]
            db.executemany("DELETE FROM plan_draws WHERE plan = ?", [(k,) for k in old])
            db.executemany("DELETE FROM plans WHERE plan = ?", [(k,) for k in old])
            n = db.execute("DELETE FROM responses WHERE t < ?", (now - self.retention_s,)).rowcount
            lo, hi = db.execute("SELECT min(rowid), max(rowid) FROM responses").fetchone()
            if lo is None or hi - lo + 1 <= self.max_rows:  # rowids grow: at most hi - lo + 1 rows
                return n
            return n + db.execute(
                "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses "
                "ORDER BY t DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_rows,)).rowcount
        return self._write(fn)

    def label(self, labels: dict[str, bool]) -> LabelResult:
        """Set labels (``{id: correct}``) in one transaction; a relabel replaces the label."""
        res = LabelResult()

        def fn(db):
            slices, updates = {}, []
            for ident, correct in labels.items():
                row = db.execute("SELECT slice, label FROM responses WHERE id = ?", (ident,)).fetchone()
                if row is None:  # pruned since a plan drew it: the plan keeps the label
                    row = db.execute("SELECT p.slice, d.label FROM plan_draws d JOIN plans p "
                                     "USING (plan) WHERE d.id = ? LIMIT 1", (ident,)).fetchone()
                if row is None:
                    res.unknown.append(ident)
                    continue
                slices[row[0]] = None
                if row[1] is None:
                    res.accepted += 1
                else:
                    res.updated += 1
                updates.append((int(bool(correct)), ident))
            db.executemany("UPDATE responses SET label = ? WHERE id = ?", updates)
            db.executemany("UPDATE plan_draws SET label = ? WHERE id = ?", updates)
            res.slices = list(slices)
        self._write(fn)
        return res

    def version(self) -> tuple[int, int]:
        """Changes by this object and by other connections (equal: nothing changed)."""
        with self._lock:
            return self._writes, self._db.execute("PRAGMA data_version").fetchone()[0]

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{slice: (responses, labelled)}``."""
        return {s: v[:2] for s, v in self.summary().items()}

    def summary(self) -> dict[str, tuple]:
        """``{slice: (responses, labelled, correct labels, first rowid, last rowid, plans)}``:
        equal summaries, equal rows (a relabel to the same value changes nothing); ``plans``:
        the slice's last plan and its labelled and correct draws, or None."""
        with self._lock:
            rows = self._db.execute(
                "SELECT slice, count(*), count(label), total(label), min(rowid), max(rowid) "
                "FROM responses GROUP BY slice").fetchall()
            plans = {r[0]: tuple(r[1:]) for r in self._db.execute(
                "SELECT p.slice, max(p.plan), count(d.label), total(d.label) FROM plans p "
                "JOIN plan_draws d USING (plan) GROUP BY p.slice")}
        return {r[0]: (int(r[1]), int(r[2]), float(r[3]), r[4], r[5], plans.get(r[0]))
                for r in rows}

    def arrays(self, slice_label: str) -> tuple[np.ndarray, list]:
        """The slice's ``p_correct`` (float64) and labels (True/False/None), same order."""
        with self._lock:
            rows = self._db.execute("SELECT p_correct, label FROM responses WHERE slice = ? "
                                    "ORDER BY rowid", (slice_label,)).fetchall()
        p = np.fromiter((r[0] for r in rows), dtype=np.float64, count=len(rows))
        return p, [None if r[1] is None else bool(r[1]) for r in rows]

    def audit(self, slice_label: str):
        """The slice's audited accuracy: under its last plan with at least ``MIN_LABELS``
        labelled draws (:func:`sentinel_vllm.active_audit.audit_design`; labels outside the
        plan are not used), else :func:`sentinel_vllm.audit.audit_slice` of its rows."""
        from sentinel_vllm.audit import audit_slice

        planned = self.design(slice_label)
        if planned is not None:
            from sentinel_vllm.active_audit import audit_design

            return audit_design(slice_label, *planned)
        p, labels = self.arrays(slice_label)
        return audit_slice(slice_label, p, labels)

    def design(self, slice_label: str):
        """``(SliceDesign, {id: label})`` of the slice's last plan with at least ``MIN_LABELS``
        labelled draws, or None."""
        from sentinel_vllm.active_audit import SliceDesign
        from sentinel_vllm.audit import MIN_LABELS

        with self._lock:
            row = self._db.execute(
                "SELECT p.plan, p.population, p.p_sum, p.p_sum2 FROM plans p WHERE p.slice = ? AND "
                "(SELECT count(label) FROM plan_draws d WHERE d.plan = p.plan) >= ? "
                "ORDER BY p.plan DESC LIMIT 1", (slice_label, MIN_LABELS)).fetchone()
            if row is None:
                return None
            draws = self._db.execute("SELECT id, q, p, label FROM plan_draws WHERE plan = ? "
                                     "ORDER BY draw", (row[0],)).fetchall()
        labels = {d[0]: bool(d[3]) for d in draws if d[3] is not None}
        return SliceDesign(int(row[1]), row[2], row[3], [d[:3] for d in draws]), labels

    def suggest(self, slice_label: str, n: int, seed: int) -> dict:
        """Draw ``n`` of the slice's responses (:func:`sentinel_vllm.active_audit.suggest`) and
        record the design: the answer of ``GET /sentinel/labels/suggest``.

        Raises
        ------
        LookupError
            The store holds no response of the slice.
        """
        from sentinel_vllm.active_audit import ETA, METHOD, suggest

        def fn(db):
            rows = db.execute("SELECT id, p_correct, t, label FROM responses WHERE slice = ? "
                              "ORDER BY rowid", (slice_label,)).fetchall()
            if not rows:
                raise LookupError(f"the audit store holds no response of slice {slice_label!r}")
            p = np.array([r[1] for r in rows], dtype=np.float64)
            q, drawn = suggest([r[0] for r in rows], p, n, np.random.default_rng(seed))
            t = [r[2] for r in rows]
            plan = db.execute(
                "INSERT INTO plans (slice, created, n, seed, eta, population, p_sum, p_sum2, t_from, "
                "t_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (slice_label, self._clock(), int(n), int(seed), ETA, len(rows), float(p.sum()),
                 float((p * p).sum()), min(t), max(t))).lastrowid
            db.executemany("INSERT INTO plan_draws (plan, draw, id, q, p, label) VALUES (?, ?, ?, ?, ?, ?)",
                           [(plan, k, rows[j][0], float(q[j]), float(p[j]), rows[j][3])
                            for k, j in enumerate(drawn)])
            return {"plan": plan, "slice": slice_label, "n": int(n), "ids": [rows[j][0] for j in drawn],
                    "population": len(rows), "window": [min(t), max(t)], "method": METHOD,
                    "eta": ETA, "seed": int(seed)}
        return self._write(fn)


class ServingAudit:
    """Store + gauges of one API-server process; every database call runs in one thread.

    Parameters
    ----------
    store : AuditStore
    gauges : AuditGauges or None
    on_error : callable, optional
        Called with ``"audit"`` when the store fails (the metrics' error counter).
    """

    def __init__(self, store: AuditStore, gauges: AuditGauges | None = None, on_error=None):
        self.store, self.gauges, self.on_error = store, gauges, on_error
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sentinel-audit")
        self._seen_version = None
        self._seen: dict[str, tuple] = {}  # slice -> summary of its last export (audit thread)

    @classmethod
    def open(cls, config, metrics=None) -> "ServingAudit | None":
        """From a ``ServerConfig`` (``audit_db`` None: an in-memory store); None on failure
        (logged and counted: serving goes on without the audit)."""
        try:
            store = AuditStore(config.audit_db, retention_s=config.audit_retention_s,
                               max_rows=config.audit_max_rows)
            gauges = None
            if metrics is not None and getattr(metrics, "registry", None) is not None:
                gauges = AuditGauges(metrics.registry, metrics.base_labels,
                                     multiprocess=metrics.multiprocess,
                                     max_slices=metrics.labeler.max_slices + 2)
        except Exception:  # noqa: BLE001 (serving goes on without the audit)
            log.exception("sentinel audit store")
            if metrics is not None:
                metrics.error("audit")
            return None
        return cls(store, gauges, metrics.error if metrics is not None else None)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def record(self, rows) -> None:
        """Store scored responses (never raises: a failure is logged and counted)."""
        try:
            await self._run(self.store.add, rows)
        except Exception:  # noqa: BLE001
            log.exception("sentinel audit store: insert")
            self.error()
            return
        # pruning may take a while on a big store: after the insert, not awaited
        asyncio.get_running_loop().run_in_executor(self.executor, self._prune)

    def _prune(self) -> None:
        try:
            self.store.maybe_prune()
        except Exception:  # noqa: BLE001
            log.exception("sentinel audit store: prune")
            self.error()

    async def post(self, labels: dict[str, bool]) -> dict:
        """Store labels; the answer of ``POST /sentinel/labels``.

        Raises when the labels could not be stored (nothing was); a failure computing the
        estimates afterwards is logged and counted, and the answer lists no slices.
        """
        res = await self._run(self.store.label, labels)
        try:
            estimates = await self._run(self._estimates, res.slices)
            self._export(estimates)
        except Exception:  # noqa: BLE001
            log.exception("sentinel audit store: estimates")
            self.error()
            estimates = []
        return {"labels": len(labels), "accepted": res.accepted, "updated": res.updated,
                "unknown": len(res.unknown), "unknown_ids": res.unknown[:MAX_UNKNOWN_LISTED],
                "slices": [e.as_dict() for e in estimates]}

    async def suggest(self, slice_label: str, n: int, seed: int) -> dict:
        """:meth:`AuditStore.suggest` in the store's thread (raises what it raises)."""
        return await self._run(self.store.suggest, slice_label, n, seed)

    async def refresh(self) -> None:
        """Recompute every slice's gauges when the store changed (before a scrape)."""
        try:
            version = await self._run(self.store.version)
            if version == self._seen_version or self.gauges is None:
                return
            estimates, gone = await self._run(self._changed_estimates)
            self._export(estimates)
            for s in gone:
                self.gauges.drop(s)
            self._seen_version = version
        except Exception:  # noqa: BLE001
            log.exception("sentinel audit store: refresh")
            self.error()

    def _estimates(self, slices):
        known, out = self.store.summary(), []
        for s in slices:
            if s in known:
                out.append(self.store.audit(s))
                self._seen[s] = known[s]
        return out

    def _changed_estimates(self):
        """Estimates of the slices whose rows changed since their last export: the most
        populated slices, bounded like the slice labels; counts only below MIN_LABELS. And
        the exported slices that have no rows any more."""
        from sentinel_vllm.audit import MIN_LABELS, AuditEstimate

        summary = self.store.summary()
        gone = [s for s in self._seen if s not in summary]
        for s in gone:
            del self._seen[s]
        cap = self.gauges.max_slices if self.gauges is not None else len(summary)
        out, nan = [], float("nan")
        for s in sorted(summary, key=lambda s: (-summary[s][0], s))[:cap]:
            if self._seen.get(s) == summary[s]:
                continue
            n, k = summary[s][:2]
            planned = summary[s][5] is not None and summary[s][5][1] >= MIN_LABELS
            out.append(self.store.audit(s) if k >= MIN_LABELS or planned
                       else AuditEstimate(s, n, k, *[nan] * 10))
            self._seen[s] = summary[s]
        return out, gone

    def _export(self, estimates) -> None:
        if self.gauges is not None:
            self.gauges.set(estimates)

    def error(self) -> None:
        """Count one store failure (``sentinel_errors_total{reason="audit"}``)."""
        if self.on_error is not None:
            self.on_error("audit")
