"""Statistics for group and paired comparisons: bootstrap intervals, Welch, Mann-Whitney, permutation tests (of
differences and of correlations), effect sizes and multiple-comparison adjustment.

Sign convention (every function here, and every caller): differences are treatment - control, passed as
`a` and `b`: `f(a, b)` reports mean(a) - mean(b), mean(a - b) over pairs, P(a > b) - P(a < b). Callers pass
the treatment first: stepflow - baseline in an evaluation, wrong - correct in a diagnosis comparison.

Other conventions:
- inputs are 1-D sequences of finite floats (NaN or inf is an error: drop missing values first);
- randomness comes only from `seed` (a `numpy.random.default_rng` seed), so results are reproducible, and
  they do not depend on how the resamples are batched in memory;
- a quantity that the data cannot support (an interval from one value, a t-test on constant groups) is
  `None`, never a made-up number.

A custom `statistic` is vectorized over resamples: it receives arrays whose LAST axis is the sample axis
(shape [n_resamples, n]) and returns one value per resample (shape [n_resamples]).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import StepscopeError

ArrayLike = Sequence[float] | np.ndarray
OneSample = Callable[[np.ndarray], np.ndarray]  # [B, n] -> [B]
TwoSample = Callable[[np.ndarray, np.ndarray], np.ndarray]  # [B, n_a], [B, n_b] -> [B]

_CHUNK_ELEMENTS = 4_000_000  # resample indices held at once (32 MB of int64)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval (`low`/`high` are None when n is too small)."""

    estimate: float
    low: float | None
    high: float | None
    level: float
    n: int
    n_boot: int
    method: str = "percentile bootstrap"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TestResult:
    """A hypothesis test: its statistic, p-value and an effect size (None where undefined)."""

    __test__ = False  # not a pytest test class

    test: str
    statistic: float | None
    p_value: float | None
    effect_size: float | None
    effect_name: str
    n_a: int
    n_b: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise StepscopeError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise StepscopeError(f"{name} contains NaN or inf; drop missing values first")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise StepscopeError(f"confidence level must be in (0, 1), got {level}")


def _check_count(n: int, name: str) -> None:
    if int(n) < 1:
        raise StepscopeError(f"{name} must be at least 1, got {n}")


