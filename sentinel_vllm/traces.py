"""Trace files: one labelled (or unlabelled) response per record.

JSONL (optionally ``.gz``), one JSON object per line::

    {"id": "gsm8k/17", "slice": "gsm8k", "correct": true,
     "entropy": {"full": [0.91, 0.02, ...], "topk": [0.88, 0.02, ...],
                 "top5": [...], "top50": [...], "top20_renorm": [...]},
     "k": 20, ...any extra keys, kept...}

* ``correct`` is ``true``, ``false`` or ``null`` (unlabelled).
* ``entropy`` series are per-step entropies in nats. ``full`` is the
  full-vocabulary entropy; ``topk`` is the paper's top-k entropy with
  ``k`` = the record's ``"k"``; ``top{K}`` is the top-K entropy for another K,
  ``top{K}_renorm`` (and ``topk_renorm``) the renormalised variant. Any
  series may be absent.
* Parquet files hold the same fields as columns (``entropy`` as a struct of
  lists); they are read with pyarrow.

Reading a malformed record (invalid JSON or UTF-8, a missing key, a value of
the wrong type, a negative or non-finite entropy) raises :class:`TraceFormatError`
naming the file and line; with ``skip_bad=True`` such lines are skipped and
counted instead. A file that cannot be decoded (not gzip, a truncated gzip, not
Parquet) gives one such error after the records read before the damage.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from sentinel_vllm.features import compute_features
from sentinel_vllm.series import is_series, parse_series_name, series_name

__all__ = [
    "Trace",
    "TraceFormatError",
    "MissingSeriesError",
    "ReadReport",
    "read_traces",
    "write_traces",
    "feature_matrix",
    "check_series",
]

_KNOWN = {"id", "slice", "correct", "entropy", "k"}


class TraceFormatError(ValueError):
    """A trace record that does not follow the format; the message names file and line."""


class MissingSeriesError(ValueError):
    """Traces lack the entropy series a model or command needs."""


@dataclass
class Trace:
    """One response's entropy trajectories and label.

    Attributes
    ----------
    id : str
    slice : str
        Slice (benchmark, traffic segment) the response belongs to.
    correct : bool or None
    entropy : dict[str, list[float]]
        Per-step entropies in nats, by series name (see module docstring).
    k : int or None
        The k of the ``topk`` series.
    extra : dict
        Every other key of the record, kept as is.
    """

    id: str
    slice: str
    correct: bool | None
    entropy: dict[str, list[float]]
    k: int | None = None
    extra: dict = field(default_factory=dict)

    def series(self, entropy: str = "full", k: int | None = None) -> list[float] | None:
        """The requested series, or None if this trace lacks it.

        Parameters
        ----------
        entropy : {"full", "topk", "topk_renorm"} or "top{K}" / "top{K}_renorm"
        k : int, optional
            For ``topk``/``topk_renorm``; default: the trace's own ``k``.
        """
        kind, kk = parse_series_name(entropy, k)
        if kind == "full":
            return self.entropy.get("full")
        kk = self.k if kk is None else kk
        if kk is not None:
            s = self.entropy.get(series_name(kind, kk))
            if s is not None:
                return s
        if self.k is not None and kk == self.k:
            return self.entropy.get(kind)
        return None

    def to_record(self) -> dict:
        """The JSON object for this trace (extra keys included)."""
        rec = {"id": self.id, "slice": self.slice, "correct": self.correct,
               "entropy": self.entropy}
        if self.k is not None:
            rec["k"] = self.k
        rec.update(self.extra)
        return rec


@dataclass
class ReadReport:
    """What :func:`read_traces` skipped with ``skip_bad=True``."""

    n_read: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", first 20


def _parse_record(obj, where: str) -> Trace:
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    for key in ("id", "slice"):
        if key not in obj or obj[key] is None:
            raise TraceFormatError(f"{where}: missing required key {key!r}")
        if isinstance(obj[key], (dict, list, bool)):
            raise TraceFormatError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    correct = obj.get("correct")
    if correct is not None and not isinstance(correct, bool):
        if correct in (0, 1) and not isinstance(correct, float):
            correct = bool(correct)
        else:
            raise TraceFormatError(f"{where}: 'correct' must be true, false or null, got {correct!r}")
    ent = obj.get("entropy") or {}
    if not isinstance(ent, dict):
        raise TraceFormatError(f"{where}: 'entropy' must be an object of series")
    clean: dict[str, list[float]] = {}
    for name, values in ent.items():
        if values is None:
            continue
        if not is_series(name):
            raise TraceFormatError(f"{where}: unknown entropy series {name!r}")
        if not isinstance(values, (list, tuple, np.ndarray)):
            raise TraceFormatError(f"{where}: series {name!r} must be a list of numbers")
        if any(isinstance(v, (bool, str, bytes)) for v in values):
            raise TraceFormatError(f"{where}: series {name!r} has a non-numeric value")
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError, OverflowError):
            raise TraceFormatError(f"{where}: series {name!r} has a non-numeric or out-of-range value") from None
        if not all(math.isfinite(v) and v >= -1e-6 for v in vals):
            raise TraceFormatError(f"{where}: series {name!r} has a negative or non-finite entropy")
        clean[name] = vals
    k = obj.get("k")
    if k is not None:
        if (isinstance(k, bool) or not isinstance(k, (int, float))
                or (isinstance(k, float) and not k.is_integer()) or k < 1):
            raise TraceFormatError(f"{where}: 'k' must be a positive integer, got {k!r}")
        k = int(k)
    if "topk" in clean and k is None:
        raise TraceFormatError(f"{where}: a 'topk' series needs 'k'")
    extra = {key: v for key, v in obj.items() if key not in _KNOWN}
    return Trace(str(obj["id"]), str(obj["slice"]), correct, clean, k, extra)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parse_line(raw: bytes, where: str):
    """One JSONL line as a JSON value, or a :class:`TraceFormatError` naming ``where``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return TraceFormatError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return TraceFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
    except (ValueError, RecursionError) as exc:  # e.g. an integer of > 4300 digits, deep nesting
        return TraceFormatError(f"{where}: invalid JSON ({type(exc).__name__}: {exc})")


