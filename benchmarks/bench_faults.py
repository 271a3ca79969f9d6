"""Load and fault scenarios against real servers; prints the RESULTS.md table.

Runs the scenario tests (each starts its own ``sentinel-vllm serve`` / ``vllm
serve`` with SmolLM2 on loopback) and collects the numbers they measured::

    .venv/bin/python benchmarks/bench_faults.py            # all scenarios (~20-30 min on 2 cores)
    .venv/bin/python benchmarks/bench_faults.py --no-load  # without the 1,000-request load test

Scenarios: tests/test_load.py (1,000 streamed n = 2 requests, concurrency 64),
tests/test_e2e_clients.py::test_dropped_streams_free_their_state (200 streams
dropped at random chunks), tests/test_faults_engine.py (preemption + chunked
prefill, NaN / +inf / all -inf logits, structured output + min_tokens, scorer
exception). "state leaked" is ``active + parked`` in ``/sentinel/stats`` after
the scenario; each scenario's test also asserts it is 0 (the table says whether
the test passed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "load": ["tests/test_load.py"],
    "drops": ["tests/test_e2e_clients.py::test_dropped_streams_free_their_state"],
    "engine": ["tests/test_faults_engine.py"],
}


def run(names: list[str]) -> tuple[list[dict], dict[str, int]]:
    fd, path = tempfile.mkstemp(prefix="sentinel-faults-", suffix=".jsonl")
    os.close(fd)
    codes = {}
    env = dict(os.environ, SENTINEL_FAULTS_RESULTS=path)
    for name in names:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS[name]]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        codes[name] = subprocess.call(cmd, cwd=ROOT, env=env)
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    os.unlink(path)
    return rows, codes


def table(rows: list[dict], codes: dict[str, int]) -> str:
    out = ["| scenario | requests | faults injected | state leaked | notes |", "|---|---|---|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k} {v}" for k, v in r.items()
                          if k not in ("scenario", "requests", "faults", "leaked"))
        out.append(f"| {r['scenario']} | {r['requests']} | {r['faults']} | {r['leaked']} | {notes} |")
    if codes:
        out.append("")
        out.append("pytest exit codes: " + ", ".join(f"{k} {v}" for k, v in codes.items())
                   + " (0 = every assertion held, including zero leaked state)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-load", action="store_true", help="skip the 1,000-request load test")
    p.add_argument("--only", default=None, metavar="A,B", help=f"scenario groups among {','.join(TESTS)}")
    p.add_argument("--from-jsonl", default=None, metavar="FILE",
                   help="print the table of rows the tests already wrote (SENTINEL_FAULTS_RESULTS=FILE)")
    args = p.parse_args(argv)
    if args.from_jsonl:
        rows = [json.loads(ln) for ln in Path(args.from_jsonl).read_text().splitlines() if ln.strip()]
        print(table(rows, {}))
        return 0
    names = args.only.split(",") if args.only else list(TESTS)
    names = [n for n in names if not (args.no_load and n == "load")]
    rows, codes = run(names)
    print(table(rows, codes))
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
