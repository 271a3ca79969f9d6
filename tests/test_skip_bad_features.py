"""``--skip-bad`` also skips records a feature set cannot be computed for (and counts them).

Without it the first such record stops the command (exit 1, the record named); with it
the command runs on the rest, says how many it skipped on stderr, and its output equals
that of the same command on a file without those records.
"""

import csv

import numpy as np
import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.feature_sets import unscorable
from sentinel_vllm.traces import Trace, write_traces
from synthetic import SLICES, make_traces

BAD = ("easy/3", "hard/7")


def _files(tmp_path):
    """traces.jsonl (two records without finish_reason or truncated) and clean.jsonl (without them)."""
    recs = make_traces(30, seed=5)  # 4 slices x 30; series full, topk (k=20), top5
    for r in recs:
        if r["id"] in BAD:
            del r["finish_reason"]
    write_traces(tmp_path / "traces.jsonl", recs)
    write_traces(tmp_path / "clean.jsonl", [r for r in recs if r["id"] not in BAD])
    return str(tmp_path / "traces.jsonl"), str(tmp_path / "clean.jsonl")


def test_unscorable_names_each_trace_and_why():
    ok = Trace("a/0", "a", True, {"full": [0.1, 0.2]}, extra={"finish_reason": "stop"})
    no_stop = Trace("a/1", "a", True, {"full": [0.1, 0.2]})
    no_top = Trace("a/2", "a", True, {"full": [0.1, 0.2]}, k=20, extra={"truncated": False})
    traces = [ok, no_stop, no_top]
    assert unscorable(traces, "paper") == {}
    got = unscorable(traces, "paper+length")
    assert list(got) == [1] and "'a/1' has neither finish_reason nor truncated" in got[1]
    got = unscorable(traces, "paper+length", "top20")
    assert sorted(got) == [0, 1, 2] and "lacks the top20 entropy series" in got[2]


def test_train_and_score_skip_what_the_set_cannot_compute(tmp_path, capsys):
    traces, clean = _files(tmp_path)
    out = str(tmp_path / "s.onnx")
    capsys.readouterr()
    assert main(["train", traces, "--feature-set", "paper+length", "--out", out]) == 1
    assert "'easy/3' has neither finish_reason nor truncated" in capsys.readouterr().err

    assert main(["train", traces, "--feature-set", "paper+length", "--out", out, "--skip-bad"]) == 0
    assert "skipped 2 record(s)" in capsys.readouterr().err
    ref = str(tmp_path / "ref.onnx")
    assert main(["train", clean, "--feature-set", "paper+length", "--out", ref]) == 0

    scores, ref_scores = tmp_path / "scores.csv", tmp_path / "ref.csv"
    assert main(["score", out, traces, "--out", str(scores)]) == 1
    assert main(["score", out, traces, "--out", str(scores), "--skip-bad"]) == 0
    assert "skipped 2 record(s)" in capsys.readouterr().err
    assert main(["score", ref, clean, "--out", str(ref_scores)]) == 0
    got, want = (list(csv.DictReader(f.read_text().splitlines())) for f in (scores, ref_scores))
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 118
    assert not set(BAD) & {r["id"] for r in got}
    # the same model (same training rows, same seed) gives the same probabilities
    np.testing.assert_array_equal([float(r["p_correct"]) for r in got],
                                  [float(r["p_correct"]) for r in want])


def test_lobo_compares_sets_on_the_traces_every_set_can_score(tmp_path, capsys, monkeypatch):
    """lobo itself (forests, minutes) is replaced by a recorder: what matters is what it is given."""
    from sentinel_vllm import protocol

    traces, _ = _files(tmp_path)
    given = []

    class Stop(Exception):
        pass

    def record(ts, **kw):
        given.append(([t.id for t in ts], kw["feature_set"]))
        raise Stop

    monkeypatch.setattr(protocol, "lobo", record)
    argv = ["evaluate", "--protocol", "lobo", "--feature-set", "paper,paper+length", "--no-plots",
            "--out-dir", str(tmp_path / "x")]
    capsys.readouterr()
    with pytest.raises(Stop):
        main([*argv, traces, "--skip-bad"])
    # paper could score the two records, paper+length cannot: dropped for every set
    assert "skipped 2 record(s)" in capsys.readouterr().err
    want = [f"{s}/{i}" for s in SLICES for i in range(30) if f"{s}/{i}" not in BAD]
    assert given[-1] == (want, "paper") and len(want) == 118


