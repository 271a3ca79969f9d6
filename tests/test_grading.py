"""Graders: math-verify equivalences, extraction, multiple choice, odd output, fixture golds."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from sentinel_vllm.datasets import Problem, grade, load_benchmark  # noqa: E402
from sentinel_vllm.datasets.grading import extract_answer, extract_choice  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def P(gold: str) -> Problem:
    return Problem("t/1", "t", "q", gold)


MC = Problem("m/1", "m", "Which star?", "B",
             choices=("red giant", "white dwarf", "neutron star", "black hole"))


@pytest.mark.parametrize("gold,response,correct", [
    # fractions and decimals
    ("0.5", r"So $x = \boxed{\frac{1}{2}}$.", True),
    (r"\frac{1}{2}", "The result is 0.5", True),
    (r"\frac{1}{2}", r"\boxed{\frac12}", True),
    (r"\frac{1}{2}", r"\boxed{0.25}", False),
    (r"-\frac{1}{8}", r"\boxed{-0.125}", True),
    # LaTeX
    (r"\sqrt{2}", r"\boxed{\sqrt 2}", True),
    (r"\sqrt{2}", r"\boxed{2}", False),
    (r"3\sqrt{13}", r"\boxed{\sqrt{117}}", True),
    (r"\pi", r"\boxed{3.14159265}", True),
    (r"2\pi", r"\boxed{2 \pi}", True),
    (r"2\pi", r"\boxed{\pi}", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \frac{\pi}{2})}", True),
    ("p - q", r"\boxed{-q + p}", True),
    (r"90^\circ", r"\boxed{90}", True),
    # units and currency
    ("5", "She pays 5 dollars.", True),
    ("5", "It costs $5.", True),
    ("5", r"\boxed{\$5}", True),
    ("5", r"\boxed{5 \text{ cm}}", True),
    ("5", "The side is 5 cm", True),
    ("5", "The side is 6 cm", False),
    # thousands separators, negatives
    ("1234", "He has 1,234 marbles.", True),
    ("1234", r"\boxed{1,234}", True),
    ("2125", r"\boxed{2,125}", True),
    ("1234", r"\boxed{1,243}", False),
    ("-10", "The temperature drops to -10 degrees.", True),
    ("-10", r"\boxed{10}", False),
    ("-9867630", r"\boxed{-9,867,630}", True),
    # anchors: boxed beats later numbers; "answer is $...$"
    ("18", r"\boxed{18} (checked with 3 other methods)", True),
    (r"\frac{1}{2}", r"The answer is $\frac{1}{2}$.", True),
    # ASDiv special golds
    ("3:30 p.m.", "She arrives at 3:30 pm.", True),
    ("3:30 p.m.", r"\boxed{3}", False),
    ("3:30 p.m.", "She arrives at 3:45 pm.", False),
    ("5:6", "The ratio is 5:6", True),
    ("5:6", r"\boxed{\frac{5}{6}}", True),
    ("5:6", "The ratio is 6:5", False),
    ("Mrs. Hilt", r"\boxed{\text{Mrs. Hilt}}", True),
    (r"\text{Evelyn}", r"\boxed{Evelyn}", True),
    # OCW e-notation and floats with noise
    ("4.5e33", r"L = \boxed{4.5 \times 10^{33}} erg/s", True),
    ("4.5e33", r"\boxed{4.5e33}", True),
    ("4.5e33", r"\boxed{4.5 \times 10^{32}}", False),
    ("3244047.1", "\\boxed{3244047.0999999996}", True),
    ("5", r"\boxed{.5}", False),
])
def test_math_answers(gold, response, correct):
    g = grade(P(gold), response)
    assert g.correct is correct, g


@pytest.mark.parametrize("response,letter", [
    ("The answer is (B)", "B"),
    ("**B**", "B"),
    (r"\boxed{B}", "B"),
    (r"\boxed{\text{B}}", "B"),
    (r"\boxed{white dwarf}", "B"),
    ("Answer: C", "C"),
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("B) white dwarf", "B"),
    ("The correct option is (b).", "B"),
    ("answer: **D**", "D"),
    ("A. red giant\nB. white dwarf\n\nAnswer: B", "B"),
    ("It must be a white dwarf.", "B"),
    ("The answer is a white dwarf.", "B"),  # the article "a" is not option A
    ("Not the red giant; it becomes a black hole.", "D"),  # option text mentioned last
])
def test_choice_extraction(response, letter):
    got, how = extract_choice(response, MC.choices)
    assert got == letter, how
    assert grade(MC, response).correct is (letter == "B")


@pytest.mark.parametrize("response,reason", [
    ("", "empty response"),
    ("   \n", "empty response"),
    (None, "response is NoneType, not str"),
    (b"\\boxed{5}", "response is bytes, not str"),
    ("I don't know", "no answer found"),
    (r"}}}\boxed{{{", "no answer found"),
    (r"\boxed{}", "no answer found"),
    (r"\boxed{9^{9^{9^{9}}}}", "refused: power tower"),
    (r"\boxed{(x+1)^{999}}", "refused: expression raised to a 3+ digit power"),
    (r"\boxed{10^{1000000}}", "refused: exponent with 6+ digits"),
    (r"\boxed{1000!}", "refused: factorial of a large number"),
    (r"\boxed{" + "1+" * 500 + "1}", "refused: answer longer than 300 characters"),
])
def test_odd_output_never_raises(response, reason):
    g = grade(P("5"), response)
    assert g.correct is False
    assert g.reason == reason


def test_multiple_choice_odd_output():
    assert grade(MC, "banana") == grade(MC, "banana")
    assert grade(MC, "banana").reason == "no option found"
    g = grade(MC, "I think the answer is E.")  # only A-D exist
    assert g.correct is False and g.extracted is None


def test_huge_output_uses_the_tail():
    g = grade(P("5"), "x" * 1_000_000 + r" so \boxed{5}")
    assert g.correct and g.extracted == "5"
    assert grade(P("5"), "9 " * 200_000).correct is False


def test_extract_answer_origins():
    assert extract_answer(r"a \boxed{1} b \boxed{2} c 3") == ("2", "boxed")
    assert extract_answer("The answer is $x+1$.") == ("x+1", "answer is")
    assert extract_answer("We get 3, then 4.5 apples") == ("4.5", "last number")
    assert extract_answer("nothing") == (None, "no answer found")


def test_grading_in_threads_matches_main_thread():
    cases = [(P(r"\frac{1}{2}"), "0.5"), (P("7"), r"\boxed{8}"),
             (P(r"\sqrt{2}"), r"\boxed{\sqrt2}"), (P("5"), r"\boxed{9^{9^{9}}}"), (MC, "**B**")]
    main = [grade(p, r) for p, r in cases]
    out: list = [None] * len(cases)

    def work(i):
        out[i] = grade(*cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == main
    assert [g.correct for g in main] == [True, False, True, False, True]


# ---------------------------------------------------------------- every fixture gold format
FIXTURE_FILES = ["gsm8k.jsonl", "math.jsonl", "math500.jsonl", "svamp.jsonl", "asdiv.jsonl",
                 "mawps.jsonl", "mmlu_stem.jsonl", "ocw.jsonl", "gsm_hard.jsonl",
                 "arc_challenge.jsonl", "gpqa_diamond.csv"]


@pytest.mark.parametrize("fname", FIXTURE_FILES)
def test_fixture_gold_graded_against_itself(fname):
    name = fname.split(".")[0]
    for p in load_benchmark(name, path=FIX / fname):
        resp = (f"Answer: {p.gold}" if p.is_multiple_choice
                else f"So the final answer is $\\boxed{{{p.gold}}}$.")
        assert grade(p, resp).correct, (p.id, p.gold)
        if p.is_multiple_choice:  # every wrong letter is wrong
            for other in "ABCDE"[: len(p.choices)]:
                if other != p.gold:
                    assert not grade(p, f"Answer: {other}").correct


@pytest.mark.parametrize("name,key", [("math", "solution"), ("ocw", "solution"),
                                      ("gsm8k", "answer")])
def test_reference_solution_grades_correct(name, key):
    problems = {p.id: p for p in load_benchmark(name, path=FIX / f"{name}.jsonl")}
    rows = [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        solution = row[key].replace("####", "The answer is")
        g = grade(problems[f"{name}/{i}"], solution)
        assert g.correct, (i, g)


def test_fixture_golds_reject_a_neighbours_answer():
    for fname in FIXTURE_FILES[:9]:
        probs = load_benchmark(fname.split(".")[0], path=FIX / fname)
        for a, b in zip(probs, probs[1:] + probs[:1]):
            if a.gold != b.gold:
                assert not grade(a, f"\\boxed{{{b.gold}}}").correct, (a.id, a.gold, b.gold)


def test_multiple_choice_gold_given_as_option_text():
    p = Problem("m/2", "m", "Which star?", "white dwarf", choices=MC.choices)
    assert grade(p, "Answer: B").correct
    assert not grade(p, "Answer: A").correct


@pytest.mark.parametrize(
    "response, answer",
    [
        ("Final Answer: **73** (checked in 2 ways)", "73"),
        ("**Final Answer:** 73, found in 2 steps", "73"),
        ("The answer is **-1.5** after 3 tries", "-1.5"),
        ("So the answer is 1,200 dollars for 4 people.", "1,200"),
        (r"Answer: **$\frac{3}{4}$** (2 checks)", r"\frac{3}{4}"),
    ],
)
def test_answer_after_final_answer_label_wins_over_later_numbers(response, answer):
    assert extract_answer(response) == (answer, "answer is")


def test_bold_final_answer_grades_by_its_value():
    from sentinel_vllm.datasets.grading import grade_math

    g = grade_math("73", "Final Answer: **73** (checked in 2 ways)")
    assert g.correct is True and g.extracted == "73"
    assert grade_math("2", "Final Answer: **73** (checked in 2 ways)").correct is False
