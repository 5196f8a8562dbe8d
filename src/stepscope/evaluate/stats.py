"""Evaluation statistics: unbiased pass@k, per-problem mean ± SE, paired bootstrap CI and paired sign-flip test.

Every quantity is computed over problems: a problem's samples are averaged first, so a problem with more
samples does not weigh more, and the standard error reflects the number of problems (the unit that was
sampled from the world), not the number of generations. Two arms are compared problem by problem (paired):
the same problems, the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import StepscopeError

# Above this many problems the sign-flip test samples sign vectors instead of enumerating all 2^P of them.
EXACT_PERMUTATION_MAX_PROBLEMS = 16


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k), computed as a stable product: 1 - prod_{i=n-c+1..n} (1 - k/i).
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise StepscopeError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_values(n: int) -> list[int]:
    """The k reported for n samples: the powers of two up to n (1, 2, 4, ...)."""
    return [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []


def mean_se(x: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(P)); SE is nan for fewer than 2 values."""
    x = np.asarray(x, dtype=np.float64)  # [P]
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def per_problem_means(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    """[P] accuracy of each problem: the mean over its samples (a problem may have any number >= 1)."""
    if any(len(c) == 0 for c in correct):
        raise StepscopeError("every problem needs at least one sample")
    return np.array([np.mean(np.asarray(c, dtype=np.float64)) for c in correct], dtype=np.float64)


def per_problem_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> np.ndarray:
    """[P] unbiased pass@k of each problem from its own samples."""
    return np.array([pass_at_k(len(c), int(np.sum(np.asarray(c, dtype=bool))), k) for c in correct],
                    dtype=np.float64)


def _paired_diff(a, b) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)  # [P] per-problem score of the reference arm
    b = np.asarray(b, dtype=np.float64)  # [P] per-problem score of the compared arm
    if a.shape != b.shape or a.ndim != 1:
        raise StepscopeError(f"paired statistics need two equal-length 1-D arrays (got {a.shape} and {b.shape})")
    if a.size == 0:
        raise StepscopeError("paired statistics need at least one problem")
    return b - a


def paired_bootstrap_ci(a, b, *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0,
                        chunk: int = 1024) -> tuple[float, float, float]:
    """Mean of the per-problem difference b - a and its percentile bootstrap CI, resampling problems.

    Each bootstrap replicate draws P problems with replacement and keeps each problem's (a, b) pair together.
    Returns (mean difference, low, high). Memory stays at chunk x P.
    """
    d = _paired_diff(a, b)  # [P]
    if not 0 < level < 1:
        raise StepscopeError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    p = d.size
    means = np.empty(n_boot, dtype=np.float64)  # [n_boot]
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        idx = rng.integers(0, p, size=(m, p))  # [m, P] resampled problem indices
        means[s:s + m] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def paired_permutation_test(a, b, *, n_perm: int = 10_000, seed: int = 0,
                            exact: bool | None = None) -> float:
    """Two-sided p-value of the paired sign-flip test of mean(b - a) = 0.

    Under the null the two arms are exchangeable within a problem, so each per-problem difference keeps or
    flips its sign with probability 1/2. With P <= EXACT_PERMUTATION_MAX_PROBLEMS (or exact=True) all 2^P sign
    vectors are enumerated (an exact p-value); otherwise n_perm random sign vectors are drawn and
    p = (1 + #{|mean*| >= |mean|}) / (1 + n_perm), which never reports 0.
    """
    d = _paired_diff(a, b)  # [P]
    p = d.size
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))  # equal means must count as "as extreme"
    if exact is None:
        exact = p <= EXACT_PERMUTATION_MAX_PROBLEMS
    if exact:
        if p > 24:
            raise StepscopeError(f"an exact sign-flip test over {p} problems needs 2^{p} sign vectors; use exact=False")
        codes = np.arange(2 ** p, dtype=np.int64)[:, None]  # [2^P, 1]
        signs = 1.0 - 2.0 * ((codes >> np.arange(p, dtype=np.int64)) & 1)  # [2^P, P] of +-1
        stats = np.abs(signs @ d) / p  # [2^P]
        return float(np.mean(stats >= obs - tol))
    rng = np.random.default_rng(seed)
    count = 0
    for s in range(0, n_perm, 1024):
        m = min(1024, n_perm - s)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, p))  # [m, P]
        count += int(np.sum(np.abs(signs @ d) / p >= obs - tol))
    return (1.0 + count) / (1.0 + n_perm)