def _mean_last(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _mean_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.mean(axis=-1) - b.mean(axis=-1)


def _percentile_interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _chunks(n_total: int, row_elements: int) -> list[int]:
    """Sizes of resample batches so that one batch holds at most _CHUNK_ELEMENTS indices."""
    per = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    return [min(per, n_total - s) for s in range(0, n_total, per)]


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, size) of consecutive batches of the given sizes."""
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return list(zip(starts, sizes))


def bootstrap_ci(x: ArrayLike, *, statistic: OneSample | None = None, n_boot: int = 10_000,
                 level: float = 0.95, seed: int | None = 0) -> Interval:
    """Percentile bootstrap interval for `statistic(x)` (default: the mean), resampling values of `x`."""
    x = _vector(x, "x")
    _check_level(level)
    _check_count(n_boot, "n_boot")
    stat = statistic or _mean_last
    n = x.size
    if n == 0:
        raise StepscopeError("bootstrap_ci needs at least one value")
    estimate = float(stat(x[None, :])[0])
    if n < 2:
        return Interval(estimate, None, None, level, n, 0)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([stat(x[rng.integers(0, n, size=(b, n))]) for b in _chunks(n_boot, n)])  # [n_boot]
    return Interval(estimate, *_percentile_interval(boot, level), level, n, n_boot)


def bootstrap_diff_ci(a: ArrayLike, b: ArrayLike, *, statistic: TwoSample | None = None, n_boot: int = 10_000,
                      level: float = 0.95, seed: int | None = 0) -> Interval:
    """Percentile bootstrap interval for `statistic(a, b)` (default mean(a) - mean(b)), independent groups.

    Each resample draws len(a) values from a and len(b) values from b, with replacement.
    """
    a, b = _vector(a, "a"), _vector(b, "b")
    _check_level(level)
    _check_count(n_boot, "n_boot")
    stat = statistic or _mean_diff
    if a.size == 0 or b.size == 0:
        raise StepscopeError("bootstrap_diff_ci needs at least one value in each group")
    estimate = float(stat(a[None, :], b[None, :])[0])
    if a.size < 2 or b.size < 2:
        return Interval(estimate, None, None, level, a.size + b.size, 0)
    rng = np.random.default_rng(seed)
    parts = []
    for m in _chunks(n_boot, a.size + b.size):
        ia = rng.integers(0, a.size, size=(m, a.size))
        ib = rng.integers(0, b.size, size=(m, b.size))
        parts.append(stat(a[ia], b[ib]))
    boot = np.concatenate(parts)  # [n_boot]
    return Interval(estimate, *_percentile_interval(boot, level), level, a.size + b.size, n_boot)


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.size != b.size:
        raise StepscopeError(f"paired samples must have the same length, got {a.size} and {b.size}")
    if a.size == 0:
        raise StepscopeError("paired comparison needs at least one pair")
    return a, b


def paired_bootstrap_ci(a: ArrayLike, b: ArrayLike, *, statistic: TwoSample | None = None,
                        n_boot: int = 10_000, level: float = 0.95, seed: int | None = 0) -> Interval:
    """Percentile bootstrap interval for `statistic(a, b)` (default mean(a - b)) over pairs (a[i], b[i]).

    Each resample draws pair indices with replacement, so the pairing (same problem, same seed...) is kept.
    """
    a, b = _paired(a, b)
    _check_level(level)
    _check_count(n_boot, "n_boot")
    d = a - b  # [n] the paired differences

    def resampled(idx: np.ndarray) -> np.ndarray:  # [m, n] pair indices -> [m] statistics
        return d[idx].mean(axis=-1) if statistic is None else statistic(a[idx], b[idx])

    n = a.size
    estimate = float(resampled(np.arange(n)[None, :])[0])
    if n < 2:
        return Interval(estimate, None, None, level, n, 0)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([resampled(rng.integers(0, n, size=(m, n))) for m in _chunks(n_boot, n)])  # [n_boot]
    return Interval(estimate, *_percentile_interval(boot, level), level, n, n_boot, "paired percentile bootstrap")


def _p_from_null(null: np.ndarray, observed: float, alternative: str) -> int:
    """How many null statistics are at least as extreme as `observed` (with a float tolerance)."""
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "two-sided":
        return int(np.count_nonzero(np.abs(null) >= abs(observed) - tol))
    if alternative == "greater":
        return int(np.count_nonzero(null >= observed - tol))
    if alternative == "less":
        return int(np.count_nonzero(null <= observed + tol))
    raise StepscopeError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")


# Exact enumeration of the 2**n sign patterns is cheap up to this many pairs (65,536 patterns).
EXACT_PERMUTATION_MAX = 16
# ... and refused beyond this many, even when asked for (16.7 million patterns).
EXACT_PERMUTATION_LIMIT = 24


def paired_permutation_test(a: ArrayLike, b: ArrayLike, *, statistic: OneSample | None = None,
                            n_perm: int = 10_000, alternative: str = "two-sided", seed: int | None = 0,
                            exact: bool | None = None) -> TestResult:
    """Sign-flip permutation test of the paired differences d = a - b (null: d is symmetric around 0).

    The statistic (default mean(d)) is vectorized over sign patterns. The one rule for exact enumeration:
    every one of the 2**n sign patterns is enumerated (an exact p-value) when n <= EXACT_PERMUTATION_MAX or
    2**n <= n_perm, that is whenever the enumeration is small or no larger than the random draws asked for;
    otherwise `n_perm` random patterns give p = (1 + #as extreme) / (1 + n_perm), which is never 0.
    `exact=True` or `False` forces either (exact is refused above EXACT_PERMUTATION_LIMIT pairs).
    Effect size: Cohen's d_z = mean(d) / sd(d) (None when sd(d) is 0 or n < 2).
    """
    a, b = _paired(a, b)
    _check_count(n_perm, "n_perm")
    stat = statistic or _mean_last
    d = a - b  # [n]
    n = d.size
    observed = float(stat(d[None, :])[0])
    if exact is None:
        exact = n <= EXACT_PERMUTATION_MAX or (n <= 62 and 2 ** n <= n_perm)
    if exact and n > EXACT_PERMUTATION_LIMIT:
        raise StepscopeError(f"an exact sign-flip test over {n} pairs needs 2^{n} sign patterns; use exact=False")
    if exact:
        count = 0
        for start, m in _offsets(_chunks(2 ** n, n)):
            codes = np.arange(start, start + m, dtype=np.int64)[:, None]  # [m, 1] pattern numbers
            signs = 1.0 - 2.0 * ((codes >> np.arange(n, dtype=np.int64)[None, :]) & 1)  # [m, n] of +-1
            count += _p_from_null(stat(signs * d[None, :]), observed, alternative)
        p = count / 2 ** n
    else:
        rng = np.random.default_rng(seed)
        count = 0
        for m in _chunks(n_perm, n):
            signs = rng.choice(np.array([-1.0, 1.0]), size=(m, n))  # [m, n]
            count += _p_from_null(stat(signs * d[None, :]), observed, alternative)
        p = (count + 1) / (n_perm + 1)
    sd = float(d.std(ddof=1)) if n >= 2 else 0.0
    dz = float(d.mean() / sd) if sd > 0 else None
    return TestResult("paired sign-flip permutation", observed, float(min(1.0, p)), dz, "cohen_dz", n, n,
                      {"exact": exact, "n_perm": 2 ** n if exact else n_perm, "alternative": alternative})


def permutation_test(a: ArrayLike, b: ArrayLike, *, statistic: TwoSample | None = None, n_perm: int = 10_000,
                     alternative: str = "two-sided", seed: int | None = 0) -> TestResult:
    """Two-sample permutation test (null: group labels are exchangeable), statistic default mean(a) - mean(b).

    Exact (every split of the pooled values) when C(n_a + n_b, n_a) <= n_perm, else `n_perm` random
    relabellings with p = (1 + #as extreme) / (1 + n_perm). Effect size: Hedges' g.
    """
    a, b = _vector(a, "a"), _vector(b, "b")
    _check_count(n_perm, "n_perm")
    if a.size == 0 or b.size == 0:
        raise StepscopeError("permutation_test needs at least one value in each group")
    stat = statistic or _mean_diff
    pooled = np.concatenate([a, b])
    na, n = a.size, a.size + b.size
    observed = float(stat(a[None, :], b[None, :])[0])
    exact = math.comb(n, na) <= n_perm
    if exact:
        in_a = np.zeros((math.comb(n, na), n), dtype=bool)
        for r, combo in enumerate(itertools.combinations(range(n), na)):
            in_a[r, list(combo)] = True
        order = np.argsort(~in_a, axis=1, kind="stable")  # group a's positions first, each in index order
        perm = pooled[order]
        count = _p_from_null(stat(perm[:, :na], perm[:, na:]), observed, alternative)
        p = count / in_a.shape[0]
    else:
        rng = np.random.default_rng(seed)
        count = 0
        for m in _chunks(n_perm, n):
            perm = pooled[np.argsort(rng.random((m, n)), axis=1)]  # [m, n] random relabellings
            count += _p_from_null(stat(perm[:, :na], perm[:, na:]), observed, alternative)
        p = (count + 1) / (n_perm + 1)
    return TestResult("permutation", observed, float(min(1.0, p)), hedges_g(a, b), "hedges_g", a.size, b.size,
                      {"exact": exact, "n_perm": int(math.comb(n, na)) if exact else n_perm,
                       "alternative": alternative})


def hedges_g(a: ArrayLike, b: ArrayLike) -> float | None:
    """Hedges' g = J * (mean(a) - mean(b)) / pooled sd, J = 1 - 3 / (4 (n_a + n_b) - 9); None if undefined."""
    a, b = _vector(a, "a"), _vector(b, "b")
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return None
    pooled_var = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    if pooled_var <= 0:
        return None
    j = 1.0 - 3.0 / (4.0 * (na + nb) - 9.0)
    return float(j * (a.mean() - b.mean()) / math.sqrt(pooled_var))


def cliffs_delta(a: ArrayLike, b: ArrayLike) -> float | None:
    """Cliff's delta = P(a > b) - P(a < b) over all pairs (equals the rank-biserial correlation of U)."""
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.size == 0 or b.size == 0:
        return None
    return float(np.sign(a[:, None] - b[None, :]).mean())


def welch_test(a: ArrayLike, b: ArrayLike, *, alternative: str = "two-sided") -> TestResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b); effect size Hedges' g.

    None statistic/p-value when a group has fewer than 2 values or both groups are constant.
    """
    from scipy import stats as sps

    a, b = _vector(a, "a"), _vector(b, "b")
    if alternative not in ("two-sided", "greater", "less"):
        raise StepscopeError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    na, nb = a.size, b.size
    g = hedges_g(a, b)
    se2 = (a.var(ddof=1) / na + b.var(ddof=1) / nb) if na >= 2 and nb >= 2 else 0.0
    if na < 2 or nb < 2 or se2 <= 0:
        return TestResult("welch t", None, None, g, "hedges_g", na, nb, {"df": None, "alternative": alternative})
    res = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    df = se2 ** 2 / ((a.var(ddof=1) / na) ** 2 / (na - 1) + (b.var(ddof=1) / nb) ** 2 / (nb - 1))
    return TestResult("welch t", float(res.statistic), float(res.pvalue), g, "hedges_g", na, nb,
                      {"df": float(df), "alternative": alternative})


def mann_whitney_test(a: ArrayLike, b: ArrayLike, *, alternative: str = "two-sided") -> TestResult:
    """Mann-Whitney U test (U counts pairs with a > b, ties 1/2); effect size rank-biserial r = 2U/(n_a n_b) - 1.

    scipy chooses the exact distribution for small samples without ties, else the normal approximation
    with tie and continuity corrections. None p-value when every value is identical.
    """
    from scipy import stats as sps

    a, b = _vector(a, "a"), _vector(b, "b")
    if alternative not in ("two-sided", "greater", "less"):
        raise StepscopeError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    na, nb = a.size, b.size
    if na == 0 or nb == 0:
        return TestResult("mann-whitney U", None, None, None, "rank_biserial", na, nb, {"alternative": alternative})
    r = cliffs_delta(a, b)
    if np.ptp(np.concatenate([a, b])) == 0:
        return TestResult("mann-whitney U", float(na * nb / 2), None, r, "rank_biserial", na, nb,
                          {"alternative": alternative})
    res = sps.mannwhitneyu(a, b, alternative=alternative, method="auto")
    return TestResult("mann-whitney U", float(res.statistic), float(res.pvalue), r, "rank_biserial", na, nb,
                      {"alternative": alternative})


def mean_se(x: ArrayLike) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); SE is nan for fewer than 2 values
    (nan, nan for none)."""
    x = np.asarray(x, dtype=np.float64)  # [n]
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def paired_comparison(a: ArrayLike, b: ArrayLike, *, level: float = 0.95, n_boot: int = 10_000,
                      n_perm: int = 10_000, seed: int | None = 0) -> dict:
    """a - b over pairs, as JSON: the mean difference `diff`, its paired percentile bootstrap interval
    (`ci_low`, `ci_high`; the point itself for one pair, where every resample is that pair), the two-sided
    sign-flip permutation `p_value`, `n` pairs, and how many pairs have a > b (`wins`) and a < b (`losses`)."""
    a, b = _paired(a, b)
    ci = paired_bootstrap_ci(a, b, level=level, n_boot=n_boot, seed=seed)
    test = paired_permutation_test(a, b, n_perm=n_perm, seed=seed)
    low, high = (ci.estimate, ci.estimate) if ci.low is None else (ci.low, ci.high)
    return {"diff": ci.estimate, "ci_low": low, "ci_high": high, "level": level, "p_value": test.p_value,
            "n": int(a.size), "wins": int(np.sum(a > b)), "losses": int(np.sum(a < b))}


def ols_slope(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on x along the last axis ([..., n] each -> [...]); nan where x is constant.
    Vectorized as a `TwoSample` statistic: `paired_bootstrap_ci(y, x, statistic=ols_slope)` resamples pairs."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    sxx = (xc * xc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sxx > 0, (xc * yc).sum(axis=-1) / np.where(sxx > 0, sxx, 1.0), np.nan)


def average_ranks(v: ArrayLike) -> np.ndarray:
    """1-based ranks of the values of v, ties sharing their average rank (scipy's rankdata "average")."""
    _, inverse, counts = np.unique(_vector(v, "v"), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def _standardized(v: np.ndarray) -> np.ndarray | None:
    """v centred and scaled to unit norm (None when v is constant)."""
    c = v - v.mean()
    norm = float(np.sqrt((c * c).sum()))
    return c / norm if norm > 0 else None


# Every ordering of y is enumerated (an exact p-value) when n! is at most n_perm and n is at most this.
EXACT_CORRELATION_MAX = 8


def correlation_permutation_test(x: ArrayLike, y: ArrayLike, *, method: str = "spearman", n_perm: int = 10_000,
                                 alternative: str = "two-sided", seed: int | None = 0) -> TestResult:
    """Permutation test of the association of paired values (x[i], y[i]); null: y is exchangeable given x.

    Statistic: the Pearson correlation of the ranks (`method="spearman"`, ties get their average rank) or of the
    values (`"pearson"`); y is permuted over the pairs. Exact (every one of the n! orderings) when n! <= n_perm
    and n <= EXACT_CORRELATION_MAX, else `n_perm` random permutations with p = (1 + #as extreme) / (1 + n_perm).
    Effect size: the correlation itself. None statistic and p-value when x or y is constant (no correlation).
    """
    x, y = _paired(x, y)
    _check_count(n_perm, "n_perm")
    if method not in ("spearman", "pearson"):
        raise StepscopeError(f"method must be 'spearman' or 'pearson', got {method!r}")
    n = x.size
    name = f"{method} correlation permutation"
    sx = _standardized(average_ranks(x) if method == "spearman" else x)  # [n]
    sy = _standardized(average_ranks(y) if method == "spearman" else y)  # [n]
    if sx is None or sy is None:
        return TestResult(name, None, None, None, method, n, n, {"alternative": alternative})
    observed = float(sx @ sy)
    exact = n <= EXACT_CORRELATION_MAX and math.factorial(n) <= n_perm
    if exact:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)  # [n!, n]
        count = _p_from_null(sy[perms] @ sx, observed, alternative)
        p = count / perms.shape[0]
    else:
        rng = np.random.default_rng(seed)
        count = 0
        for m in _chunks(n_perm, n):
            perms = np.argsort(rng.random((m, n)), axis=1)  # [m, n] random orderings
            count += _p_from_null(sy[perms] @ sx, observed, alternative)
        p = (count + 1) / (n_perm + 1)
    return TestResult(name, observed, float(min(1.0, p)), observed, method, n, n,
                      {"exact": exact, "n_perm": math.factorial(n) if exact else n_perm,
                       "alternative": alternative})


def _adjust(pvalues: Sequence[float | None], kind: str) -> list[float | None]:
    idx = [i for i, p in enumerate(pvalues) if p is not None and np.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    if m == 0:
        return out
    p = np.array([float(pvalues[i]) for i in idx])
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    if kind == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ranked))
    else:  # Benjamini-Hochberg
        adj = np.minimum.accumulate(np.minimum(1.0, ranked * m / np.arange(1, m + 1))[::-1])[::-1]
    for k, o in enumerate(order):
        out[idx[o]] = float(adj[k])
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (family-wise error control); None entries stay None, not counted."""
    return _adjust(pvalues, "holm")


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg q-values (false discovery rate control); None entries stay None, not counted."""
    return _adjust(pvalues, "bh")
