"""Fleet-wide sentinel metrics: counters that sum across processes (prometheus-client multiprocess mode).

Two real processes (as vLLM's ``--api-server-count 2``) record into one
``PROMETHEUS_MULTIPROC_DIR``; the collector vLLM's ``/metrics`` uses must then give the
sums over both, from which the fleet estimate is ``_sum / _count`` exactly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, multiprocess  # noqa: E402

from sentinel_vllm.serving.api.metrics import SentinelMetrics  # noqa: E402

CHILD = """
import sys
from sentinel_vllm.serving.api.metrics import SentinelMetrics
m = SentinelMetrics(model="smol", sentinel_id="sentinel-abc", replica="r1")
for p in map(float, sys.argv[2].split(",")):
    m.observe(sys.argv[1], p, mean_entropy=1.0)
m.error("rpc")
assert m.g_acc is None and m.multiprocess
"""

P = {"a": [[0.9, 0.6], [0.3]], "b": [[0.25], [0.5, 1.0, 0.0]]}


def test_counters_sum_across_processes(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for slice_label, per_proc in P.items():
        for values in per_proc:  # one process per list (several per slice)
            subprocess.run([sys.executable, "-c", CHILD, slice_label, ",".join(map(str, values))],
                           env=env, check=True, timeout=120)
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(tmp_path))
    for slice_label, per_proc in P.items():
        ps = [p for values in per_proc for p in values]
        lab = {"model_name": "smol", "sentinel": "sentinel-abc", "slice": slice_label}
        total = reg.get_sample_value("sentinel_p_correct_sum", lab)
        count = reg.get_sample_value("sentinel_p_correct_count", lab)
        var = reg.get_sample_value("sentinel_p_correct_variance_total", lab)
        assert count == len(ps)
        assert total / count == pytest.approx(sum(ps) / len(ps), abs=1e-12)
        assert var == pytest.approx(sum(p * (1 - p) for p in ps), abs=1e-12)
        assert reg.get_sample_value("sentinel_p_correct_bucket", {**lab, "le": "0.5"}) == \
            sum(p <= 0.5 for p in ps)
    err = reg.get_sample_value("sentinel_errors_total", {"model": "smol", "sentinel": "sentinel-abc",
                                                         "replica": "r1", "reason": "rpc"})
    assert err == 4  # one per process
    names = {m.name for m in reg.collect()}
    assert "sentinel_estimated_accuracy" not in names  # no per-process window in multiprocess mode
    # the band constant: one series over the four processes (max), sampling-only here (no band)
    shift = [s for m in reg.collect() if m.name == "sentinel_band_shift_halfwidth" for s in m.samples]
    assert [(s.labels, s.value) for s in shift] == [
        ({"model_name": "smol", "sentinel": "sentinel-abc", "interval": "sampling"}, 0.0)]


def test_single_process_keeps_window_gauges_and_fleet_series():
    reg = CollectorRegistry()
    m = SentinelMetrics(model="smol", sentinel_id="s", replica="r", registry=reg)
    for p in (0.2, 0.4, 1.0):
        m.observe("x", p)
    lab = {"model_name": "smol", "sentinel": "s", "slice": "x"}
    assert reg.get_sample_value("sentinel_p_correct_sum", lab) == pytest.approx(1.6)
    assert reg.get_sample_value("sentinel_p_correct_count", lab) == 3
    assert reg.get_sample_value("sentinel_p_correct_variance_total", lab) == pytest.approx(0.16 + 0.24)
    assert reg.get_sample_value("sentinel_estimated_accuracy",
                                {"model": "smol", "sentinel": "s", "replica": "r", "slice": "x"}) \
        == pytest.approx(1.6 / 3)


def test_band_gauges_by_hand():
    """With a band q = 0.1: bounds = estimate +- (0.1 + 1.96 sqrt(sum p(1-p)) / n), clipped."""
    from sentinel_vllm.aggregate import Z_95

    reg = CollectorRegistry()
    m = SentinelMetrics(model="smol", sentinel_id="s", replica="r", registry=reg,
                        band={"method": "conformal-linear", "q": 0.1})
    for p in (0.2, 0.4, 0.6) * 10:
        m.observe("x", p)
    lab = {"model": "smol", "sentinel": "s", "replica": "r", "slice": "x"}
    h = 0.1 + Z_95 * (10 * (0.16 + 0.24 + 0.24)) ** 0.5 / 30  # 0.2650
    assert reg.get_sample_value("sentinel_estimated_accuracy_ci_low", lab) == pytest.approx(0.4 - h)
    assert reg.get_sample_value("sentinel_estimated_accuracy_ci_high", lab) == pytest.approx(0.4 + h)
    assert reg.get_sample_value("sentinel_band_shift_halfwidth",
                                {"model_name": "smol", "sentinel": "s", "interval": "band"}) == 0.1
    with pytest.raises(ValueError, match="band method"):
        SentinelMetrics(model="smol", sentinel_id="s2", registry=CollectorRegistry(),
                        band={"method": "other", "q": 0.1})


def test_allowlisted_slices_start_at_zero():
    reg = CollectorRegistry()
    SentinelMetrics(model="m", sentinel_id="s", slices=["a", "b"], registry=reg)
    for sl in ("a", "b"):
        lab = {"model_name": "m", "sentinel": "s", "slice": sl}
        assert reg.get_sample_value("sentinel_p_correct_count", lab) == 0
        assert reg.get_sample_value("sentinel_p_correct_variance_total", lab) == 0
