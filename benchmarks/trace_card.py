"""Per-slice summary of a trace file, for its data card.

    python benchmarks/trace_card.py data/traces/qwen2.5-coder-0.5b.jsonl.gz

Prints a Markdown table: slice, responses, accuracy, mean output tokens, share
stopped by max_tokens, mean full-vocabulary entropy per step (nats), and the
generation settings found in the file.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

from sentinel_vllm.traces import read_traces


def main(argv: list[str]) -> int:
    traces = read_traces(argv)
    rows: dict[str, list] = defaultdict(list)
    settings = set()
    for t in traces:
        rows[t.slice].append(t)
        if isinstance(t.extra.get("generation"), dict):
            settings.add(json.dumps(t.extra["generation"], sort_keys=True))
    print("| slice | responses | accuracy | mean output tokens | stopped at max_tokens | mean entropy (nats) |")
    print("|---|---|---|---|---|---|")
    for s, ts in rows.items():
        acc = np.mean([bool(t.correct) for t in ts if t.correct is not None])
        tok = np.mean([len(t.entropy.get("full", [])) for t in ts])
        length = np.mean([t.extra.get("finish_reason") == "length" for t in ts])
        ent = np.mean([np.mean(t.entropy["full"]) for t in ts if t.entropy.get("full")])
        print(f"| {s} | {len(ts)} | {acc:.3f} | {tok:.0f} | {length:.3f} | {ent:.3f} |")
    print(f"\n{len(traces)} responses; generation settings: " + "; ".join(sorted(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
