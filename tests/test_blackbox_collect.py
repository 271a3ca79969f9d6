"""``collect --endpoint``: graded top-k traces from an OpenAI-compatible server (a local fake one).

The fake answers the gold for some questions and a wrong number for the others,
with known ``top_logprobs``; one question fails with HTTP 500 until it is allowed.
Checks the grades, the series value by value against ``entropy.py``, that a
failed request is not written and a second run (resume) fills exactly the gap.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from fake_upstream import ServerThread  # noqa: E402
from openai_fixtures import chat_response, choice_steps  # noqa: E402

from sentinel_vllm.blackbox.endpoint_collect import collect_endpoint  # noqa: E402
from sentinel_vllm.collect import parse_benchmarks  # noqa: E402
from sentinel_vllm.datasets import load_benchmark  # noqa: E402
from sentinel_vllm.entropy import entropy_from_top_logprobs  # noqa: E402
from sentinel_vllm.traces import read_traces  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "benchmarks" / "gsm8k.jsonl"


class FakeEndpoint:
    def __init__(self, problems):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.by_q = {p.render(): (i, p) for i, p in enumerate(problems)}
        self.fail_index = 1
        self.bodies, self.auth = [], []

        async def chat(request):
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            i, p = self.by_q[body["messages"][0]["content"]]
            if i == self.fail_index:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            steps = choice_steps(200 + i, 6 + i, body["top_logprobs"])
            resp = chat_response([steps])
            resp["choices"][0]["message"]["content"] = (
                f"The answer is \\boxed{{{p.gold}}}"
                if i % 2 == 0
                else "The answer is \\boxed{-12345}"
            )
            return JSONResponse(resp)

        self.server = ServerThread(
            Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        ).start()


def test_collect_endpoint_graded_and_resumable(tmp_path):
    probs = load_benchmark("gsm8k", n=3, seed=0, path=str(FIX))
    fake = FakeEndpoint(probs)
    out = tmp_path / "t.jsonl"
    kw = dict(
        n=3,
        ks=(1, 5, 20),
        concurrency=2,
        retries=0,
        progress=False,
        benchmark_paths={"gsm8k": str(FIX)},
    )
    try:
        s1 = collect_endpoint(
            fake.server.url + "/v1", "m", parse_benchmarks("gsm8k"), str(out), **kw
        )
        assert s1["gsm8k"]["n"] == 2 and s1["gsm8k"]["failed"] == 1
        assert "HTTP 503" in s1["gsm8k"]["first_error"]
        b = fake.bodies[0]
        assert b["logprobs"] is True and b["top_logprobs"] == 20 and b["model"] == "m"
        recs = {t.id: t for t in read_traces(str(out))}
        assert len(recs) == 2
        fake.fail_index = None
        n_before = len(fake.bodies)
        s2 = collect_endpoint(fake.server.url, "m", parse_benchmarks("gsm8k"), str(out), **kw)
        assert s2["gsm8k"]["n"] == 1 and len(fake.bodies) == n_before + 1  # only the gap
    finally:
        fake.server.stop()
    traces = {t.id: t for t in read_traces(str(out))}
    assert len(traces) == 3
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    for i, p in enumerate(probs):
        tid = f"gsm8k/{p.id.partition('/')[2]}"
        t = traces[tid]
        assert t.correct is (i % 2 == 0)
        steps = choice_steps(200 + i, 6 + i, 20)
        for name, k in (("topk", 20), ("top5", 5), ("top1", 1)):
            want = [entropy_from_top_logprobs([s], k=k)[0] for s in steps]
            np.testing.assert_allclose(t.entropy[name], want, rtol=0, atol=1e-6)
        want = [entropy_from_top_logprobs([s], k=5, renormalize=True)[0] for s in steps]
        np.testing.assert_allclose(t.entropy["top5_renorm"], want, atol=1e-6)
        assert t.k == 20 and "full" not in t.entropy
    line = next(ln for ln in lines if ln["id"] == tid)
    assert line["generation"]["source"] == "endpoint" and line["n_tokens"] == 6 + 2


def test_collect_endpoint_refuses_short_lists(tmp_path):
    """An endpoint capping top_logprobs below the largest k: the response is not written."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        return JSONResponse(chat_response([choice_steps(1, 4, 5)]))  # capped at 5

    srv = ServerThread(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    ).start()
    out = tmp_path / "t.jsonl"
    try:
        s = collect_endpoint(
            srv.url,
            "m",
            parse_benchmarks("gsm8k"),
            str(out),
            n=1,
            ks=(5, 20),
            retries=0,
            progress=False,
            benchmark_paths={"gsm8k": str(FIX)},
        )
    finally:
        srv.stop()
    assert s["gsm8k"]["failed"] == 1 and "fewer than k=20" in s["gsm8k"]["first_error"]
    assert not out.exists() or out.read_text() == ""


