"""The proxy under a hostile upstream: memory bounded per request, every request ends at its deadline.

Tried as an attacker would (:mod:`hostile_upstream`): 300 MB bodies (three at once, the proxy
a separate process whose peak RSS is read from the kernel), a JSON body that drips forever,
an endless stream, a stream event that never ends, a choice longer than ``max_steps``.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from fake_upstream import ServerThread, free_port  # noqa: E402
from hostile_upstream import HUGE_BYTES, HostileUpstream, _chunk  # noqa: E402
from serving_helpers import make_tiny_sentinel  # noqa: E402

from sentinel_vllm.blackbox.proxy import Proxy, ProxyConfig, _Stream, build_app  # noqa: E402
from sentinel_vllm.blackbox.rewrite import EventSplitter, EventTooLarge, LogprobsAsk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MB = 10**6
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def up():
    h = HostileUpstream()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    path = tmp_path_factory.mktemp("bounds") / "top20.onnx"
    make_tiny_sentinel(path, entropy="topk", k=20)
    return path


def _config(up, sentinel, **opts):
    return ProxyConfig(upstream=up.url, sentinel=str(sentinel), timeout_s=1.0, **opts)


@pytest.fixture(scope="module")
def proxy(up, sentinel):
    """In-thread proxy: deadline 1.5 s, 2 MiB bodies/events, 100 steps per choice."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    cfg = _config(up, sentinel, deadline_s=1.5, max_response_bytes=2 << 20, max_steps=100,
                  model_label="h", replica="t")
    srv = ServerThread(build_app(cfg, registry=reg)).start()
    yield srv.url, reg
    srv.stop()


