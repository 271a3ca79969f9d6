"""Serving metrics: slice bounding, sliding windows (count, time), drift, Prometheus output."""

import json

import numpy as np
import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from sentinel_vllm.aggregate import Z_95  # noqa: E402
from sentinel_vllm.serving.api.metrics import (  # noqa: E402
    SentinelMetrics,
    SliceLabeler,
    SlidingWindow,
    load_baseline,
)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_labeler_cap_and_allowlist():
    lab = SliceLabeler(max_slices=2)
    assert [lab(x) for x in ["a", "b", "c", "a", None, "", 5, "x" * 65]] == [
        "a", "b", "other", "a", "other", "other", "other", "other"]
    lab = SliceLabeler(["gsm8k", "math"], max_slices=10)
    assert [lab(x) for x in ["gsm8k", "evil", None, "math"]] == ["gsm8k", "other", "default", "math"]
    # clients cannot grow cardinality past the cap: 10,000 labels -> at most 3 distinct
    lab = SliceLabeler(max_slices=3)
    assert len({lab(f"s{i}") for i in range(10_000)}) == 4  # 3 kept + "other"


def test_window_by_count_and_by_time():
    clock = Clock()
    w = SlidingWindow(max_count=3, max_age_s=10.0, clock=clock)
    for v in [0.1, 0.2, 0.3, 0.4]:
        w.add(v)
        clock.t += 1
    np.testing.assert_array_equal(w.values(), [0.2, 0.3, 0.4])  # count bound
    clock.t += 7.5  # 0.2 was added at t=1001, now 1011.5 - 10 = 1001.5 > 1001
    np.testing.assert_array_equal(w.values(), [0.3, 0.4])
    clock.t += 100
    assert w.values().size == 0
    with pytest.raises(ValueError):
        SlidingWindow(max_count=0)


def _sample(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def _metrics(reg, clock, **kw):
    return SentinelMetrics(model="smol", sentinel_id="sentinel-abc", replica="r1",
                           registry=reg, clock=clock, **kw)


def test_gauges_window_estimate_and_interval():
    reg, clock = prometheus_client.CollectorRegistry(), Clock()
    m = _metrics(reg, clock, window_count=4, window_seconds=60)
    ps = [0.2, 0.9, 0.5, 0.7, 0.6]
    for p in ps:
        m.observe("gsm8k", p, mean_entropy=1.2)
    lab = {"model": "smol", "sentinel": "sentinel-abc", "replica": "r1", "slice": "gsm8k"}
    win = np.array(ps[-4:])  # [0.9, 0.5, 0.7, 0.6]: interval 0.675 +- 0.436, clipped at 1
    est = win.mean()
    se = np.sqrt(np.sum(win * (1 - win))) / 4
    assert _sample(reg, "sentinel_estimated_accuracy", **lab) == pytest.approx(est)
    assert _sample(reg, "sentinel_estimated_accuracy_ci_low", **lab) == pytest.approx(max(0.0, est - Z_95 * se))
    assert _sample(reg, "sentinel_estimated_accuracy_ci_high", **lab) == pytest.approx(min(1.0, est + Z_95 * se))
    assert _sample(reg, "sentinel_window_responses", **lab) == 4
    assert _sample(reg, "sentinel_requests_scored_total", **lab) == 5
    base = {k: lab[k] for k in ("model", "sentinel", "replica")}
    assert _sample(reg, "sentinel_response_entropy_nats_count", **base) == 5
    assert _sample(reg, "sentinel_response_entropy_nats_sum", **base) == pytest.approx(6.0)
    assert _sample(reg, "sentinel_response_entropy_nats_bucket", **base, le="1.5") == 5
    assert _sample(reg, "sentinel_response_entropy_nats_bucket", **base, le="1.0") == 0
    # time window: everything expires; refresh (done before each /metrics scrape) shows it
    clock.t += 61
    m.refresh()
    assert _sample(reg, "sentinel_window_responses", **lab) == 0
    assert np.isnan(_sample(reg, "sentinel_estimated_accuracy", **lab))


def test_drift_alert_with_margin_and_min_samples(tmp_path):
    reg, clock = prometheus_client.CollectorRegistry(), Clock()
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"slices": {"gsm8k": {"estimate": 0.8}, "*": 0.5}}))
    m = _metrics(reg, clock, baseline=path, drift_margin=0.1, min_samples=3, window_count=3)
    lab = {"model": "smol", "sentinel": "sentinel-abc", "replica": "r1", "slice": "gsm8k"}
    m.observe("gsm8k", 0.6)
    m.observe("gsm8k", 0.6)
    assert _sample(reg, "sentinel_drift_alert", **lab) == 0  # below min_samples
    m.observe("gsm8k", 0.6)  # 0.6 < 0.8 - 0.1
    assert _sample(reg, "sentinel_drift_alert", **lab) == 1 and m.drift("gsm8k")
    assert _sample(reg, "sentinel_baseline_accuracy", **lab) == 0.8
    for _ in range(3):
        m.observe("gsm8k", 0.75)  # window now [0.75]*3: 0.75 >= 0.7
    assert _sample(reg, "sentinel_drift_alert", **lab) == 0
    for _ in range(3):
        m.observe("new", 0.35)  # "*" baseline 0.5: 0.35 < 0.4
    assert _sample(reg, "sentinel_drift_alert", **dict(lab, slice="new")) == 1


def test_errors_counter_reasons_are_bounded():
    reg = prometheus_client.CollectorRegistry()
    m = _metrics(reg, Clock())
    m.error("scoring")
    m.error("scoring")
    m.error("anything a client could make up")
    base = {"model": "smol", "sentinel": "sentinel-abc", "replica": "r1"}
    assert _sample(reg, "sentinel_errors_total", **base, reason="scoring") == 2
    assert _sample(reg, "sentinel_errors_total", **base, reason="internal") == 1


def test_slice_cap_through_metrics():
    reg = prometheus_client.CollectorRegistry()
    m = _metrics(reg, Clock(), max_slices=2)
    labels = [m.label_slice(s) for s in ["a", "b", "c", "d"]]
    assert labels == ["a", "b", "other", "other"]


def test_load_baseline_errors(tmp_path):
    assert load_baseline({"a": 0.5, "b": 1}) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="slice 'a'"):
        load_baseline({"a": 1.5})
    with pytest.raises(ValueError, match="cannot read baseline"):
        load_baseline(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read baseline"):
        load_baseline(tmp_path / "bad.json")