def test_cli_collect_endpoint(tmp_path, monkeypatch):
    """``collect --endpoint URL --model NAME``: the CLI branch, key from the environment."""
    import sentinel_vllm.datasets as ds
    from sentinel_vllm.cli import main

    probs = load_benchmark("gsm8k", n=3, seed=0, path=str(FIX))
    real = ds.load_benchmark
    monkeypatch.setattr(
        ds, "load_benchmark", lambda name, **kw: real(name, **dict(kw, path=str(FIX)))
    )
    monkeypatch.setenv("MY_KEY", "sk-test")
    fake = FakeEndpoint(probs)
    fake.fail_index = None
    out = tmp_path / "cli.jsonl"
    try:
        rc = main(
            [
                "collect",
                "--endpoint",
                fake.server.url,
                "--model",
                "their-model",
                "--benchmarks",
                "gsm8k",
                "--n",
                "3",
                "--out",
                str(out),
                "--api-key-env",
                "MY_KEY",
                "--k",
                "5,20",
            ]
        )
        assert rc == 0
        assert (
            main(
                [
                    "collect",
                    "--endpoint",
                    fake.server.url,
                    "--model",
                    "m",
                    "--benchmarks",
                    "gsm8k",
                    "--out",
                    str(out),
                    "--api-key-env",
                    "UNSET_VAR_X",
                ]
            )
            == 1
        )
    finally:
        fake.server.stop()
    traces = list(read_traces(str(out)))
    assert len(traces) == 3
    assert {"topk", "top5", "top5_renorm", "top20_renorm"} == set(traces[0].entropy)
    assert fake.bodies[0]["model"] == "their-model" and fake.bodies[0]["top_logprobs"] == 20
    assert fake.auth[0] == "Bearer sk-test"


def test_cli_collect_endpoint_exit_code_counts_failures(tmp_path, monkeypatch, capsys):
    """Every request failed -> exit 1 and one error line; some failed -> exit 0 and the count."""
    import sentinel_vllm.datasets as ds
    from sentinel_vllm.cli import main

    probs = load_benchmark("gsm8k", n=3, seed=0, path=str(FIX))
    real = ds.load_benchmark
    monkeypatch.setattr(
        ds, "load_benchmark", lambda name, **kw: real(name, **dict(kw, path=str(FIX)))
    )
    out = tmp_path / "x.jsonl"
    argv = ["collect", "--model", "m", "--benchmarks", "gsm8k", "--out", str(out)]
    assert main([*argv, "--endpoint", "http://127.0.0.1:1", "--n", "1"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("sentinel-vllm collect: error: all 1 request(s) failed")
    assert not out.exists() or not list(read_traces(str(out)))
    fake = FakeEndpoint(probs)            # question 1 answers 503, the other two are written
    try:
        assert main([*argv, "--endpoint", fake.server.url, "--n", "3"]) == 0
    finally:
        fake.server.stop()
    assert "1 requests failed and were not written" in capsys.readouterr().err
    assert len(list(read_traces(str(out)))) == 2
