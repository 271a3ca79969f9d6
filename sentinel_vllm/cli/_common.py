"""Arguments and I/O shared by the subcommands (trace readers; ``serve`` and ``proxy``)."""

from __future__ import annotations

import argparse
import csv
import os
import sys


def add_trace_args(p: argparse.ArgumentParser, entropy: bool = True) -> None:
    """TRACES... and --skip-bad (and --entropy/--k when ``entropy``)."""
    p.add_argument("traces", nargs="+", metavar="TRACES", help="trace files (.jsonl, .jsonl.gz, .parquet)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records (and those the features cannot be computed for) and count them")
    if entropy:
        p.add_argument("--entropy", default="full",
                       help="entropy series: full, topk, topk_renorm, top<K>, top<K>_renorm (default: full)")
        p.add_argument("--k", type=int, default=None, help="k for topk (default: each trace's own k)")


def load(args):
    """Read the traces named in ``args``; report skipped records on stderr."""
    from sentinel_vllm.traces import ReadReport, read_traces

    rep = ReadReport()
    traces = read_traces(args.traces, skip_bad=args.skip_bad, report=rep)
    if rep.n_skipped:
        print(f"skipped {rep.n_skipped} malformed record(s); first: {rep.skipped[0]}", file=sys.stderr)
    if not traces:
        raise ValueError("no traces read")
    return traces


def keep_scorable(args, traces, sets=(("paper", "full", None, None),), check=False):
    """With ``--skip-bad``: drop the traces some feature set of ``sets`` cannot score, and say so.

    ``sets``: ``(feature set, entropy, k, topk_k)`` tuples; a trace is kept only if every set
    can make its row (so several sets are compared on the same traces). Without
    ``--skip-bad`` the traces come back unchanged and the first such trace stops the command
    where its features are computed, or here with ``check`` (a command that would otherwise
    work for minutes before reaching it).
    """
    skip = getattr(args, "skip_bad", False)
    if not (skip or check):
        return traces
    from sentinel_vllm.feature_sets import unscorable
    from sentinel_vllm.traces import MissingSeriesError

    bad: dict[int, str] = {}
    for spec in sets:
        found = unscorable(traces, *spec)
        if found and not skip:
            raise MissingSeriesError(f"{found[min(found)]} (feature set {spec[0]!r}; --skip-bad skips "
                                     "such records)")
        for i, why in found.items():
            bad.setdefault(i, why)
    if not skip:
        return traces
    if bad:
        print(f"skipped {len(bad)} record(s) the features cannot be computed for; "
              f"first: {bad[min(bad)]}", file=sys.stderr)
    kept = [t for i, t in enumerate(traces) if i not in bad]
    if not kept:
        raise ValueError("no traces left after --skip-bad")
    return kept


def check_out(out: str, inputs) -> None:
    """Refuse an output path that is one of the input files (it would be overwritten).

    ``-`` (standard output) is always fine; an input and ``out`` are the same file when
    :func:`os.path.samefile` says so (links included) or their real paths are equal.
    """
    if out == "-":
        return
    real = os.path.realpath(out)
    for path in inputs:
        try:
            same = os.path.samefile(out, path)
        except OSError:  # one of them does not exist (yet)
            same = real == os.path.realpath(path)
        if same:
            raise ValueError(f"--out {out} is the input file {path}; it would be overwritten")


def write_csv(path: str, header: list[str], rows) -> None:
    """Write rows to ``path`` (``-`` is standard output)."""
    fh = sys.stdout if path == "-" else open(path, "w", newline="", encoding="utf-8")
    try:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    finally:
        if fh is not sys.stdout:
            fh.close()


def fmt(v, digits: int = 3) -> str:
    """A table cell: floats rounded, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: list[str], rows) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def metrics_args(ns) -> dict:
    """The ``--sentinel-*`` metrics options of ``serve`` and ``proxy`` as config fields.

    Keys are :data:`sentinel_vllm.serving.api.metrics.METRICS_OPTIONS`;
    ``--sentinel-slices A,B`` becomes a list, a ``--sentinel-window-seconds`` of 0 None.
    """
    slices = [s.strip() for s in ns.sentinel_slices.split(",") if s.strip()] \
        if ns.sentinel_slices else None
    return {"replica": ns.sentinel_replica, "slices": slices, "max_slices": ns.sentinel_max_slices,
            "window_count": ns.sentinel_window, "window_seconds": ns.sentinel_window_seconds or None,
            "baseline": ns.sentinel_baseline, "drift_margin": ns.sentinel_drift_margin,
            "min_samples": ns.sentinel_min_samples}
