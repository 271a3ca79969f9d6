"""Benchmark loaders and graders (importable without torch or vLLM).

>>> from sentinel_vllm.datasets import load_benchmark, grade
>>> probs = load_benchmark("gsm8k", n=200, seed=0)          # offline wheel, cached
>>> grade(probs[0], "... so the answer is \\\\boxed{18}").correct

Benchmarks are data (:data:`BENCHMARKS`); ``BENCHMARKS[name].difficulty_rank`` orders them
from easy (1) to hard (6) for compositions such as "Extremes".
"""

from sentinel_vllm.datasets.grading import Grade, grade
from sentinel_vllm.datasets.registry import BENCHMARKS, Benchmark, Fields, Problem
from sentinel_vllm.datasets.sources import load_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "Fields", "Grade", "Problem", "grade", "load_benchmark"]
