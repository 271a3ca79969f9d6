"""A real Prometheus scrapes ``sentinel-vllm serve --api-server-count 2``; the recording rule is the fleet estimate.

Prometheus (Debian's 2.42, ``scripts/test.sh`` installs it) scrapes vLLM's
``/metrics`` every second on loopback and evaluates ``deploy/monitoring/sentinel-rules.yml``
every second. After 16 chat requests (official ``openai`` client) labelled slice
``fleet``, ``slice:sentinel_p_correct:mean5m`` queried over Prometheus' HTTP API must
equal the mean ``p_correct`` of the responses the client saw, within 1e-6, and the
95% interval rules must bracket it. ``promtool check rules`` / ``test rules`` run too.
Labels posted for 12 of the 16 responses, one request (one new connection) each, are all
accepted whichever API server answers (one audit store file), and ``/metrics`` shows one
audited series, equal to :func:`sentinel_vllm.audit.audit_slice` of what the client saw.
"""

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "monitoring" / "sentinel-rules.yml"
RULE_TESTS = ROOT / "deploy" / "monitoring" / "sentinel-rules.test.yml"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
need_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (apt-get install prometheus)")


@need_promtool
def test_promtool_check_and_unit_test_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "SUCCESS: 9 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                       timeout=120, cwd=RULE_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


MODEL = (Path(os.environ.get("SENTINEL_VLLM_CACHE") or Path.home() / ".cache" / "sentinel-vllm")
         / "models" / "smollm2-135m-instruct")
N_REQUESTS = 16


def _query(base, expr):
    import httpx

    r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=30)
    r.raise_for_status()
    return [float(s["value"][1]) for s in r.json()["data"]["result"]]


def _wait_for(base, expr, ok, timeout_s=120):
    deadline, got = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        got = _query(base, expr)
        if ok(got):
            return got
        time.sleep(0.5)
    raise AssertionError(f"{expr}: {got}")


def _wait_ready(prom, base, log_path, timeout_s=300):
    """Block until Prometheus answers ``/-/ready`` (it opens its port only after the TSDB is up;
    on two busy cores that took longer than the warm-up requests). Fails with its log if it exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if prom.poll() is not None:
            pytest.fail(f"prometheus exited with {prom.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/-/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prometheus not ready after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("vllm")
    if PROMETHEUS is None:
        pytest.skip("prometheus missing (apt-get install prometheus; scripts/test.sh does)")
    if not (MODEL / "config.json").is_file():
        pytest.skip(f"no SmolLM2 folder at {MODEL}")
    from serving_helpers import make_tiny_sentinel

    from sentinel_vllm.demo import free_port, start_server, stop_server

    tmp = tmp_path_factory.mktemp("prom")
    make_tiny_sentinel(tmp / "s.onnx")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    try:
        proc = start_server(str(MODEL), str(tmp / "s.onnx"), port, str(tmp / "server.log"),
                            max_model_len=512, env=env, timeout_s=900,
                            extra=["--api-server-count", "2", "--enforce-eager", "--max-num-seqs", "16",
                                   "--sentinel-slices", "fleet,warm"])
    except RuntimeError as exc:
        pytest.fail(str(exc))
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        f"  - job_name: vllm\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    # the port is chosen only now: vLLM's API servers and engine open ports of their own while
    # starting, so one chosen before the server could be taken by then
    prom_port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(prom, f"http://127.0.0.1:{prom_port}", tmp / "prometheus.log")
        yield {"base": f"http://127.0.0.1:{port}", "prom": f"http://127.0.0.1:{prom_port}"}
    finally:
        prom.terminate()
        try:
            prom.wait(30)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        stop_server(proc)


def test_recording_rule_is_the_mean_the_client_saw(stack):
    import openai

    client = openai.AsyncOpenAI(base_url=stack["base"] + "/v1", api_key="none", timeout=600)

    async def chat(i, label):
        r = await client.chat.completions.create(
            model=str(MODEL), messages=[{"role": "user", "content": f"Name {i + 2} colours."}],
            max_tokens=6 + i % 7, temperature=0.9, seed=i,
            extra_body={"vllm_xargs": {"sentinel_slice": label}})
        return r.model_extra["sentinel"]

    async def run(label, n):
        return await asyncio.gather(*(chat(i, label) for i in range(n)))

    loop = asyncio.new_event_loop()
    try:
        # warm-up: each API server that answers creates its metrics, with the allowlisted
        # slices at 0; Prometheus must hold a 0 sample of the fleet series before any counts
        loop.run_until_complete(run("warm", 4))
        _wait_for(stack["prom"], 'sentinel_p_correct_count{slice="fleet"}', lambda v: v == [0.0])
        blocks = loop.run_until_complete(run("fleet", N_REQUESTS))
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    assert all("error" not in b for b in blocks), blocks
    seen = [b["p_correct"] for b in blocks]
    _wait_for(stack["prom"], 'sentinel_p_correct_count{slice="fleet"}',
              lambda v: v == [float(N_REQUESTS)])
    # the rule is evaluated after the scrape that brought the last count (every second; later on
    # busy cores): wait for it to equal the client's mean, failing with the last value it had
    mean = sum(seen) / len(seen)
    est = _wait_for(stack["prom"], 'slice:sentinel_p_correct:mean5m{slice="fleet"}',
                    lambda v: len(v) == 1 and abs(v[0] - mean) <= 1e-6)
    assert est[0] == pytest.approx(mean, abs=1e-6)
    lo = _query(stack["prom"], 'slice:sentinel_p_correct:ci_low5m{slice="fleet"}')
    hi = _query(stack["prom"], 'slice:sentinel_p_correct:ci_high5m{slice="fleet"}')
    assert len(lo) == len(hi) == 1 and lo[0] < est[0] < hi[0]
    # the tiny sentinel has no band: q = 0, the interval says it is sampling noise only
    assert _query(stack["prom"], 'max(sentinel_band_shift_halfwidth{interval="sampling"})') == [0.0]
    assert _query(stack["prom"], 'count(slice:sentinel_p_correct:ci_low5m{slice="fleet",'
                                 'interval="sampling"})') == [1.0]
    # two API-server processes, one merged series: no per-process window gauges exported
    assert _query(stack["prom"], "sentinel_estimated_accuracy") == []
    assert _query(stack["prom"], 'count(vllm:request_success_total{model_name=~".+"})')  # joins vLLM's
    _labels_land_on_any_api_server(stack["base"], blocks)


def _labels_land_on_any_api_server(base, blocks):
    import httpx
    from e2e_helpers import metric

    from sentinel_vllm.audit import audit_slice

    labels = {b["id"]: i % 3 != 0 for i, b in enumerate(blocks[:12])}
    for ident, correct in labels.items():  # a new connection each: the kernel picks the process
        r = httpx.post(base + "/sentinel/labels", json=[{"id": ident, "correct": correct}], timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    ref = audit_slice("fleet", [b["p_correct"] for b in blocks], [labels.get(b["id"]) for b in blocks])
    for _ in range(4):  # whichever process answers the scrape
        text = httpx.get(base + "/metrics", timeout=30).text
        series = [ln for ln in text.splitlines()
                  if ln.startswith("sentinel_audited_accuracy{") and 'slice="fleet"' in ln]
        assert len(series) == 1, series
        assert float(series[0].rsplit(" ", 1)[1]) == pytest.approx(ref.estimate, abs=1e-9)
        assert metric(text, "sentinel_audit_labels", 'slice="fleet"') == 12
        assert metric(text, "sentinel_audit_responses", 'slice="fleet"') == len(blocks)
