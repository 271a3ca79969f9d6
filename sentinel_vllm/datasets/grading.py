"""Grade a model response against a :class:`~sentinel_vllm.datasets.registry.Problem`.

Free-form answers: extract the last ``\\boxed{}`` of the response (else what follows a
final "answer is"/"Answer:": math, a bold value or a leading number; else the last
number), then ``math_verify.verify(parse(gold), parse(pred))`` with the gold first. Multiple choice: extract the option letter (boxed,
"answer is (B)", bold, a bare letter line, or the text of one option) and compare.

Never raises on model output: odd, empty or huge responses grade False with a reason.

Time bounds. math-verify's own timeouts use ``signal.alarm``, which only works in the main
thread; :func:`grade` passes them (5 s) there and passes ``None`` in other threads, as the
math-verify docs require. In every thread the extracted answer is screened first to keep
sympy's work bounded without a timer (a heuristic guard, measured on the known blow-ups): answers longer than :data:`MAX_ANSWER_CHARS`, power
towers, exponents of 6+ digits (3+ on a bracketed expression) and factorials of 3+ digit
numbers are refused (graded False, reason ``"refused: ..."``). The same screen applies
everywhere, so grades do not depend on the calling thread.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from dataclasses import dataclass

from sentinel_vllm.datasets.registry import LETTERS, Problem, last_boxed

MAX_ANSWER_CHARS = 300
MAX_RESPONSE_CHARS = 50_000  # only the tail is searched (answers come last)
TIMEOUT_S = 5


@dataclass(frozen=True)
class Grade:
    """Result of grading one response.

    Attributes
    ----------
    correct : bool
    extracted : str or None
        The answer taken from the response (a letter for multiple choice), None if none found.
    reason : str
        How the decision was made (``"math-verify"``, ``"no answer found"``, ``"refused: ..."``).
    """

    correct: bool
    extracted: str | None
    reason: str


# ---------------------------------------------------------------- free-form extraction
_NUMBER = re.compile(r"\d+:\d+|-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_SCI = re.compile(r"(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TIME = re.compile(r"(\d{1,2}):(\d{2})\s*([ap])?\.?\s*m?\.?", re.IGNORECASE)


def extract_answer(response: str) -> tuple[str | None, str]:
    """The final answer of a free-form response and where it came from.

    Returns
    -------
    (str or None, str)
        The answer text (``None`` if none) and its origin: ``"boxed"``, ``"answer is"``,
        ``"last number"`` or ``"no answer found"``.
    """
    tail = response[-MAX_RESPONSE_CHARS:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed, "boxed"
    matches = list(_ANSWER_IS.finditer(tail))
    if matches:
        found = _after_label(matches[-1].group(1).strip())
        if found:
            return found, "answer is"
    nums = _NUMBER.findall(tail)
    if nums:
        return nums[-1], "last number"
    return None, "no answer found"


_MATH = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_BOLD = re.compile(r"\*\*\s*(.+?)\s*\*\*")


def _after_label(rest: str) -> str | None:
    """The answer right after "answer is"/"Answer:": math, a bold value, or a leading number.

    Later numbers (``"**73** (checked in 2 ways)"``) are commentary, not the answer.
    """
    bold = _BOLD.match(rest)
    rest = bold.group(1).strip() if bold else rest.lstrip("* ")  # "**Answer:** 73" leaves "** 73"
    m = _MATH.match(rest)
    if m:
        return next(g for g in m.groups() if g).strip()
    m = _NUMBER.match(rest.lstrip("\\$ "))
    if m:
        return m.group(0)
    if bold and rest:
        return rest.rstrip(".").strip()
    return None


def _normalise(ans: str) -> str:
    s = ans.strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _SCI.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\times10^{{{int(m.group(2))}}}"
    return s


def _refuse(ans: str) -> str | None:
    """Why an answer is too risky for sympy, or None."""
    if len(ans) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if re.search(r"\^\s*(?:\{[^{}]*\^|\(?[\w.]+\)?\s*\^|\{\s*\{)", ans):
        return "power tower"
    if re.search(r"(?:\^|\*\*)\s*\{?\s*\(?\s*-?\d{6,}", ans):
        return "exponent with 6+ digits"
    if re.search(r"[)\]}]\s*(?:\^|\*\*)\s*\{?\s*\(?\s*-?\d{3,}", ans):
        return "expression raised to a 3+ digit power"
    if re.search(r"\d{3,}\s*\}?\s*!", ans):
        return "factorial of a large number"
    return None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout):
    from math_verify import parse

    return parse(f"${_normalise(gold)}$", parsing_timeout=timeout)


def _time_match(gold: str, pred: str) -> bool | None:
    """ASDiv clock answers (``"3:30 p.m."``): compare h:mm as text; None if gold is no time."""
    g = _TIME.fullmatch(gold.strip())
    if not g:
        return None
    p = _TIME.search(pred)
    return bool(p) and (int(p.group(1)), p.group(2)) == (int(g.group(1)), g.group(2))


def _plain(s: str) -> str:
    """Text form for exact comparison: no ``\\text{}``, ``$``, trailing period, case or spacing."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).replace("\\$", "").replace("$", "")
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip().lower()


