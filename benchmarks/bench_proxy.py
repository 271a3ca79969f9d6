"""Cost of ``sentinel-vllm proxy``: added latency (p50/p99) and throughput at concurrency 32.

Side by side in one run, against the same upstream:

* ``direct``         the client calls the upstream, no logprobs (a client without monitoring);
* ``direct+lp``      the client calls the upstream asking ``top_logprobs = 20`` itself;
* ``proxy``          the client calls the proxy (which asks ``top_logprobs = 20`` upstream,
                     scores with a top-20 sentinel, strips the logprobs, adds the block).

The default upstream is a fast fake (uvicorn + Starlette, a canned chat completion
of ``--tokens`` tokens, 20 alternatives each; streamed as one chunk per token), so
the numbers isolate the proxy's own cost; ``--upstream URL --model NAME`` measures a
real server instead (then the generation time dominates). Upstream, proxy and load
generator are separate processes on the same machine.

    python benchmarks/bench_proxy.py                       # fake upstream, JSON and stream
    python benchmarks/bench_proxy.py --requests 2000 --tokens 256
    python benchmarks/bench_proxy.py --json --workers 2    # one JSON object (the headline keys)

Each row is measured in ``--rounds`` rounds with the order of the three paths reversed
every round, so a change in the machine's load falls on all of them alike. ``--json``
prints the rows and, at the highest concurrency, ``proxy_cpu_ms_json``,
``proxy_cpu_ms_stream`` (the proxy's CPU per response, all its processes) and
``throughput_ratio_json``, ``throughput_ratio_stream`` (proxy over ``direct+lp``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- fake upstream


def fake_app(n_tokens: int):
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    rng = np.random.default_rng(0)

    def entry(t, lp):
        return {
            "token": f"t{t}",
            "logprob": float(lp[0]),
            "bytes": [116],
            "top_logprobs": [
                {"token": f"t{t}_{j}", "logprob": float(v), "bytes": [116]}
                for j, v in enumerate(lp)
            ],
        }

    steps = []
    for _ in range(n_tokens):
        x = rng.normal(0, 2.5, 500)
        lp = np.sort(x - (x.max() + np.log(np.exp(x - x.max()).sum())))[::-1][:20]
        steps.append(lp)
    head = {"id": "chatcmpl-b", "created": 1, "model": "fake"}

    def whole(with_lp):
        lp = {"content": [entry(t, s) for t, s in enumerate(steps)]} if with_lp else None
        return json.dumps(
            dict(
                head,
                object="chat.completion",
                choices=[
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x" * n_tokens},
                        "logprobs": lp,
                        "finish_reason": "length",
                    }
                ],
            )
        ).encode()

    def chunks(with_lp):
        out = []
        for t, s in enumerate(steps):
            c = {
                "index": 0,
                "delta": {"content": "x"},
                "logprobs": {"content": [entry(t, s)]} if with_lp else None,
                "finish_reason": "length" if t == n_tokens - 1 else None,
            }
            out.append(
                b"data: "
                + json.dumps(dict(head, object="chat.completion.chunk", choices=[c])).encode()
                + b"\n\n"
            )
        return out + [b"data: [DONE]\n\n"]

    canned = {
        (s, lp): (chunks(lp) if s else whole(lp)) for s in (False, True) for lp in (False, True)
    }

    async def chat(request):
        body = await request.json()
        key = (body.get("stream") is True, body.get("logprobs") is True)
        if key[0]:

            async def gen():
                for c in canned[key]:
                    yield c

            return StreamingResponse(gen(), media_type="text/event-stream")
        return Response(canned[key], media_type="application/json")

    async def health(request):
        return Response(b"ok")

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)]
    )


# ---------------------------------------------------------------- load


async def _one(client, url, body, stream):
    t0 = time.perf_counter()
    if stream:
        async with client.stream("POST", url, json=body) as r:
            async for part in r.aiter_bytes():
                if r.status_code != 200 or part.startswith(b"event: error"):
                    print(f"# {r.status_code}: {part[:300]!r}", file=sys.stderr)
            ok = r.status_code
    else:
        r = await client.post(url, json=body)
        ok = r.status_code if r.json().get("choices") is not None else -1
        if ok != 200:
            print(f"# {r.status_code}: {r.text[:300]}", file=sys.stderr)
    return time.perf_counter() - t0, ok


async def load(url, body, stream, n, concurrency, warmup=8):
    """``n`` requests, ``concurrency`` at a time: ``(latencies ms, wall s, status codes)``."""
    import httpx

    lat = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*[_one(client, url, body, stream) for _ in range(min(warmup, n))])

        async def task():
            async with sem:
                lat.append(await _one(client, url, body, stream))

        t0 = time.perf_counter()
        await asyncio.gather(*[task() for _ in range(n)])
        wall = time.perf_counter() - t0
    return [x * 1e3 for x, _ in lat], wall, [code for _, code in lat]


def summary(ms, wall, codes, n_requests) -> dict:
    ms = np.array(ms)
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": n_requests / wall,
        "failed": sum(code != 200 for code in codes),
        "codes": sorted({code for code in codes if code != 200}),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its children (``--workers N``)."""
    try:
        import psutil

        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    except ImportError:  # the process alone (Linux /proc)
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def make_sentinel(path):
    from sentinel_vllm.classifier import SentinelClassifier
    from sentinel_vllm.features import FEATURE_NAMES

    rng = np.random.default_rng(0)
    X = rng.gamma(2.0, 0.5, size=(400, len(FEATURE_NAMES)))
    y = (rng.random(400) < 1 / (1 + np.exp(3 * (X[:, 0] - 1)))).astype(int)
    return (
        SentinelClassifier(random_state=0)
        .fit(X, y)
        .export_onnx(path, entropy="topk", k=20, training_slices=["synthetic"])
    )