@pytest.mark.parametrize("command", ["features", "evaluate"])
def test_series_missing_on_some_records(tmp_path, capsys, command):
    recs = make_traces(20, seed=2)
    del recs[4]["entropy"]["top5"]
    write_traces(tmp_path / "t.jsonl", recs)
    out = ["--out", str(tmp_path / "f.csv")] if command == "features" else [
        "--out-dir", str(tmp_path / "ev"), "--no-plots"]
    argv = [command, str(tmp_path / "t.jsonl"), "--entropy", "top5", *out]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "lack the topk (k=5) entropy series (first: 'easy/4')" in err, err
    assert main([*argv, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 record(s) the features cannot be computed for; first: trace 'easy/4' lacks " \
        "the top5 entropy series" in err, err
    if command == "features":
        rows = list(csv.reader((tmp_path / "f.csv").read_text().splitlines()))
        assert len(rows) == 1 + 79 and recs[4]["id"] not in {r[0] for r in rows}


def test_lobo_without_skip_bad_stops_before_training(tmp_path, capsys, monkeypatch):
    from sentinel_vllm import protocol

    traces, _ = _files(tmp_path)
    monkeypatch.setattr(protocol, "lobo", lambda *a, **kw: pytest.fail("lobo ran"))
    capsys.readouterr()
    assert main(["evaluate", traces, "--protocol", "lobo", "--feature-set", "paper,paper+length",
                 "--no-plots", "--out-dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "trace 'easy/3' has neither finish_reason nor truncated" in err and "'paper+length'" in err, err


def test_audit_drops_the_labels_of_skipped_records(tmp_path, capsys):
    import json

    traces, _ = _files(tmp_path)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "correct": c}) + "\n"
                              for i, c in (("easy/3", True), ("easy/0", True), ("hard/0", False))))
    argv = ["audit", "default", "--traces", traces, "--labels", str(labels), "--json"]
    capsys.readouterr()
    assert main(argv) == 1  # the default sentinel (paper+length) cannot score easy/3
    assert main([*argv, "--skip-bad"]) == 0
    out = capsys.readouterr()
    assert "dropped 1 label(s) of records skipped by --skip-bad (first: 'easy/3')" in out.err
    got = {r["slice"]: r for r in json.loads(out.out)}
    assert (got["easy"]["n"], got["easy"]["n_labelled"]) == (29, 1)
    assert (got["hard"]["n"], got["hard"]["n_labelled"]) == (29, 1)
    assert got["easy"]["labels_only"] == 1.0 and got["hard"]["labels_only"] == 0.0


def test_train_topk_skips_a_record_without_k(tmp_path, capsys):
    recs = make_traces(10, seed=1)
    del recs[2]["k"], recs[2]["entropy"]["topk"]
    write_traces(tmp_path / "t.jsonl", recs)
    argv = ["train", str(tmp_path / "t.jsonl"), "--feature-set", "paper+topk", "--out", str(tmp_path / "s.onnx")]
    capsys.readouterr()
    assert main(argv) == 1
    assert main([*argv, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert f"skipped 1 record(s) the features cannot be computed for; first: trace {recs[2]['id']!r} has no k" in err


def test_bench_needs_the_full_series_on_every_record(tmp_path, capsys, monkeypatch):
    from sentinel_vllm import topk_vs_full

    recs = make_traces(10, seed=1)
    del recs[5]["entropy"]["full"]
    write_traces(tmp_path / "t.jsonl", recs)
    given = []

    class Stop(Exception):
        pass

    def record(traces, *a, **kw):
        given.append([t.id for t in traces])
        raise Stop

    monkeypatch.setattr(topk_vs_full, "compare_variants", record)
    argv = ["bench", "topk-vs-full", str(tmp_path / "t.jsonl"), "--k", "5", "--out-dir", str(tmp_path / "b")]
    capsys.readouterr()
    assert main(argv) == 1
    assert f"1 of 40 traces lack the full entropy series (first: {recs[5]['id']!r})" in capsys.readouterr().err
    with pytest.raises(Stop):
        main([*argv, "--skip-bad"])
    assert given == [[r["id"] for i, r in enumerate(recs) if i != 5]]
