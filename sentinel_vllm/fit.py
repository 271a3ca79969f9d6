"""A sentinel for your own model in one command: collect -> choose by LOBO -> train -> report.

The paper's first advice (arXiv 2601.09001, Sec. 5) is to validate on the target model: the
coupling between entropy and correctness differs by model family and size. ``sentinel-vllm
fit`` does the whole loop the project does for its embedded default:

1. **collect** labelled traces of the model on the bundled benchmarks, one file per decoding
   temperature (``<work dir>/traces-t<T>.jsonl.gz``), with :func:`sentinel_vllm.collect.collect`
   (the serving processor; resumable: ids already in a file are skipped, and vLLM is not
   started at all when every file is complete);
2. **choose** the recipe (training composition x feature set) by the leave-one-benchmark-out
   protocol (:func:`sentinel_vllm.protocol.lobo`), worst held-out AEE first, then the median;
3. **train** the chosen recipe on every benchmark it names, through ``sentinel-vllm train``
   (so the file is exactly what ``train`` writes);
4. **report** the held-out AUROC per benchmark, the LOBO AEE of the chosen recipe and the
   band the file carries (``train --band``: the 95% interval of a slice's true accuracy),
   with a warning when the entropy signal is weak (held-out AUROC below :data:`WEAK_AUROC`).

Everything here but :func:`build_collector` imports neither vLLM nor torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ["FitPlan", "WEAK_AUROC", "trace_path", "missing", "collect_all", "choose_recipe",
           "train_argv", "report_lines", "fit"]

WEAK_AUROC = 0.6
DEFAULT_BENCHMARKS = "mawps,svamp,gsm8k,math:2,math:5,arc_challenge"
DEFAULT_FEATURE_SETS = ("paper", "paper+length")
DEFAULT_COMPOSITIONS = ("extremes", "all")


@dataclass(frozen=True)
class FitPlan:
    """What ``fit`` collects and compares (the CLI's options)."""

    model: str
    out: str
    benchmarks: str = DEFAULT_BENCHMARKS
    temperatures: Sequence[float] = (0.0, 0.7)
    n: int = 150
    work_dir: str | None = None
    seed: int = 0
    max_tokens: int = 768
    feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS
    compositions: Sequence[str] = DEFAULT_COMPOSITIONS
    collect_kwargs: dict = field(default_factory=dict)

    @property
    def dir(self) -> str:
        """The work directory (traces, LOBO tables): ``--work-dir`` or ``<out>.fit``."""
        return self.work_dir or f"{os.path.splitext(self.out)[0]}.fit"


def trace_path(work_dir: str, temperature: float) -> str:
    """The trace file of one temperature, e.g. ``<dir>/traces-t0.7.jsonl.gz``."""
    return os.path.join(work_dir, f"traces-t{float(temperature):g}.jsonl.gz")


def missing(plan: FitPlan) -> dict[float, int]:
    """Responses still to collect per temperature (0 when a file is complete)."""
    from sentinel_vllm.collect import _existing_ids, _trace_id, parse_benchmarks
    from sentinel_vllm.datasets import load_benchmark

    wanted = [_trace_id(spec, p) for spec in parse_benchmarks(plan.benchmarks)
              for p in load_benchmark(spec.name, n=plan.n, seed=plan.seed,
                                      difficulty=spec.difficulty)]
    return {float(t): len(set(wanted) - _existing_ids(trace_path(plan.dir, t)))
            for t in plan.temperatures}


def build_collector(plan: FitPlan) -> Callable[[float, str], dict]:
    """``collect(temperature, path)`` over ONE vLLM engine built on first use."""
    from sentinel_vllm.collect import build_llm, collect, parse_benchmarks
    from sentinel_vllm.model_assets import resolve_model

    specs = parse_benchmarks(plan.benchmarks)
    engine: list = []
    opts = dict(plan.collect_kwargs)
    batch_size = opts.pop("batch_size", 64)

    def run(temperature: float, path: str) -> dict:
        if not engine:
            engine.append(build_llm(resolve_model(plan.model), seed=plan.seed, **opts))
        return collect(engine[0], specs, path, n=plan.n, seed=plan.seed, temperature=temperature,
                       max_tokens=plan.max_tokens, batch_size=batch_size, model_name=plan.model)

    def close() -> None:
        """Stop the engine before training: its memory and reserved core are free again."""
        import gc

        while engine:
            llm = engine.pop()
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 (best effort; the engine also stops at exit)
                pass
            del llm
        gc.collect()

    run.close = close  # type: ignore[attr-defined]
    return run


def collect_all(plan: FitPlan, collector: Callable[[float, str], dict] | None = None,
                log=sys.stderr) -> list[str]:
    """Collect every temperature still incomplete; returns the trace files.

    ``collector(temperature, path)`` defaults to :func:`build_collector` (vLLM); it is not
    built when nothing is missing, so a finished collection resumes straight to training.
    """
    os.makedirs(plan.dir, exist_ok=True)
    todo = {t: k for t, k in missing(plan).items() if k}
    for i, (temp, k) in enumerate(todo.items(), 1):
        if collector is None:
            collector = build_collector(plan)
        print(f"[fit] collect {i}/{len(todo)}: temperature {temp:g}, {k} responses to go "
              f"-> {trace_path(plan.dir, temp)}", file=log)
        collector(temp, trace_path(plan.dir, temp))
    if todo and hasattr(collector, "close"):
        collector.close()
    if not todo:
        print(f"[fit] traces complete in {plan.dir}: nothing to collect", file=log)
    return [trace_path(plan.dir, t) for t in plan.temperatures]


def _both_classes(traces) -> None:
    y = [bool(t.correct) for t in traces if t.correct is not None]
    if not y or all(y) or not any(y):
        acc = "none" if not any(y) else "all"
        raise ValueError(f"the model answered {acc} of the {len(y)} collected questions correctly: "
                         "a sentinel needs both right and wrong answers; add benchmarks of other "
                         "difficulty (--benchmarks) or more questions (--n)")


def choose_recipe(traces, *, compositions: Sequence[str] = DEFAULT_COMPOSITIONS,
                  feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS, seed: int = 0):
    """Every candidate's LOBO result and the chosen one (lowest worst AEE, then median).

    Returns
    -------
    (best, results) : ProtocolResult, list of ProtocolResult
        pcc estimator (mean P, what serving reports). A candidate whose folds cannot be
        trained (one class only) is left out; if none can, the error of the last is raised.
    """
    from sentinel_vllm.protocol import lobo

    _both_classes(traces)
    results, error = [], None
    for comp in compositions:
        for fs in feature_sets:
            try:
                results.append(lobo(traces, composition=comp, feature_set=fs,
                                    random_state=seed)["pcc"])
            except ValueError as exc:  # e.g. a fold with one class only
                error = exc
    if not results:
        raise error if error else ValueError("no recipe to compare")
    best = min(results, key=lambda r: (r.summary["worst_aee"], r.summary["median_aee"]))
    return best, results


def training_slices(traces, composition: str) -> list[str]:
    """The benchmarks the final file is trained on: all, or the extremes pair over all."""
    from sentinel_vllm.protocol import extremes_pair

    lab = [t for t in traces if t.correct is not None]
    names = sorted({t.slice for t in lab})
    if composition == "all":
        return names
    acc = {s: float(np.mean([t.correct for t in lab if t.slice == s])) for s in names}
    return sorted(extremes_pair(acc))


def train_argv(files: Sequence[str], plan: FitPlan, best, slices: Sequence[str]) -> list[str]:
    """The ``sentinel-vllm train`` arguments of the chosen recipe, with its band (every
    collected (benchmark, temperature) unit held out by the same composition)."""
    fs = best.recipe.split("/", 1)[1]
    comp = best.recipe.split("/", 1)[0]
    return ["train", *files, "--slices", ",".join(slices), "--feature-set", fs,
            "--seed", str(plan.seed), "--trained-for", plan.model, "--out", plan.out,
            "--band", "--band-composition", comp]


def auroc_by_benchmark(best) -> dict[str, float]:
    """Held-out AUROC per benchmark (mean over its temperature units; NaN if one class)."""
    out: dict[str, list] = {}
    for r in best.rows:
        out.setdefault(r["held_out"], []).append(r.get("auroc", float("nan")))
    return {b: (float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"))
            for b, v in sorted(out.items())}


def _band_text(metadata: dict) -> str:
    """The stored band (:mod:`sentinel_vllm.band`): the shift q and its nested coverage."""
    band = metadata.get("band")
    if not isinstance(band, dict) or not isinstance(band.get("q"), (int, float)):
        return "band: none stored in the file (intervals show sampling noise only)"
    nest = band.get("nested") or {}
    cov, hw = nest.get("coverage"), nest.get("mean_halfwidth")
    judged = (f"; judged nested: coverage {cov:.3f}, mean half-width {hw:.3f}"
              if isinstance(cov, float) and isinstance(hw, float) else "")
    return (f"band: estimate +- ({band['q']:.3f} + 1.96 se) over {band.get('n_units')} held-out "
            f"units{judged}")


def report_lines(best, results, slices: Sequence[str], metadata: dict) -> list[str]:
    """The short report ``fit`` prints (and writes to ``<work dir>/report.md``)."""
    s = best.summary
    chosen = (f"chosen recipe: {best.recipe} (leave-one-benchmark-out, worst then median AEE), "
              f"trained on {', '.join(slices)}")
    lines = ["# sentinel-vllm fit", "", chosen, "",
             "| recipe | units | median AEE | mean AEE | worst AEE (unit) |",
             "|---|---|---|---|---|"]
    for r in results:
        t = r.summary
        lines.append(f"| {r.recipe} | {t['n_units']} | {t['median_aee']:.3f} | {t['mean_aee']:.3f} "
                     f"| {t['worst_aee']:.3f} ({t['worst_unit']}) |")
    lines += ["", "| held-out benchmark | AUROC |", "|---|---|"]
    aurocs = auroc_by_benchmark(best)
    lines += [f"| {b} | {a:.3f} |" for b, a in aurocs.items()]
    aee = (f"LOBO AEE of the chosen recipe: median {s['median_aee']:.3f}, mean "
           f"{s['mean_aee']:.3f}, worst {s['worst_aee']:.3f} ({s['worst_unit']})")
    lines += ["", aee, _band_text(metadata)]
    finite = [a for a in aurocs.values() if np.isfinite(a)]
    weak = sorted(b for b, a in aurocs.items() if np.isfinite(a) and a < WEAK_AUROC)
    if not finite or float(np.median(finite)) < WEAK_AUROC:
        lines.append(f"WARNING: the entropy signal is weak for this model (median held-out AUROC "
                     f"{float(np.median(finite)) if finite else float('nan'):.3f} < {WEAK_AUROC}): "
                     "P(correct) barely separates right from wrong answers; rely on audited "
                     "labels (sentinel-vllm audit) rather than the estimate")
    elif weak:
        lines.append(f"WARNING: weak entropy signal (held-out AUROC < {WEAK_AUROC}) on "
                     f"{', '.join(weak)}")
    return lines


def fit(plan: FitPlan, collector: Callable[[float, str], dict] | None = None,
        log=sys.stderr) -> list[str]:
    """Run the four steps; returns the report lines (also in ``<work dir>/report.md``)."""
    from sentinel_vllm import cli
    from sentinel_vllm.sentinel_file import load_sentinel
    from sentinel_vllm.traces import read_traces

    files = collect_all(plan, collector, log=log)
    traces = read_traces(files)
    print(f"[fit] choosing the recipe by leave-one-benchmark-out on {len(traces)} traces "
          f"({len(plan.compositions) * len(plan.feature_sets)} candidates)", file=log)
    best, results = choose_recipe(traces, compositions=plan.compositions,
                                  feature_sets=plan.feature_sets, seed=plan.seed)
    slices = training_slices(traces, best.recipe.split("/", 1)[0])
    argv = train_argv(files, plan, best, slices)
    print(f"[fit] sentinel-vllm {' '.join(argv)}", file=log)
    rc = cli.main(argv)
    if rc:
        raise RuntimeError(f"sentinel-vllm train exited {rc}")
    lines = report_lines(best, results, slices, load_sentinel(plan.out).metadata)
    with open(os.path.join(plan.dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return lines
