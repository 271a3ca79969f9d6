"""Composition advice: hand-computed ranking and protocol check on tiny traces."""

import pytest
from synthetic import MeanClassifier

from sentinel_vllm.advise import advise, check_advice
from sentinel_vllm.traces import Trace


def _traces():
    # a: accuracy 1.0, entropy 1; b: 0.0, entropy 3; c: 0.5, entropy 2
    spec = {"a": ([1, 1], 1.0), "b": ([0, 0], 3.0), "c": ([1, 0], 2.0)}
    return [Trace(f"{s}/{i}", s, bool(c), {"full": [e, e]}, None, {})
            for s, (flags, e) in spec.items() for i, c in enumerate(flags)]


def test_advise_hand_computed():
    rows = advise(_traces())
    assert [r["composition"] for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert rows[0]["accuracy_spread"] == 1.0 and rows[0]["entropy_coverage"] == 1.0
    assert rows[0]["score"] == 1.0 and rows[0]["rank"] == 1
    # (a, c) and (b, c): spread 0.5, entropy ranges [1, 2] / [2, 3] hold two of three: tie, by name
    assert rows[1]["accuracy_spread"] == 0.5
    assert rows[1]["entropy_coverage"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 4"):
        advise(_traces(), size=4)


def test_check_advice_hand_computed():
    tr = _traces()
    chk = check_advice(tr, advise(tr), classifier_factory=MeanClassifier)
    by = {c["composition"]: c for c in chk}
    assert by[("a", "b")]["worst_aee"] == 0.0          # train 2 of 4 right -> c estimated 0.5
    assert by[("a", "c")]["worst_aee"] == pytest.approx(0.75)   # 3/4 for b (true 0)
    assert by[("b", "c")]["worst_aee"] == pytest.approx(0.75)   # 1/4 for a (true 1)
    assert by[("a", "b")]["protocol_rank"] == 1


def test_evaluate_advise_cli(tmp_path, capsys):
    from sentinel_vllm.cli import main
    from sentinel_vllm.traces import write_traces

    f = tmp_path / "t.jsonl"
    write_traces(f, _traces())
    assert main(["evaluate", str(f), "--advise", "--out-dir", str(tmp_path / "adv")]) == 0
    out = capsys.readouterr().out
    assert "| 1 | a+b | 1.000 | 1.000 | 1.000 |" in out
    assert (tmp_path / "adv" / "advise.csv").read_text().splitlines()[1].startswith("1,a+b,")