def wait_http(url, proc, timeout_s=120):
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not up")


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc):
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


PATHS = ("direct", "direct+lp", "proxy")


def measure(urls, base, mode, concurrency, n, rounds, proxy_pid) -> list[dict]:
    """The three paths side by side: ``rounds`` rounds, the order reversed every other one
    (A B C, C B A, ...), ``n / rounds`` requests per path and round; one row per path."""
    stream = mode == "stream"
    acc = {p: ([], 0.0, [], 0.0, 0) for p in PATHS}
    per = max(n // rounds, 1)
    for r in range(rounds):
        for path in PATHS if r % 2 == 0 else PATHS[::-1]:
            extra = {"logprobs": True, "top_logprobs": 20} if path == "direct+lp" else {}
            body = dict(base, stream=stream, **extra)
            c0 = cpu_s(proxy_pid)
            ms, wall, codes = asyncio.run(
                load(urls[path] + "/v1/chat/completions", body, stream, per, concurrency)
            )
            cpu = cpu_s(proxy_pid) - c0
            a = acc[path]
            acc[path] = (a[0] + ms, a[1] + wall, a[2] + codes, a[3] + cpu, a[4] + per + 8)
    rows = []
    for path in PATHS:
        ms, wall, codes, cpu, sent = acc[path]
        row = dict(mode=mode, concurrency=concurrency, path=path,
                   **summary(ms, wall, codes, len(ms)))
        row["proxy_cpu_ms"] = cpu * 1e3 / sent if path == "proxy" else None
        rows.append(row)
    return rows


def start_servers(args, tmp, log) -> tuple[list, str, str, str]:
    """Fake upstream (unless ``--upstream``) and proxy: ``(procs, upstream, proxy, sentinel id)``."""
    procs = []
    sentinel = os.path.join(tmp, "top20.onnx")
    sid = make_sentinel(sentinel)
    if args.upstream:
        up = args.upstream.rstrip("/")
    else:
        port = free_port()
        procs.append(start([sys.executable, __file__, "--serve-fake", str(port),
                            "--tokens", str(args.tokens)], log))
        up = f"http://127.0.0.1:{port}"
        wait_http(up + "/health", procs[-1])
    pport = free_port()
    procs.append(start([sys.executable, "-m", "sentinel_vllm", "proxy", "--upstream", up,
                        "--sentinel", sentinel, "--host", "127.0.0.1", "--port", str(pport),
                        "--log-level", "warning", "--workers", str(args.workers)], log))
    proxy = f"http://127.0.0.1:{pport}"
    wait_http(proxy + "/metrics", procs[-1])
    return procs, up, proxy, sid


def print_table(rows, args, up, sid) -> None:
    print(
        f"# bench_proxy: {args.requests} requests per row, concurrency {args.concurrency}, "
        f"{args.rounds} rounds (order alternated), proxy --workers {args.workers}, "
        f"upstream {up if args.upstream else f'fake, {args.tokens} tokens x 20 alternatives'}; "
        f"sentinel {sid}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    print("| mode | conc. | path | p50 ms | p99 ms | req/s | added p50 ms | req/s vs direct "
          "| req/s vs direct+lp | proxy CPU ms/req | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = [x for x in rows if (x["mode"], x["concurrency"]) == (r["mode"], r["concurrency"])]
        d, lp = (next(x for x in same if x["path"] == p) for p in ("direct", "direct+lp"))
        cpu = f"{r['proxy_cpu_ms']:.1f}" if r["proxy_cpu_ms"] is not None else "-"
        print(f"| {r['mode']} | {r['concurrency']} | {r['path']} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['rps']:.0f} | {r['p50'] - d['p50']:+.1f} | "
              f"{r['rps'] / d['rps']:.2f} | {r['rps'] / lp['rps']:.2f} | {cpu} | "
              f"{r['failed']}{' ' + str(r['codes']) if r['codes'] else ''} |")


def headline(rows, args) -> dict:
    """The issue's figures at the highest concurrency: proxy CPU per response, and throughput
    of the proxy over ``direct+lp`` (the same 20 alternatives, asked by the client itself)."""
    top = max(args.concurrency)
    out = {}
    for mode in ("json", "stream"):
        get = {r["path"]: r for r in rows if r["mode"] == mode and r["concurrency"] == top}
        if "proxy" in get:
            out[f"proxy_cpu_ms_{mode}"] = round(get["proxy"]["proxy_cpu_ms"], 3)
            out[f"throughput_ratio_{mode}"] = round(get["proxy"]["rps"] / get["direct+lp"]["rps"],
                                                    3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=640,
                    help="requests per row at concurrency > 1 (100 at concurrency 1)")
    ap.add_argument("--concurrency", default="1,32",
                    type=lambda v: sorted({int(x) for x in v.split(",")}),
                    help="comma-separated concurrencies (default 1,32)")
    ap.add_argument("--modes", default="json,stream", type=lambda v: v.split(","))
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per row, the order of the three paths reversed each round")
    ap.add_argument("--workers", type=int, default=1, help="proxy --workers")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (rows and the headline figures)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per fake response")
    ap.add_argument("--upstream", default=None, help="a real server's root URL instead of the fake")
    ap.add_argument("--model", default="fake")
    ap.add_argument(
        "--max-tokens", type=int, default=128, help="max_tokens per request (real upstream)"
    )
    ap.add_argument("--serve-fake", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_fake:
        import uvicorn

        uvicorn.run(
            fake_app(args.tokens), host="127.0.0.1", port=args.serve_fake, log_level="warning"
        )
        return 0
    tmp = tempfile.mkdtemp(prefix="bench_proxy_")
    with open(os.path.join(tmp, "servers.log"), "wb") as log:
        procs = []
        try:
            procs, up, proxy, sid = start_servers(args, tmp, log)
            rows = run_rows(args, up, proxy, procs[-1].pid)
        finally:
            for p in reversed(procs):
                stop(p)
    if args.json:
        print(json.dumps({
            **headline(rows["rows"], args),
            "workers": args.workers, "tokens": args.tokens, "requests": args.requests,
            "rounds": args.rounds, "cpus": os.cpu_count(), "loadavg_1m": rows["loadavg_1m"],
            "rows": rows["rows"],
        }))
    else:
        print_table(rows["rows"], args, up, sid)
    return 0


def run_rows(args, up, proxy, proxy_pid) -> dict:
    base = {"model": args.model, "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "max_tokens": args.max_tokens, "temperature": 0.0}
    urls = {"direct": up, "direct+lp": up, "proxy": proxy}
    load0, rows = os.getloadavg(), []
    for mode in args.modes:
        for conc in args.concurrency:
            n = args.requests if conc > 1 else min(args.requests, 100)
            rows += measure(urls, base, mode, conc, n, args.rounds, proxy_pid)
    return {"rows": rows, "loadavg_1m": [round(load0[0], 2), round(os.getloadavg()[0], 2)]}

if __name__ == "__main__":
    sys.exit(main())
