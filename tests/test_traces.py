"""Trace IO: round trips, series lookup, errors that name file and line."""

import gzip
import json

import numpy as np
import pytest

from sentinel_vllm.features import compute_features
from sentinel_vllm.traces import (
    MissingSeriesError,
    ReadReport,
    Trace,
    TraceFormatError,
    feature_matrix,
    read_traces,
    write_traces,
)

REC = {"id": "a/1", "slice": "a", "correct": True, "k": 20, "model": "m", "seed": 3,
       "entropy": {"full": [1.0, 0.5, 0.25], "topk": [0.9, 0.4, 0.2], "top5": [0.5, 0.3, 0.1]}}


def test_jsonl_roundtrip_keeps_extra_keys(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(REC) + "\n\n" + json.dumps({**REC, "id": "a/2", "correct": None}) + "\n")
    tr = read_traces(p)
    assert [t.id for t in tr] == ["a/1", "a/2"]
    assert tr[0].extra == {"model": "m", "seed": 3} and tr[1].correct is None
    out = tmp_path / "o.jsonl.gz"
    write_traces(out, tr)
    assert [t.to_record() for t in read_traces(out)] == [t.to_record() for t in tr]


def test_parquet_roundtrip(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "t.parquet"
    write_traces(p, [REC, {**REC, "id": "b", "correct": False}])
    tr = read_traces(p)
    assert tr[1].correct is False and tr[0].entropy["full"] == [1.0, 0.5, 0.25]


def test_series_lookup():
    t = read_traces_from(REC)
    assert t.series("full") == [1.0, 0.5, 0.25]
    assert t.series("topk") == [0.9, 0.4, 0.2]           # own k = 20
    assert t.series("topk", 20) == t.series("top20") == [0.9, 0.4, 0.2]
    assert t.series("top5") == [0.5, 0.3, 0.1]
    assert t.series("top50") is None and t.series("topk_renorm") is None


def read_traces_from(rec):
    from sentinel_vllm.traces import _parse_record
    return _parse_record(rec, "x:1")


@pytest.mark.parametrize("line,msg", [
    ("{not json", "invalid JSON"),
    ('{"slice": "a"}', "missing required key 'id'"),
    ('{"id": "x", "slice": "a", "correct": "yes"}', "'correct' must be"),
    ('{"id": "x", "slice": "a", "entropy": {"full": [1, "a"]}}', "non-numeric"),
    ('{"id": "x", "slice": "a", "entropy": {"full": [1, -3]}}', "negative or non-finite"),
    ('{"id": "x", "slice": "a", "entropy": {"topk": [1]}}', "needs 'k'"),
    ('{"id": "x", "slice": "a", "entropy": {"weird": [1]}}', "unknown entropy series"),
    ("[1, 2]", "must be a JSON object"),
    # hostile values: none may escape as a bare Python error or pass silently
    ('{"id": "x", "slice": "a", "entropy": {"full": [1' + "0" * 400 + ']}}', "out-of-range"),
    ('{"id": "x", "slice": "a", "entropy": {"full": [1' + "0" * 5000 + ']}}', "invalid JSON"),
    ("[" * 100000 + "]" * 100000, "invalid JSON"),
    ('{"id": "x", "slice": "a", "k": Infinity, "entropy": {"full": [1]}}', "'k' must be"),
    ('{"id": "x", "slice": "a", "k": NaN, "entropy": {"full": [1]}}', "'k' must be"),
    ('{"id": "x", "slice": "a", "k": 2.5, "entropy": {"full": [1]}}', "'k' must be"),
    ('{"id": "x", "slice": "a", "entropy": {"full": ["1.0"]}}', "non-numeric"),
    ('{"id": "x", "slice": "a", "entropy": {"full": [true]}}', "non-numeric"),
    ('{"id": "x", "slice": "a", "entropy": {"full": [NaN]}}', "negative or non-finite"),
    ('{"id": ["x"], "slice": "a"}', "'id' must be a string"),
    ('{"id": "x", "slice": {"a": 1}}', "'slice' must be a string"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps(REC) + "\n" + line + "\n" + json.dumps(REC) + "\n")
    with pytest.raises(TraceFormatError) as e:
        read_traces(p)
    assert f"{p}:2" in str(e.value) and msg in str(e.value)
    rep = ReadReport()
    assert len(read_traces(p, skip_bad=True, report=rep)) == 2
    assert rep.n_skipped == 1 and rep.n_read == 2 and f"{p}:2" in rep.skipped[0]


def test_not_utf8_line_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps(REC).encode() + b'\n{"id": "\xe9", "slice": "a"}\n')
    with pytest.raises(TraceFormatError, match=f"{p}:2: not UTF-8"):
        read_traces(p)
    assert len(read_traces(p, skip_bad=True)) == 1


@pytest.mark.parametrize("name,data,msg", [
    ("plain.jsonl.gz", (json.dumps(REC) + "\n").encode(), "BadGzipFile"),
    ("cut.jsonl.gz", gzip.compress(((json.dumps(REC) + "\n") * 200).encode())[:200], "EOFError"),
    ("junk.parquet", b"\x00not parquet\x01" * 20, "unreadable Parquet file"),
])
def test_unreadable_file_is_a_trace_format_error(tmp_path, name, data, msg):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(TraceFormatError) as e:
        read_traces(p)
    assert str(p) in str(e.value) and msg in str(e.value)
    rep = ReadReport()
    read_traces(p, skip_bad=True, report=rep)  # counted, never a bare OSError/EOFError
    assert rep.n_skipped == 1 and str(p) in rep.skipped[0]


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        read_traces("/nonexistent/traces.jsonl")


def test_feature_matrix_and_missing_series():
    a = read_traces_from(REC)
    b = Trace("b", "a", False, {"full": [2.0]}, None)
    X = feature_matrix([a, b])
    np.testing.assert_allclose(X[0], compute_features([1.0, 0.5, 0.25]))
    np.testing.assert_allclose(X[1], compute_features([2.0]))
    with pytest.raises(MissingSeriesError, match="1 of 2 traces lack the topk"):
        feature_matrix([a, b], "topk")
