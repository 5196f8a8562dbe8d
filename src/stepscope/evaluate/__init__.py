"""Evaluation: benchmarks, answer grading, the paired resumable run loop, its run folder, and its summary.

The public names are imported lazily, so that reading the benchmark registry (`stepscope eval --help`) does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "paired_bootstrap_ci": "..stats", "paired_permutation_test": "..stats",
    "BENCHMARKS": ".benchmarks", "BenchmarkSpec": ".benchmarks", "register_benchmark": ".benchmarks",
    "load_benchmark": ".benchmarks", "Benchmark": ".problems", "Problem": ".problems",
    "grade_code": ".code_grading",
    "Grade": ".grading", "extract_choice": ".grading", "grade_choice": ".grading", "grade_math": ".grading",
    "grade_math_detail": ".grading", "summary_of": ".grading",
    "RunFolder": ".runfolder", "load_run": ".runfolder", "merge_results": ".runfolder", "read_results": ".runfolder",
    "EvalSettings": ".runner", "run_eval": ".runner", "sample_seed": ".runner",
    "headline_table": ".summary", "markdown": ".summary", "mean_se": ".summary", "paper_table": ".summary", "pass_at_k": ".summary",
    "summarize": ".summary", "write_summary": ".summary",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