def _chat(model, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "x"}], **extra}


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM, kernel-kept), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_three_300mb_bodies_keep_the_proxy_under_500mb(up, sentinel, tmp_path):
    """The default bound (64 MiB): each 300 MB body is 502 after 64 MiB, never held whole."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(tmp_path / "proxy.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel_vllm", "proxy", "--upstream", up.url, "--sentinel",
             str(sentinel), "--port", str(port), "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
            try:
                httpx.get(url + "/metrics", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        me = psutil.Process(proc.pid)
        rss0, peak_polled, done = me.memory_info().rss, [0], threading.Event()

        def poll():  # psutil's view beside the kernel's high-water mark
            while not done.is_set():
                peak_polled[0] = max(peak_polled[0], me.memory_info().rss)
                time.sleep(0.01)

        answers = []

        def call():
            answers.append(httpx.post(url + CHAT, json=_chat("huge"), timeout=60))

        watcher = threading.Thread(target=poll)
        watcher.start()
        t0 = time.monotonic()
        calls = [threading.Thread(target=call) for _ in range(3)]
        for t in calls:
            t.start()
        for t in calls:
            t.join(60)
        took = time.monotonic() - t0
        done.set()
        watcher.join()
        peak = _peak_rss(proc.pid)
        print(f"proxy RSS at rest {rss0 / MB:.0f} MB, peak {peak / MB:.0f} MB (polled "
              f"{peak_polled[0] / MB:.0f} MB), three {HUGE_BYTES // MB} MB bodies in {took:.1f} s")
        assert [r.status_code for r in answers] == [502, 502, 502]
        for r in answers:
            msg = r.json()["error"]["message"]
            assert "more than 67108864 bytes" in msg and "--max-response-bytes" in msg, msg
        assert max(peak, peak_polled[0]) < 500 * MB
        # a declared length over the bound is refused before a byte of the body is read
        r = httpx.post(url + CHAT, json=_chat("huge_cl"), timeout=60)
        assert r.status_code == 502 and f"{HUGE_BYTES} bytes" in r.json()["error"]["message"]
        metrics = httpx.get(url + "/metrics").text
        errors = [ln for ln in metrics.splitlines() if ln.startswith("sentinel_errors_total")]
        assert len(errors) == 1 and 'reason="upstream"' in errors[0] and errors[0].endswith(" 4.0")
    finally:
        proc.terminate()
        proc.wait(20)


def test_endless_stream_ends_at_the_deadline(proxy):
    url, _ = proxy
    t0 = time.monotonic()
    with httpx.stream("POST", url + CHAT, json=_chat("endless", stream=True), timeout=30) as r:
        text = r.read().decode()
    took = time.monotonic() - t0
    assert r.status_code == 200 and 1.5 <= took < 4.0, took
    assert text.count('"delta"') > 20  # relayed as it came, until the deadline
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error") and "request deadline (1.5 s, --deadline)" in last


def test_dripping_json_body_and_endless_relay_end_at_the_deadline(proxy):
    url, _ = proxy
    t0 = time.monotonic()
    r = httpx.post(url + CHAT, json=_chat("drip"), timeout=30)
    assert r.status_code == 504 and "request deadline" in r.json()["error"]["message"]
    assert 1.5 <= time.monotonic() - t0 < 4.0
    t0 = time.monotonic()  # a path the sentinel does not touch: relayed, and ended as well
    with httpx.stream("GET", url + "/v1/endless", timeout=30) as r:
        n = sum(len(b) for b in r.iter_bytes())
    assert r.status_code == 200 and n > 10_000 and 1.5 <= time.monotonic() - t0 < 4.0


def test_event_without_end_is_bounded(proxy):
    url, _ = proxy
    t0 = time.monotonic()
    with httpx.stream("POST", url + CHAT, json=_chat("noend", stream=True), timeout=30) as r:
        text = r.read().decode()
    assert time.monotonic() - t0 < 3.0
    assert text.startswith("event: error") and "longer than 2097152 bytes" in text
    assert '"code":502' in text


def test_choice_longer_than_max_steps_says_why(proxy):
    url, reg = proxy
    labels = {"model": "h", "replica": "t", "reason": "unsupported"}
    with httpx.stream("POST", url + CHAT, json=_chat("long", stream=True, max_tokens=250),
                      timeout=30) as r:
        events = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    fin = json.loads(events[-1][6:])
    assert fin["choices"][0]["finish_reason"] == "length" and len(events) == 250
    block = fin["sentinel"]
    assert block["reason"] == "unsupported"
    assert "more than 100 generated tokens" in block["error"] and "--max-steps" in block["error"]
    got = [s.value for m in reg.collect() for s in m.samples
           if s.name == "sentinel_errors_total" and all(s.labels.get(k) == v
                                                         for k, v in labels.items())]
    assert got == [1.0]
    # 100 steps or fewer: scored
    with httpx.stream("POST", url + CHAT, json=_chat("long", stream=True, max_tokens=100),
                      timeout=30) as r:
        events = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    assert json.loads(events[-1][6:])["sentinel"]["n_steps"] == 100


def test_fold_keeps_no_steps_past_the_cap(up, sentinel):
    """10 000 chunks of one choice: what is kept stops at max_steps (and is then dropped)."""
    from prometheus_client import CollectorRegistry

    px = Proxy(_config(up, sentinel, max_steps=100), registry=CollectorRegistry())
    ask = LogprobsAsk(_chat("x"), True, 20)
    st = _Stream(ask, "default", 1 << 20)
    for t in range(10_000):
        obj, finished = px._fold_event(_chunk(t)[:-2], st)
        assert obj["choices"][0]["logprobs"] is None and not finished
        if t == 99:
            assert len(st.acc[0].steps) == 100 and not st.acc[0].overflow
    assert st.acc[0].overflow == 100 and st.acc[0].steps == []
    # a choice index the request cannot have (n = 1) is not kept either
    other = _chunk(0).replace(b'"index": 0', b'"index": 7')[:-2]
    px._fold_event(other, st)
    assert sorted(st.acc) == [0]


def test_event_splitter():
    sp = EventSplitter(max_event_bytes=64)
    assert sp.feed(b"data: a\n") == []
    assert sp.feed(b"\ndata: b\n\nda") == [b"data: a", b"data: b"]
    assert sp.feed(b"ta: c\r\n\r\ndata: d\r\rdata: e\n\n") == [b"data: c", b"data: d", b"data: e"]
    assert sp.feed(b"data: f") == [] and sp.rest() == b"data: f"
    sp.feed(b"x" * 64)
    with pytest.raises(EventTooLarge, match="longer than 64 bytes"):
        sp.feed(b"x")
    # the same cut as the in-engine splitter, read by read
    from sentinel_vllm.serving.api.response import _find_event_end

    for body in (b"data: 1\r\n\r\ndata: 2\n\nevent: x\ndata: 3\r\rdata: 4\n\n",
                 b"data: 1\n\ndata: 2\n\n\n\nevent: x\ndata: 3\n\ndata: 4\n\ntail"):
        want, buf = [], body
        while (cut := _find_event_end(buf))[0] >= 0:
            want.append(buf[: cut[0]])
            buf = buf[cut[0] + cut[1]:]
        for step in (1, 2, 3, 5, 9, len(body)):
            sp, got = EventSplitter(1 << 10), []
            for i in range(0, len(body), step):
                got += sp.feed(body[i : i + step])
            assert got == want and sp.rest() == buf, step


def test_upstream_request_goes_in_one_write():
    """httpcore's two writes (head, body) reach the socket as one, at the first read."""
    import anyio

    from sentinel_vllm.blackbox.proxy import _coalescing_backend

    class Inner:
        def __init__(self):
            self.writes = []

        async def write(self, data, timeout=None):
            self.writes.append(data)

        async def read(self, max_bytes, timeout=None):
            return b"HTTP/1.1 200 OK\r\n"

    async def go():
        backend = _coalescing_backend()
        inner = Inner()

        async def connect(*a, **k):
            return inner

        backend._inner.connect_tcp = connect
        s = await backend.connect_tcp("127.0.0.1", 1)
        await s.write(b"POST / HTTP/1.1\r\n\r\n")
        await s.write(b'{"a": 1}')
        assert inner.writes == []
        assert await s.read(100) == b"HTTP/1.1 200 OK\r\n"
        assert inner.writes == [b'POST / HTTP/1.1\r\n\r\n{"a": 1}']
        await s.write(b"x" * (1 << 16))  # a large upload goes out as it comes
        assert len(inner.writes) == 2

    anyio.run(go)


def test_proxy_client_uses_the_coalescing_backend(up, sentinel):
    from prometheus_client import CollectorRegistry

    px = Proxy(_config(up, sentinel), registry=CollectorRegistry())
    pool = px.client._transport._pool
    assert type(pool._network_backend).__name__ == "Backend"
