"""The main job, end to end: serve a real model with the sentinel, send real questions, read the scores.

Starts ``sentinel-vllm serve MODEL --sentinel S`` (vLLM's OpenAI-compatible
server with the sentinel), sends benchmark questions concurrently as chat
requests labelled with their slice (``vllm_xargs.sentinel_slice``), grades the
answers, and prints each request's ``p_correct`` beside the graded truth, then
per-slice estimated accuracy (95% interval) against true accuracy, and the
sentinel's Prometheus gauges from ``/metrics``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_demo", "start_server", "launch", "stop_server", "free_port", "chat"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, sentinel: str, port: int, log_path: str, *, max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.25, extra: list[str] | None = None,
                 timeout_s: float = 600.0, env: dict | None = None) -> subprocess.Popen:
    """Start ``sentinel-vllm serve`` and wait until ``/health`` answers.

    Stop it with :func:`stop_server`. ``extra`` holds more ``serve`` options; unless
    it chooses them, the server gets an explicit KV cache size and float32 on CPUs
    without native bf16 (:func:`sentinel_vllm.cpu_defaults.small_server_args`), so it
    starts the same way on a busy machine. ``env``: the child's environment (default
    this process's). The server runs in its own process group (with data parallelism
    or several API servers it has children), which :func:`stop_server` ends.

    Raises
    ------
    RuntimeError
        If the server exits or is not healthy within ``timeout_s`` seconds (the
        message ends with the last lines of its log).
    """
    from sentinel_vllm.cpu_defaults import small_server_args

    extra = list(extra or [])
    defaults = small_server_args()
    for opt, val in zip(defaults[::2], defaults[1::2]):
        if not any(a == opt or a.startswith(opt + "=") for a in extra):
            extra += [opt, val]
    cmd = [sys.executable, "-m", "sentinel_vllm", "serve", model, "--sentinel", sentinel,
           "--port", str(port), "--host", "127.0.0.1", "--max-model-len", str(max_model_len),
           "--gpu-memory-utilization", str(gpu_memory_utilization), *extra]
    return launch(cmd, port, log_path, env=env, timeout_s=timeout_s)


def launch(cmd: list[str], port: int, log_path, *, env: dict | None = None,
           timeout_s: float = 600.0) -> subprocess.Popen:
    """Run a server command in its own process group and wait until ``/health`` answers.

    The one way the demo, the tests and the benchmarks start a server (vLLM's own
    or ``sentinel-vllm serve``). Stop it with :func:`stop_server`.

    Parameters
    ----------
    cmd : list of str
    port : int
        Loopback port the server listens on.
    log_path : path
        Its stdout and stderr.
    env : dict, optional
        The child's environment (default this process's).
    timeout_s : float

    Raises
    ------
    RuntimeError
        If the server exits or is not healthy within ``timeout_s`` seconds (the
        message ends with the error lines and the last lines of its log).
    """
    with open(log_path, "wb") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    stop_server(proc)
    with open(log_path, "rb") as fh:
        lines = fh.read().decode(errors="replace").splitlines()
    causes = [ln for ln in lines if "Error" in ln and "Traceback" not in ln][-8:]
    tail = "\n".join(["...", *causes, "---", *lines[-25:]])
    raise RuntimeError(f"server did not become healthy (exit code {proc.poll()}); log tail:\n{tail}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Terminate a server from :func:`start_server` and its process group.

    SIGTERM to the server first (vLLM shuts its engines down), then SIGKILL to
    the whole group if anything outlives ``timeout_s`` seconds.
    """
    import os
    import signal

    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:  # leftover engine / API-server children of this server only
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def chat(port: int, model: str, question: str, slice_label: str, max_tokens: int) -> dict:
    """One non-streaming chat completion; returns the response JSON."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0.5,
            "vllm_xargs": {"sentinel_slice": slice_label}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def run_demo(model_name: str, sentinel: str, benchmarks: list[str], n: int, *, max_tokens: int = 512,
             concurrency: int = 16, seed: int = 1234, out=sys.stdout) -> dict:
    """Serve, ask, grade, print. Returns the per-slice estimates.

    Parameters
    ----------
    model_name : str
        Short name (``qwen2.5-coder-0.5b``, ``smollm2-135m``), folder or HF id.
    sentinel : str
        ONNX sentinel path or ``"default"``.
    benchmarks : list of str
        Benchmark names (``name:level`` allowed); each is one slice.
    n : int
        Questions per benchmark (seeded sample; the default seed differs from
        the collection seed so questions are unlikely to be training ones).
    """
    from sentinel_vllm.aggregate import estimate_slices
    from sentinel_vllm.collect import parse_benchmarks
    from sentinel_vllm.datasets import grade, load_benchmark
    from sentinel_vllm.model_assets import resolve_model
    from sentinel_vllm.sentinel_file import load_sentinel

    model = resolve_model(model_name)
    specs = parse_benchmarks(",".join(benchmarks))
    problems = [(s, p) for s in specs
                for p in load_benchmark(s.name, n=n, seed=seed, difficulty=s.difficulty)]
    port = free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"sentinel-demo-{port}.log")
    print(f"starting sentinel-vllm serve {model_name} --sentinel {sentinel} (log: {log_path})",
          file=out, flush=True)
    proc = _start_with_status(lambda: start_server(model, sentinel, port, log_path), log_path, out)
    try:
        t0 = time.perf_counter()
        resps = _ask_with_progress(port, model, problems, max_tokens, concurrency, out)
        dt = time.perf_counter() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = [ln for ln in r.read().decode().splitlines()
                       if ln.startswith("sentinel_") and "estimated_accuracy" in ln]
    finally:
        stop_server(proc)
    tokens = sum(r["usage"]["completion_tokens"] for r in resps)
    print(f"\n{len(resps)} requests in {dt:.0f} s ({tokens / max(dt, 1e-9):.1f} tokens/s)\n", file=out)
    print(f"{'request':28s} {'slice':10s} {'tokens':>6s} {'p_correct':>9s}  graded", file=out)
    slices, ps, truth = [], [], []
    for (spec, prob), r in zip(problems, resps):
        block = r.get("sentinel", {})
        text = r["choices"][0]["message"]["content"] or ""
        g = grade(prob, text)
        p = block.get("p_correct")
        shown = f"{p:9.3f}" if p is not None else f"{'error':>9s}"
        print(f"{prob.id:28s} {spec.slice:10s} {r['usage']['completion_tokens']:6d} {shown}  "
              f"{'correct' if g.correct else 'wrong'}", file=out)
        if p is not None:
            slices.append(spec.slice)
            ps.append(p)
            truth.append(bool(g.correct))
    band = load_sentinel(sentinel).metadata.get("band")
    est = estimate_slices(slices, ps, truth, band)
    print_table(est, band, out)
    if metrics:
        print("\n/metrics (sentinel gauges):", file=out)
        for ln in metrics[:12]:
            print("  " + ln, file=out)
    return est


def print_table(est, band, out) -> None:
    """The per-slice table: estimate, its 95% interval (band or sampling, said), truth, AEE."""
    from sentinel_vllm.aggregate import interval_kind, interval_note

    head = f"95% {interval_kind(band)}"
    print(f"\n{'slice':10s} {'n':>4s} {'estimated':>9s} {head:>15s} {'true':>6s} {'AEE':>6s}",
          file=out)
    for s, e in est.items():
        print(f"{s:10s} {e.n:4d} {e.estimate:9.3f} {f'[{e.ci_low:.2f}, {e.ci_high:.2f}]':>15s} "
              f"{e.true:6.3f} {e.aee:6.3f}", file=out)
    print(interval_note(band), file=out)


def _start_with_status(start, log_path: str, out, every_s: float = 5.0):
    """Run ``start()`` (blocking until the server is healthy) while printing its progress.

    Every ``every_s`` seconds one line: time waited and the server log's last line
    (model loading, KV cache, compilation...), so a slow start is never silent.
    """
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(start)
        while True:
            try:
                proc = fut.result(timeout=every_s)
                break
            except TimeoutError:
                print(f"  server starting: {time.perf_counter() - t0:4.0f} s  {_last_log_line(log_path)}",
                      file=out, flush=True)
    print(f"server ready after {time.perf_counter() - t0:.0f} s", file=out, flush=True)
    return proc


def _last_log_line(path: str, width: int = 90) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    line = lines[-1].split("] ", 1)[-1].strip()  # drop vLLM's "(APIServer pid=..) INFO ... [file:line]"
    return line if len(line) <= width else line[: width - 3] + "..."


def _ask_with_progress(port, model, problems, max_tokens, concurrency, out) -> list[dict]:
    """Send every question concurrently; a progress bar counts answers and tokens/s."""
    from concurrent.futures import as_completed

    try:
        from tqdm import tqdm
    except ImportError:  # plain lines instead of a bar
        tqdm = None
    resps: list = [None] * len(problems)
    bar = tqdm(total=len(problems), unit="req", desc="answered", file=out, dynamic_ncols=True) \
        if tqdm is not None else None
    t0, tokens = time.perf_counter(), 0
    with ThreadPoolExecutor(concurrency) as pool:
        futs = {pool.submit(chat, port, model, p.render(), spec.slice, max_tokens): i
                for i, (spec, p) in enumerate(problems)}
        for done, fut in enumerate(as_completed(futs), 1):
            resps[futs[fut]] = r = fut.result()
            tokens += r["usage"]["completion_tokens"]
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
                bar.update(1)
            else:
                print(f"  answered {done}/{len(problems)}  {rate:.1f} tokens/s", file=out, flush=True)
    if bar is not None:
        bar.close()
    return resps
