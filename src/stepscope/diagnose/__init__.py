"""Diagnose Shallow Lock-in and Deep Decay from step maps (docs/method.md §4): metrics, profiles, comparisons.

    from stepscope.diagnose import diagnose, build_profile, compare
    d = diagnose("sal/trace-7")                        # a result folder, a SaliencyResult, or maps + step_kinds
    d.scores, d.table()                                # lock_in_score, decay_slope, deep_summary_to_thinking
    profile = build_profile([diagnose(p) for p in correct_dirs])
    diagnose("sal/trace-7", baseline=profile).verdict  # z-scores, flags and a verdict against the baseline
    compare(correct_dirs, wrong_dirs).table()          # per metric and layer; differences are wrong - correct

The jobs, one module each: `metrics` (per-layer metrics and scores of bare maps), `diagnosis` (the Diagnosis
of one trace), `profile` (baseline profiles and verdicts), `comparison` (correct versus wrong groups).

The package itself is callable: `stepscope.diagnose(result)` is `stepscope.diagnose.diagnose(result)`. So the
one name serves as the package (`import stepscope.diagnose`, never shadowed by a function) and as the function
(`from stepscope import diagnose; diagnose(result)`), whatever was imported first.
"""

from __future__ import annotations

import sys
import types

from .comparison import MULTIPLE_COMPARISONS_NOTE, Comparison, compare
from .diagnosis import (
    Diagnosis,
    diagnose,
    diagnose_maps,
    format_scores,
    format_table,
    problem_key,
    result_meta,
)
from .metrics import (
    BAD_DIRECTION,
    BLOCK_METRICS,
    DECAY_METRICS,
    KINDS,
    LOCK_IN_METRICS,
    METRICS,
    SCORES,
    SHORT_NAMES,
    check_inputs,
    compute_metrics,
    compute_scores,
    layer_groups,
)
from .profile import Z_THRESHOLD, Profile, apply_baseline, build_profile

__all__ = ["diagnose", "diagnose_maps", "Diagnosis", "build_profile", "apply_baseline", "Profile", "compare",
           "Comparison", "compute_metrics", "compute_scores", "check_inputs", "layer_groups", "problem_key",
           "result_meta", "format_table", "format_scores", "KINDS", "METRICS", "SCORES", "LOCK_IN_METRICS",
           "DECAY_METRICS", "BLOCK_METRICS", "BAD_DIRECTION", "SHORT_NAMES", "Z_THRESHOLD",
           "MULTIPLE_COMPARISONS_NOTE"]


class _CallablePackage(types.ModuleType):
    """This package's module type: calling the package calls `diagnose`."""

    def __call__(self, *args, **kwargs) -> Diagnosis:
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
