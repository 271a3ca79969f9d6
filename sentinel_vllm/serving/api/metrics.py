"""Prometheus metrics of the serving sentinel: per-slice accuracy over a window, drift.

Every scored response adds its P(correct) to its slice's sliding window (bounded
both by count and by age); the slice's estimated accuracy is the window mean
(docs/method.md "Aggregation"; arXiv 2601.09001 Sec. 3.4), with the 95% interval of
:func:`sentinel_vllm.aggregate.estimate_accuracy`: the band of the sentinel file
(``q + 1.96 * se``, the sentinel's own error on held-out units plus sampling noise), or
the sampling part alone for a file without one. A slice whose estimate falls
more than ``drift_margin`` below its baseline accuracy raises the drift gauge.

Fleet-wide series (counters, which Prometheus sums across API-server processes,
data-parallel engines' servers and replicas; labels ``model_name`` (vLLM's own
label, so the two join), ``sentinel`` (sentinel file id) and ``slice``):

==========================================  =========  ===========================
name                                        type       meaning
==========================================  =========  ===========================
``sentinel_p_correct``                      histogram  P(correct) of each scored
                                                       response (``_sum``, ``_count``)
``sentinel_p_correct_variance_total``       counter    sum of p(1 - p) (Poisson-
                                                       binomial variance numerator)
``sentinel_band_shift_halfwidth``           gauge      the band's ``q`` (constant;
                                                       label ``interval``: ``band``,
                                                       or ``sampling`` with 0)
==========================================  =========  ===========================

so that over any interval the fleet estimate of a slice is
``sum(rate(sentinel_p_correct_sum)) / sum(rate(sentinel_p_correct_count))`` and its
95% interval half-width ``q + 1.96 * sqrt(sum(increase(variance))) / sum(increase(count))``
(the recording and alerting rules in ``deploy/monitoring/``).

Per-process series (labels ``model``, ``sentinel``, ``replica``):

==========================================  =========  ===========================
``sentinel_estimated_accuracy``             gauge      slice (window mean)
``sentinel_estimated_accuracy_ci_low``      gauge      slice (the band's bounds)
``sentinel_estimated_accuracy_ci_high``     gauge      slice
``sentinel_window_responses``               gauge      slice
``sentinel_drift_alert``                    gauge 0/1  slice
``sentinel_baseline_accuracy``              gauge      slice (slices with a baseline)
``sentinel_requests_scored_total``          counter    slice
``sentinel_errors_total``                   counter    reason (bounded set)
``sentinel_response_entropy_nats``          histogram  (mean entropy of a response)
==========================================  =========  ===========================

The window gauges (first five) describe one process's own sliding window: with
one API server they are the estimate, ready to read without any rule. In
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which vLLM
sets for ``--api-server-count > 1``) no query could combine windows of several
processes, so they are not exported there (the fleet series above are); the
baseline gauge is the same in every process (``multiprocess_mode="max"``).

The audited-accuracy gauges (``sentinel_audited_accuracy`` and its interval,
``sentinel_audit_labels``, ``sentinel_audit_responses``; same labels) are in
:mod:`sentinel_vllm.serving.api.audit_store`.

Cardinality is bounded: slice labels come from an allowlist and/or a cap on the
number of distinct labels (:class:`SliceLabeler`); the rest count as ``other``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

__all__ = [
    "SliceLabeler",
    "SlidingWindow",
    "SentinelMetrics",
    "load_baseline",
    "metrics_options",
    "METRICS_OPTIONS",
    "ERROR_REASONS",
    "DEFAULT_SLICE",
    "OTHER_SLICE",
]

DEFAULT_SLICE = "default"
OTHER_SLICE = "other"
MAX_LABEL_LEN = 64
# Error reasons are a closed set so the error counter's cardinality is bounded (docs/serving.md,
# "The response block"); "unsupported": a request the sentinel cannot score by design
# (several prompts in one /v1/completions request).
ERROR_REASONS = ("fetch_timeout", "rpc", "scoring", "missing_series", "nonfinite", "internal", "audit",
                 "upstream", "unsupported")
#: The :class:`SentinelMetrics` options that ``ServerConfig`` and ``ProxyConfig`` carry under
#: these names (``serve`` and ``proxy`` read them from the same ``--sentinel-*`` options).
METRICS_OPTIONS = ("replica", "slices", "max_slices", "window_count", "window_seconds", "baseline",
                   "drift_margin", "min_samples")
P_CORRECT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0, float("inf"))
ENTROPY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, float("inf"))


class SliceLabeler:
    """Map client-supplied slice labels onto a bounded label set.

    Parameters
    ----------
    allowlist : iterable of str, optional
        If given, only these labels are kept; anything else becomes ``"other"``.
    max_slices : int, default 32
        Cap on distinct labels kept (first come, first kept), counting the
        allowlist's; later new labels become ``"other"``.

    Notes
    -----
    A missing or empty label becomes ``"default"``; a non-string label, or one
    longer than 64 characters, becomes ``"other"``. Thread-safe.
    """

    def __init__(self, allowlist: Iterable[str] | None = None, *, max_slices: int = 32):
        if max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}")
        self.allowlist = frozenset(allowlist) if allowlist else None
        self.max_slices = int(max_slices)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, label) -> str:
        """Return the bounded label for ``label``."""
        if label is None or label == "":
            label = DEFAULT_SLICE
        if not isinstance(label, str) or len(label) > MAX_LABEL_LEN:
            return OTHER_SLICE
        if self.allowlist is not None and label not in self.allowlist and label != DEFAULT_SLICE:
            return OTHER_SLICE
        with self._lock:
            if label in self._seen:
                return label
            if len(self._seen) >= self.max_slices:
                return OTHER_SLICE
            self._seen.add(label)
            return label


class SlidingWindow:
    """The most recent values, bounded by count and by age.

    Parameters
    ----------
    max_count : int
        Keep at most this many values (the newest).
    max_age_s : float or None
        Drop values older than this many seconds; ``None`` means no age limit.
    clock : callable returning float seconds, default ``time.monotonic``
        Injected in tests.
    """

    def __init__(self, max_count: int = 1000, max_age_s: float | None = 3600.0, *, clock=None):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        self.max_age_s = max_age_s
        self._clock = clock or time.monotonic
        self._items: deque[tuple[float, float]] = deque(maxlen=int(max_count))

    def add(self, value: float) -> None:
        """Append a value stamped with the current clock time."""
        self._items.append((self._clock(), float(value)))

    def values(self) -> np.ndarray:
        """Values still in the window, oldest first; float64, shape (n,)."""
        if self.max_age_s is not None:
            cutoff = self._clock() - self.max_age_s
            while self._items and self._items[0][0] < cutoff:
                self._items.popleft()
        return np.fromiter((v for _, v in self._items), dtype=np.float64, count=len(self._items))


def load_baseline(path_or_mapping) -> dict[str, float]:
    """Read per-slice baseline accuracies.

    Parameters
    ----------
    path_or_mapping : str, Path or mapping
        A JSON file or a mapping: ``{"slice": 0.71, ...}``, or
        ``{"slices": {"slice": 0.71 | {"estimate": 0.71, ...}}}`` (the shape
        ``sentinel-vllm estimate`` writes). The key ``"*"`` is the baseline of
        slices not listed.

    Returns
    -------
    dict of str to float in [0, 1]

    Raises
    ------
    ValueError
        Unreadable file, bad JSON, or a value that is not a number in [0, 1].
    """
    data = path_or_mapping
    if isinstance(path_or_mapping, (str, Path)):
        try:
            data = json.loads(Path(path_or_mapping).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read baseline {path_or_mapping}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError("baseline must be a JSON object of slice -> accuracy")
    if isinstance(data.get("slices"), Mapping):
        data = data["slices"]
    out = {}
    for name, val in data.items():
        if isinstance(val, Mapping):
            val = val.get("estimate", val.get("accuracy"))
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 1:
            raise ValueError(f"baseline for slice {name!r} must be a number in [0, 1], got {val!r}")
        out[str(name)] = float(val)
    return out


def metrics_options(config) -> dict:
    """The :data:`METRICS_OPTIONS` of a config, as keyword arguments of :class:`SentinelMetrics`."""
    return {name: getattr(config, name) for name in METRICS_OPTIONS}


class SentinelMetrics:
    """Sliding-window slice accuracy, drift alert and counters, exported to Prometheus.

    Parameters
    ----------
    model : str
        Served model name (label ``model``).
    sentinel_id : str
        Sentinel file id (label ``sentinel``).
    replica : str, optional
        Replica/instance label; default ``$SENTINEL_REPLICA`` or the hostname.
    slices : iterable of str, optional
        Slice allowlist (see :class:`SliceLabeler`).
    max_slices : int, default 32
        Cap on distinct slice labels.
    window_count : int, default 1000
        Responses kept per slice window.
    window_seconds : float or None, default 3600
        Age limit of the window in seconds (None: count only).
    band : dict, optional
        The sentinel file's ``band`` metadata; None: the interval gauges are the
        sampling interval and ``sentinel_band_shift_halfwidth`` says ``interval="sampling"``.
    baseline : mapping or path, optional
        Baseline accuracy per slice (:func:`load_baseline`).
    drift_margin : float, default 0.05
        Alert when ``estimate < baseline - drift_margin`` (accuracy points).
    min_samples : int, default 20
        No alert while the window holds fewer responses.
    registry : prometheus_client.CollectorRegistry, optional
        Default: the global registry vLLM's ``/metrics`` serves.
    clock : callable, optional
        Seconds; injected in tests.
    """

    def __init__(
        self,
        *,
        model: str,
        sentinel_id: str,
        replica: str | None = None,
        slices: Iterable[str] | None = None,
        max_slices: int = 32,
        window_count: int = 1000,
        window_seconds: float | None = 3600.0,
        band=None,
        baseline=None,
        drift_margin: float = 0.05,
        min_samples: int = 20,
        registry=None,
        clock: Callable[[], float] | None = None,
    ):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        from sentinel_vllm.aggregate import check_band, interval_kind

        self.band = None if band is None else check_band(band)
        if not 0 <= drift_margin <= 1:
            raise ValueError(f"drift_margin must be in [0, 1], got {drift_margin}")
        self.labeler = SliceLabeler(slices, max_slices=max_slices)
        self.window_count, self.window_seconds = window_count, window_seconds
        self.baseline = load_baseline(baseline) if baseline is not None else {}
        self.drift_margin, self.min_samples = float(drift_margin), int(min_samples)
        self._clock = clock or time.monotonic
        self._windows: dict[str, SlidingWindow] = {}
        self._lock = threading.Lock()
        replica = replica or os.environ.get("SENTINEL_REPLICA") or socket.gethostname()
        self._base = {"model": model, "sentinel": sentinel_id, "replica": replica}
        self.registry = reg = REGISTRY if registry is None else registry
        self.base_labels = self._base  # the per-process label set (also of the audit gauges)
        #: prometheus-client multiprocess mode (several API servers): no per-process windows
        self.multiprocess = registry is None and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        names = list(self._base)

        def gauge(name, doc, mode="liveall"):
            return Gauge(name, doc, names + ["slice"], registry=reg, multiprocess_mode=mode)

        self.g_acc = self.g_lo = self.g_hi = self.g_n = self.g_drift = None
        if not self.multiprocess:
            self.g_acc = gauge("sentinel_estimated_accuracy", "Mean P(correct) over the slice window")
            self.g_lo = gauge("sentinel_estimated_accuracy_ci_low",
                              "95% interval of the true accuracy (band), lower bound")
            self.g_hi = gauge("sentinel_estimated_accuracy_ci_high",
                              "95% interval of the true accuracy (band), upper bound")
            self.g_n = gauge("sentinel_window_responses", "Responses in the slice window")
            self.g_drift = gauge("sentinel_drift_alert", "1 if estimate < baseline - margin")
        self.g_base = gauge("sentinel_baseline_accuracy", "Configured baseline accuracy", "max")
        self.c_scored = Counter(
            "sentinel_requests_scored", "Responses scored", names + ["slice"], registry=reg
        )
        self.c_err = Counter("sentinel_errors", "Sentinel failures", names + ["reason"], registry=reg)
        self.h_entropy = Histogram(
            "sentinel_response_entropy_nats",
            "Mean per-step entropy of a response (nats)",
            names,
            buckets=ENTROPY_BUCKETS,
            registry=reg,
        )
        fleet = ["model_name", "sentinel", "slice"]
        self._fleet = {"model_name": model, "sentinel": sentinel_id}
        self.h_p = Histogram("sentinel_p_correct", "P(correct) of each scored response", fleet,
                             buckets=P_CORRECT_BUCKETS, registry=reg)
        self.c_var = Counter("sentinel_p_correct_variance",
                             "Sum of p_correct * (1 - p_correct) over scored responses", fleet,
                             registry=reg)
        g_shift = Gauge("sentinel_band_shift_halfwidth",
                        "The band's q: the sentinel's own error on held-out units "
                        "(0: sampling only)",
                        ["model_name", "sentinel", "interval"], registry=reg,
                        multiprocess_mode="max")
        g_shift.labels(**self._fleet, interval=interval_kind(self.band)).set(
            0.0 if self.band is None else float(self.band["q"]))
        for name, value in self.baseline.items():
            if name != "*":
                self.g_base.labels(**self._base, slice=name).set(value)
        for name in sorted(self.labeler.allowlist or ()):
            # known slices start at 0, so rate()/increase() count their first responses too
            self.h_p.labels(**self._fleet, slice=name)
            self.c_var.labels(**self._fleet, slice=name)

    def label_slice(self, raw) -> str:
        """Bounded slice label for a client-supplied one."""
        return self.labeler(raw)

    def observe(self, slice_label: str, p_correct: float, mean_entropy: float | None = None):
        """Record one scored response (``slice_label`` already bounded) and refresh its gauges."""
        with self._lock:
            win = self._windows.get(slice_label)
            if win is None:
                win = SlidingWindow(self.window_count, self.window_seconds, clock=self._clock)
                self._windows[slice_label] = win
            win.add(p_correct)
        self.c_scored.labels(**self._base, slice=slice_label).inc()
        p = min(max(float(p_correct), 0.0), 1.0)
        self.h_p.labels(**self._fleet, slice=slice_label).observe(p)
        self.c_var.labels(**self._fleet, slice=slice_label).inc(p * (1.0 - p))
        if mean_entropy is not None and math.isfinite(mean_entropy):
            self.h_entropy.labels(**self._base).observe(mean_entropy)
        self.refresh(slice_label)

    def error(self, reason: str) -> None:
        """Count one sentinel failure; unknown reasons count as ``internal``."""
        if reason not in ERROR_REASONS:
            reason = "internal"
        self.c_err.labels(**self._base, reason=reason).inc()

    def estimate(self, slice_label: str):
        """:class:`~sentinel_vllm.aggregate.SliceEstimate` of the slice's current window."""
        from sentinel_vllm.aggregate import estimate_accuracy

        with self._lock:
            win = self._windows.get(slice_label)
            values = win.values() if win is not None else np.empty(0)
        return estimate_accuracy(values, band=self.band)

    def baseline_for(self, slice_label: str) -> float | None:
        """Configured baseline of a slice (or the ``"*"`` default), else None."""
        return self.baseline.get(slice_label, self.baseline.get("*"))

    def drift(self, slice_label: str) -> bool:
        """True if the slice's window estimate is more than the margin below its baseline."""
        est = self.estimate(slice_label)
        return self._drift(slice_label, est)

    def _drift(self, slice_label, est) -> bool:
        base = self.baseline_for(slice_label)
        if base is None or est.n < self.min_samples or math.isnan(est.estimate):
            return False
        return est.estimate < base - self.drift_margin

    def refresh(self, slice_label: str | None = None) -> None:
        """Recompute gauges (one slice, or all) from the windows; expires old values.

        In multiprocess mode only the baseline gauge is exported (see the module notes).
        """
        with self._lock:
            names = [slice_label] if slice_label is not None else list(self._windows)
        for name in names:
            lab = dict(self._base, slice=name)
            base = self.baseline_for(name)
            if base is not None:
                self.g_base.labels(**lab).set(base)
            if self.multiprocess:
                continue
            est = self.estimate(name)
            self.g_acc.labels(**lab).set(est.estimate)
            self.g_lo.labels(**lab).set(est.ci_low)
            self.g_hi.labels(**lab).set(est.ci_high)
            self.g_n.labels(**lab).set(est.n)
            self.g_drift.labels(**lab).set(1.0 if self._drift(name, est) else 0.0)
