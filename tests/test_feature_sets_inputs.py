"""Feature sets refuse input that would give wrong columns, with one clear message for every caller.

Mixed k for the topk group, ``--k`` choosing the topk group's series, a topk group that
would duplicate the statistics, ``--feature-set`` outside ``--protocol lobo``, a trace
lacking the sentinel's top-k series, and ``token_logprob`` of another length than the series.
"""

import numpy as np
import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.cli.score import score_traces
from sentinel_vllm.feature_sets import feature_set_matrix, spec_from_metadata
from sentinel_vllm.features import compute_features
from sentinel_vllm.protocol import lobo
from sentinel_vllm.sentinel_file import load_sentinel
from sentinel_vllm.serving.api.scoring import SentinelScorer
from sentinel_vllm.traces import MissingSeriesError, Trace, read_traces, write_traces
from synthetic import make_traces

FULL, TOP = [0.5, 1.0, 0.0, 2.0, 1.5], [0.4, 0.9, 0.0, 1.0, 1.2]
MIXED = "needs traces of one k .*have k=\\[10, 20\\]"


def _mixed():
    return [Trace(f"{s}/{i}", s, bool(i % 2), {"full": FULL, "topk": TOP}, k)
            for s, k in (("a", 10), ("b", 20), ("c", 20)) for i in range(4)]


def _write_by_k(tmp_path):
    recs = [t.to_record() for t in _mixed()]
    write_traces(tmp_path / "k10.jsonl", [r for r in recs if r["k"] == 10])
    write_traces(tmp_path / "k20.jsonl", [r for r in recs if r["k"] == 20])
    return [str(tmp_path / "k10.jsonl"), str(tmp_path / "k20.jsonl")]


def test_mixed_k_is_refused_by_every_caller(tmp_path, capsys):
    traces = _mixed()
    with pytest.raises(ValueError, match=MIXED):
        feature_set_matrix(traces, "paper+topk")
    with pytest.raises(ValueError, match=MIXED):
        lobo(traces, feature_set="paper+topk")
    files = _write_by_k(tmp_path)
    for argv in (["evaluate", *files, "--protocol", "lobo", "--feature-set", "paper+topk",
                  "--out-dir", str(tmp_path / "lobo"), "--no-plots"],
                 ["train", *files, "--feature-set", "paper+topk", "--out", str(tmp_path / "s.onnx")]):
        capsys.readouterr()
        assert main(argv) != 0
        assert "needs traces of one k" in capsys.readouterr().err
    # one k for all (the top-10 series of every trace) is fine; sets without topk ignore k
    X = feature_set_matrix([Trace("a/0", "a", True, {"full": FULL, "top10": TOP})], "paper+topk",
                           topk_k=10)
    np.testing.assert_array_equal(X[0, 11:], compute_features(TOP))
    assert feature_set_matrix(traces, "paper").shape == (12, 11)


def test_train_k_picks_the_topk_series(tmp_path):
    recs = make_traces(12, seed=3)  # k=20: series full, topk (= top20) and top5
    write_traces(tmp_path / "t.jsonl", recs)
    out = tmp_path / "k5.onnx"
    assert main(["train", str(tmp_path / "t.jsonl"), "--feature-set", "paper+topk", "--k", "5",
                 "--out", str(out)]) == 0
    sent = load_sentinel(out)
    assert sent.metadata["topk_k"] == 5
    sc = SentinelScorer(sent)  # serving reads top5 too
    assert sc.needed_series == ("full", "top5")
    traces = read_traces(tmp_path / "t.jsonl")
    _, p, _ = score_traces(str(out), traces)
    X = np.array([np.concatenate([compute_features(t.series("full")),
                                  compute_features(t.entropy["top5"])]) for t in traces])
    np.testing.assert_array_equal(p, sent.p_correct(X))
    # traces with top10 and no topk/k: --k 10 reads top10
    for r in recs:
        r["entropy"]["top10"] = r["entropy"].pop("topk")
        del r["k"]
    write_traces(tmp_path / "t10.jsonl", recs)
    out10 = tmp_path / "k10.onnx"
    assert main(["train", str(tmp_path / "t10.jsonl"), "--feature-set", "paper+topk", "--k", "10",
                 "--out", str(out10)]) == 0
    assert spec_from_metadata(load_sentinel(out10).metadata).topk_series == "top10"


def test_topk_group_on_the_stats_series_is_refused(tmp_path, capsys):
    traces = [Trace("a/0", "a", True, {"full": FULL, "topk": TOP}, 20)]
    for entropy, k in (("topk", None), ("top20", None), ("topk", 20)):
        with pytest.raises(ValueError, match="11 duplicate columns"):
            feature_set_matrix(traces, "paper+topk", entropy, k)
    # another series beside top20 is fine: top20_renorm is not top20
    traces[0].entropy["top20_renorm"] = FULL
    assert feature_set_matrix(traces, "paper+topk", "topk_renorm").shape == (1, 22)
    write_traces(tmp_path / "t.jsonl", [t.to_record() for t in traces])
    capsys.readouterr()
    assert main(["train", str(tmp_path / "t.jsonl"), "--entropy", "topk", "--feature-set",
                 "paper+topk", "--out", str(tmp_path / "s.onnx")]) != 0
    assert "11 duplicate columns" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


def test_feature_set_needs_protocol_lobo(tmp_path, capsys):
    write_traces(tmp_path / "t.jsonl", make_traces(5, seed=1))
    base = ["evaluate", str(tmp_path / "t.jsonl"), "--out-dir", str(tmp_path / "e"), "--no-plots"]
    for extra, msg in ((["--feature-set", "paper+topk"], "--feature-set applies to --protocol lobo"),
                       (["--feature-set", "nope"], "unknown --feature-set 'nope'"),
                       (["--band"], "--band applies to --protocol lobo"),
                       (["--protocol", "lobo", "--feature-set", "paper,nope"],
                        "unknown --feature-set 'nope'")):
        capsys.readouterr()
        assert main(base + extra) != 0
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before any work


def test_score_names_the_series_the_sentinel_needs(tmp_path, capsys):
    recs = make_traces(12, seed=3)
    write_traces(tmp_path / "t.jsonl", recs)
    out = tmp_path / "s.onnx"
    assert main(["train", str(tmp_path / "t.jsonl"), "--feature-set", "paper+topk",
                 "--out", str(out)]) == 0  # topk_k = 20, the traces' k
    k10 = [Trace("x/0", "x", None, {"full": FULL, "topk": TOP}, 10)]
    with pytest.raises(MissingSeriesError) as e:
        score_traces(str(out), k10)
    msg = str(e.value)
    assert "'x/0' lacks the top20 entropy series" in msg and "k=10, series: full, topk" in msg


def test_token_logprob_length_must_match_the_series():
    ok = Trace("q/0", "q", True, {"full": FULL}, None,
               {"token_logprob": [-0.1, -0.2, -0.3, -0.4, -1.0]})
    row = feature_set_matrix([ok], "paper+logprob")[0]
    assert row[11:] == pytest.approx([-0.4, np.sqrt(0.1), -1.0, -0.76])  # q10: -1 + .4 * .6
    bad = Trace("q/1", "q", True, {"full": FULL}, None, {"token_logprob": [-0.1, -0.2, -0.3]})
    with pytest.raises(MissingSeriesError,
                       match="'q/1': token_logprob has 3 values but its full entropy series has 5"):
        feature_set_matrix([ok, bad], "paper+logprob")
