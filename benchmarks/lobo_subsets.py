"""Summarise leave-one-benchmark-out held-out units by subset (all, without a benchmark, per temperature).

Reads the ``lobo_units.csv`` that ``sentinel-vllm evaluate --protocol lobo --out-dir DIR`` writes
and prints one markdown row per (DIR, recipe): median / mean / worst AEE (unit) over all units,
over the units without ``--exclude`` (default arc_challenge, the one multiple-choice benchmark),
and per test temperature. Used for the "Recipes on 19 held-out units" table of RESULTS.md::

    python benchmarks/lobo_subsets.py out/lobo-seed0 out/lobo-seed1 --estimator pcc
"""

import argparse
import csv
import statistics
from pathlib import Path


def summary(units) -> str:
    if not units:
        return "-"
    aee = [float(u["aee"]) for u in units]
    worst = max(units, key=lambda u: float(u["aee"]))
    t = float(worst["temperature"])
    return (f"{statistics.median(aee):.3f} / {statistics.mean(aee):.3f} / {float(worst['aee']):.3f} "
            f"({worst['held_out']}@T{t:g})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="evaluate --protocol lobo output folders")
    ap.add_argument("--estimator", default="pcc")
    ap.add_argument("--exclude", default="arc_challenge", help="benchmark left out of the second column")
    args = ap.parse_args(argv)
    rows = []
    for d in args.dirs:
        with open(Path(d) / "lobo_units.csv", newline="") as fh:
            rows += [dict(r, dir=d) for r in csv.DictReader(fh) if r["estimator"] == args.estimator]
    temps = sorted({float(r["temperature"]) for r in rows})
    print("| folder | recipe | all units | without " + args.exclude + " | "
          + " | ".join(f"T = {t:g} units" for t in temps) + " |")
    print("|---" * (4 + len(temps)) + "|")
    for key in dict.fromkeys((r["dir"], r["recipe"]) for r in rows):
        units = [r for r in rows if (r["dir"], r["recipe"]) == key]
        cells = [summary(units), summary([u for u in units if u["held_out"] != args.exclude])]
        cells += [summary([u for u in units if float(u["temperature"]) == t]) for t in temps]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