def _iter_file(path: str) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record or exception)`` for each record of one file.

    A file that cannot be decoded (not gzip, truncated gzip, not Parquet) yields
    one :class:`TraceFormatError` after the records read before the damage, and
    stops.
    """
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 (pyarrow raises several types)
            yield path, TraceFormatError(f"{path}: unreadable Parquet file ({exc})")
            return
        for i, rec in enumerate(rows, start=1):
            yield f"{path}: row {i}", rec
        return
    lineno = 0
    try:
        with _open_binary(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                yield where, _parse_line(line, where)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        where = f"{path}:{lineno + 1}"
        yield where, TraceFormatError(f"{where}: unreadable file ({type(exc).__name__}: {exc})")


def read_traces(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    skip_bad: bool = False,
    report: ReadReport | None = None,
) -> list[Trace]:
    """Read traces from JSONL (``.jsonl``, ``.jsonl.gz``) and Parquet files.

    Parameters
    ----------
    paths : path or sequence of paths
    skip_bad : bool, default False
        Skip malformed records (counted in ``report``) instead of raising.
    report : ReadReport, optional
        Filled with counts of read and skipped records.

    Returns
    -------
    list[Trace]
        In file and line order.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    TraceFormatError
        On the first malformed record (``file:line: reason``) unless ``skip_bad``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else ReadReport()
    out: list[Trace] = []
    for p in map(str, paths):
        if not os.path.exists(p):
            raise FileNotFoundError(f"trace file not found: {p}")
        for where, rec in _iter_file(p):
            try:
                if isinstance(rec, Exception):
                    raise rec
                out.append(_parse_record(rec, where))
                report.n_read += 1
            except TraceFormatError as exc:
                if not skip_bad:
                    raise
                report.n_skipped += 1
                if len(report.skipped) < 20:
                    report.skipped.append(str(exc))
    return out


def write_traces(path: str | os.PathLike, traces: Iterable[Trace | dict], *, append: bool = False) -> int:
    """Write traces as JSONL (``.gz`` compresses) or Parquet (by extension).

    Returns
    -------
    int
        Number of records written.
    """
    path = str(path)
    recs = [t.to_record() if isinstance(t, Trace) else dict(t) for t in traces]
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if append:
            raise ValueError("append is not supported for Parquet")
        pq.write_table(pa.Table.from_pylist(recs), path)
        return len(recs)
    mode = "at" if append else "wt"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, mode, encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r, separators=(",", ":")) + "\n")
    return len(recs)


def feature_matrix(
    traces: Sequence[Trace], entropy: str = "full", k: int | None = None
) -> np.ndarray:
    """The 11 features of each trace's requested series.

    Parameters
    ----------
    traces : sequence of Trace
    entropy, k : see :meth:`Trace.series`

    Returns
    -------
    ndarray of float64, shape (n_traces, 11)

    Raises
    ------
    MissingSeriesError
        If any trace lacks the series (the message counts them and names the first).
    """
    check_series(traces, entropy, k)
    rows = [compute_features(t.series(entropy, k)) for t in traces]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 11)


def check_series(traces: Sequence[Trace], entropy: str = "full", k: int | None = None) -> None:
    """Raise :class:`MissingSeriesError` if any trace lacks the series (counted, first named)."""
    missing = [t.id for t in traces if t.series(entropy, k) is None]
    if missing:
        name, kk = parse_series_name(entropy, k)
        label = name if kk is None else f"{name} (k={kk})"
        raise MissingSeriesError(
            f"{len(missing)} of {len(traces)} traces lack the {label} entropy series "
            f"(first: {missing[0]!r})"
        )
