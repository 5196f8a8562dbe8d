"""Evaluation: benchmarks, answer grading, the paired resumable run loop, its run folder, and its summary."""

from ..stats import paired_bootstrap_ci, paired_permutation_test
from .benchmarks import BENCHMARKS, Benchmark, Problem, load_benchmark
from .code_grading import grade_code
from .grading import Grade, extract_choice, grade_choice, grade_math, grade_math_detail, summary_of
from .runfolder import RunFolder, load_run, merge_results, read_results
from .runner import EvalSettings, run_eval, sample_seed
from .summary import headline_table, markdown, mean_se, paper_table, pass_at_k, summarize, write_summary

__all__ = [
    "BENCHMARKS", "Benchmark", "Problem", "load_benchmark",
    "Grade", "extract_choice", "grade_choice", "grade_math", "grade_math_detail", "summary_of", "grade_code",
    "RunFolder", "load_run", "merge_results", "read_results",
    "EvalSettings", "run_eval", "sample_seed",
    "markdown", "paper_table", "headline_table", "summarize", "write_summary",
    "mean_se", "paired_bootstrap_ci", "paired_permutation_test", "pass_at_k",
]
