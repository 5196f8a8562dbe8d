"""Evaluation: benchmarks, answer grading, the paired resumable run loop, pass@k and paired statistics."""

from .benchmarks import BENCHMARKS, Benchmark, Problem, load_benchmark
from .grading import Grade, extract_choice, grade_choice, grade_math, grade_math_detail, summary_of
from .report import markdown, paper_table, summarize, write_summary
from .runner import EvalSettings, merge_results, read_results, run_eval, sample_seed
from .stats import mean_se, paired_bootstrap_ci, paired_permutation_test, pass_at_k

__all__ = [
    "BENCHMARKS", "Benchmark", "Problem", "load_benchmark",
    "Grade", "extract_choice", "grade_choice", "grade_math", "grade_math_detail", "summary_of",
    "markdown", "paper_table", "summarize", "write_summary",
    "EvalSettings", "merge_results", "read_results", "run_eval", "sample_seed",
    "mean_se", "paired_bootstrap_ci", "paired_permutation_test", "pass_at_k",
]
