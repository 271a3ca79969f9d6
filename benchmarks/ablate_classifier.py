"""Classifier ablation on real traces: class balancing and isotonic calibration on/off.

    python benchmarks/ablate_classifier.py data/traces/qwen2.5-coder-0.5b.jsonl.gz

For each setting, the paper's protocol (sentinel_vllm.evaluate.evaluate_composition,
seed 0) on six easy+hard compositions; prints the mean over them of: median AEE
(all slices, training slices on their held-out 20%), median AEE on unseen slices,
mean AEE, Spearman rho, Brier, ECE, as one Markdown row per setting.
"""

import sys
import warnings

import numpy as np

from sentinel_vllm.evaluate import evaluate_composition
from sentinel_vllm.traces import read_traces

COMPOSITIONS = [("mawps", "math_l5"), ("mawps", "ocw"), ("mawps", "gsm_hard"),
                ("asdiv", "math_l5"), ("asdiv", "ocw"), ("asdiv", "gsm_hard")]
SETTINGS = [("paper (balanced, isotonic)", {}), ("no calibration", {"calibrate": False}),
            ("no balancing", {"class_weight": None}),
            ("neither", {"calibrate": False, "class_weight": None})]


def main(paths):
    warnings.filterwarnings("ignore")
    traces = read_traces(paths)
    print("| setting | median AEE | median AEE unseen | mean AEE | Spearman rho | Brier | ECE |")
    print("|---|---|---|---|---|---|---|")
    for name, params in SETTINGS:
        rs = [evaluate_composition(traces, c, classifier_params=params) for c in COMPOSITIONS]

        def mean(key, part="summary"):
            return np.mean([getattr(r, part)[key] for r in rs])

        print(f"| {name} | {mean('median_aee'):.3f} | {mean('median_aee', 'summary_unseen'):.3f} | "
              f"{mean('mean_aee'):.3f} | {mean('spearman_rho'):.3f} | "
              f"{np.mean([r.brier for r in rs]):.3f} | {np.mean([r.ece for r in rs]):.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