def grade_math(gold: str, response: str) -> Grade:
    """Grade a free-form response against a numeric / LaTeX / short-text gold (math-verify)."""
    ans, origin = extract_answer(response)
    if ans is None or not ans.strip():
        return Grade(False, None, "no answer found")
    if _plain(ans) == _plain(gold):
        return Grade(True, ans, f"{origin}; identical text")
    why = _refuse(ans)
    if why:
        return Grade(False, ans[:MAX_ANSWER_CHARS], f"refused: {why}")
    timed = _time_match(gold, ans)
    if timed is not None:
        return Grade(timed, ans, f"{origin}; clock time compared as text")
    from math_verify import parse, verify

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = _parse_gold(gold, timeout)
            p = parse(f"${_normalise(ans)}$", parsing_timeout=timeout)
            if not g:
                return Grade(False, ans, "gold not parseable by math-verify")
            if not p:
                return Grade(False, ans, f"{origin}; answer not parseable")
            ok = bool(verify(g, p, timeout_seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - never throw on model output
        return Grade(False, ans, f"math-verify error: {type(exc).__name__}: {exc}"[:200])
    return Grade(ok, ans, f"{origin}; math-verify")


# ---------------------------------------------------------------- multiple choice
def extract_choice(response: str, choices: tuple[str, ...]) -> tuple[str | None, str]:
    """The option letter a response picks, and how it was found.

    Tries, in order: ``\\boxed{B}``; "answer is (B)" / "Answer: B" / "option B" (last one);
    ``**B**``; a line that is only a letter (``"B"``, ``"(B)"``, ``"B."``, ``"B) text"``);
    the text of exactly the option mentioned last. Letters beyond the number of options are
    ignored.
    """
    valid = LETTERS[: len(choices)]
    tail = response[-MAX_RESPONSE_CHARS:]
    L = f"[{valid}]"
    boxed = last_boxed(tail)
    if boxed is not None:
        m = re.fullmatch(rf"\s*(?:\\text(?:bf)?\{{)?\s*\(?({L})\)?\s*\}}?\s*(?:[.:)].*)?", boxed)
        if m:
            return m.group(1), "boxed letter"
        hit = _option_text(boxed, choices)
        if hit:
            return hit, "boxed option text"
    lo = valid.lower()
    pats = [  # letters upper case, or lower case only inside brackets ("(b)")
        (rf"(?i:answer|option|choice)\s*(?i:is|:|would be|=)?\s*:?\s*(?i:option\s*)?\**\s*"
         rf"(?:[\(\[]?({L})|[\(\[]([{lo}])[\)\]])(?![\w])", "answer is"),
        (rf"\*\*\s*\(?({L})\)?[.:)]?\s*\*\*", "bold letter"),
        (rf"(?m)^\s*(?:[\(\[]({L})[\)\]]|({L})(?:[\)\].:](?:\s.*)?)?)\s*$", "letter line"),
    ]
    for pat, how in pats:
        found = ["".join(g) if isinstance(g, tuple) else g for g in re.findall(pat, tail)]
        found = [f.upper() for f in found if f and f.upper() in valid]
        if found:
            return found[-1], how
    hit = _option_text(tail, choices)
    if hit:
        return hit, "option text"
    return None, "no option found"


def _option_text(text: str, choices: tuple[str, ...]) -> str | None:
    """Letter of the option whose text occurs last in ``text`` (longest on ties), else None."""
    low = text.lower()
    best = None  # (end position, length, letter)
    for i, c in enumerate(choices):
        c = c.strip().lower()
        if not c:
            continue
        for m in re.finditer(rf"(?<![\w]){re.escape(c)}(?![\w])", low):
            cand = (m.end(), len(c), LETTERS[i])
            best = max(best, cand) if best else cand
    return best[2] if best else None


def grade_choice(problem: Problem, response: str) -> Grade:
    """Grade a multiple-choice response: extracted letter equals the gold letter."""
    choices = problem.choices or ()
    letter, how = extract_choice(response, choices)
    if letter is None:
        return Grade(False, None, how)
    gold = problem.gold.strip()
    if len(gold) > 1 and gold in choices:  # gold given as the option text
        gold = LETTERS[choices.index(gold)]
    return Grade(letter == gold.upper(), letter, how)


def grade(problem: Problem, response_text) -> Grade:
    """Grade one response; never raises on odd model output.

    Parameters
    ----------
    problem : Problem
        The question with its gold answer (letter when ``problem.choices`` is set).
    response_text : str
        The model's full response. Non-str input (None, bytes...) grades False.

    Returns
    -------
    Grade
        ``correct``, the ``extracted`` answer, and the ``reason``.

    Notes
    -----
    Safe to call from threads (see the module docstring for time bounds).
    """
    if not isinstance(response_text, str):
        return Grade(False, None, f"response is {type(response_text).__name__}, not str")
    if not response_text.strip():
        return Grade(False, None, "empty response")
    try:
        if problem.is_multiple_choice:
            return grade_choice(problem, response_text)
        return grade_math(problem.gold, response_text)
    except Exception as exc:  # noqa: BLE001 - last line of defence
        return Grade(False, None, f"grader error: {type(exc).__name__}: {exc}"[:200])
