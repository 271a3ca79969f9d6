"""The audited-accuracy gauges of the serving audit (:mod:`~sentinel_vllm.serving.api.audit_store`).

One series per slice of each of ``sentinel_audited_accuracy`` (PPI++ estimate),
``sentinel_audited_accuracy_ci_low`` / ``_ci_high`` (its 95% interval),
``sentinel_audit_labels`` and ``sentinel_audit_responses`` (the store's counts; for a slice
audited under a plan of ``GET /sentinel/labels/suggest``, its labelled draws and population). A slice
the store no longer holds (retention, row cap) loses its series with one API server; in
prometheus-client's multiprocess mode, where a series cannot be removed, it reads 0
responses, 0 labels and a NaN estimate.
"""

from __future__ import annotations

import math

__all__ = ["AuditGauges"]


class AuditGauges:
    """The audited-accuracy gauges per slice (labels ``model``, ``sentinel``, ``replica``, ``slice``).

    ``multiprocess_mode="mostrecent"``: every API-server process computes the same values
    from the shared store; the last one written is exported.
    """

    NAMES = ("sentinel_audited_accuracy", "sentinel_audited_accuracy_ci_low",
             "sentinel_audited_accuracy_ci_high", "sentinel_audit_labels", "sentinel_audit_responses")

    def __init__(self, registry, base: dict, *, multiprocess: bool = False, max_slices: int = 34):
        from prometheus_client import Gauge

        docs = ("Audited accuracy (PPI++ from human labels and P(correct))",
                "Audited accuracy, 95% interval lower bound", "Audited accuracy, 95% interval upper bound",
                "Responses in the audit store with a human label", "Responses in the audit store")
        names = [*base, "slice"]
        self.est, self.lo, self.hi, self.n_lab, self.n = (
            Gauge(nm, doc, names, registry=registry, multiprocess_mode="mostrecent")
            for nm, doc in zip(self.NAMES, docs))
        self.base, self.multiprocess, self.max_slices = dict(base), multiprocess, max_slices
        self._with_estimate: set[str] = set()

    def set(self, estimates) -> None:
        """Export :class:`~sentinel_vllm.audit.AuditEstimate` s; without an estimate (fewer than
        ``audit.MIN_LABELS`` labels) only the counts. In multiprocess mode, where a series
        cannot be removed and another process may have exported an estimate, such a slice's
        estimate and interval read NaN."""
        nan = float("nan")
        for e in estimates:
            lab = dict(self.base, slice=e.slice)
            self.n.labels(**lab).set(e.n)
            self.n_lab.labels(**lab).set(e.n_labelled)
            if math.isfinite(e.estimate):
                for g, v in ((self.est, e.estimate), (self.lo, e.ci_low), (self.hi, e.ci_high)):
                    g.labels(**lab).set(v)
                self._with_estimate.add(e.slice)
            elif self.multiprocess:
                for g in (self.est, self.lo, self.hi):
                    g.labels(**lab).set(nan)
            elif e.slice in self._with_estimate:
                self._with_estimate.discard(e.slice)
                self._remove(e.slice, (self.est, self.lo, self.hi))

    def drop(self, slice_label: str) -> None:
        """A slice with no rows left in the store (retention, row cap): its series are removed;
        in multiprocess mode they read 0 responses, 0 labels and a NaN estimate."""
        if self.multiprocess:
            from sentinel_vllm.audit import AuditEstimate

            return self.set([AuditEstimate(slice_label, 0, 0, *[float("nan")] * 10)])
        self._with_estimate.discard(slice_label)
        self._remove(slice_label, (self.est, self.lo, self.hi, self.n_lab, self.n))

    def _remove(self, slice_label: str, gauges) -> None:
        values = [*self.base.values(), slice_label]
        for g in gauges:
            try:
                g.remove(*values)
            except KeyError:  # never exported
                pass
