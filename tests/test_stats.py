"""stepscope.stats against slow, obviously-correct references (explicit loops, full enumeration).

Sign convention under test: differences are a - b (treatment - control).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from stepscope import stats
from stepscope.errors import StepscopeError

# ---------------------------------------------------------------- slow references


def ref_mean(xs):
    return sum(xs) / len(xs)


def ref_var(xs):
    m = ref_mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def ref_exact_bootstrap_quantiles(x, qs):
    """Quantiles of the exact bootstrap distribution of the mean: all n**n equally likely resamples, with
    numpy's default ("linear") quantile definition on the full, exact distribution."""
    n = len(x)
    means = sorted(sum(x[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))

    def q(a):
        pos = a * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (pos - lo)

    return [q(a) for a in qs]


def ref_welch(a, b):
    va, vb, na, nb = ref_var(a), ref_var(b), len(a), len(b)
    se2 = va / na + vb / nb
    t = (ref_mean(a) - ref_mean(b)) / math.sqrt(se2)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    p = 2 * (1 - special.stdtr(df, abs(t)))
    return t, df, p


def ref_hedges(a, b):
    na, nb = len(a), len(b)
    sp = math.sqrt(((na - 1) * ref_var(a) + (nb - 1) * ref_var(b)) / (na + nb - 2))
    return (1 - 3 / (4 * (na + nb) - 9)) * (ref_mean(a) - ref_mean(b)) / sp


def ref_u(a, b):
    u = 0.0
    for x in a:
        for y in b:
            u += 1.0 if x > y else (0.5 if x == y else 0.0)
    return u


def ref_mw_exact_p(a, b):
    """Two-sided exact p of U: enumerate every way to assign the pooled ranks (no ties) to group a."""
    pooled = list(a) + list(b)
    na, nb = len(a), len(b)
    u_obs = ref_u(a, b)
    center = na * nb / 2
    hits = total = 0
    for combo in itertools.combinations(range(na + nb), na):
        ga = [pooled[i] for i in combo]
        gb = [pooled[i] for i in range(na + nb) if i not in combo]
        total += 1
        hits += abs(ref_u(ga, gb) - center) >= abs(u_obs - center) - 1e-12
    return hits / total


def ref_sign_flip_p(d):
    """Two-sided p of the mean of `d` over all 2**n sign patterns."""
    obs = abs(sum(d) / len(d))
    hits = total = 0
    for signs in itertools.product([1, -1], repeat=len(d)):
        total += 1
        hits += abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= obs - 1e-12
    return hits / total


def ref_label_perm_p(a, b):
    pooled = list(a) + list(b)
    na = len(a)
    obs = abs(ref_mean(a) - ref_mean(b))
    hits = total = 0
    for combo in itertools.combinations(range(len(pooled)), na):
        ga = [pooled[i] for i in combo]
        gb = [pooled[i] for i in range(len(pooled)) if i not in combo]
        total += 1
        hits += abs(ref_mean(ga) - ref_mean(gb)) >= obs - 1e-12
    return hits / total


def ref_holm(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def ref_bh(p):
    m = len(p)
    out = []
    for i in range(m):
        # q_i = min over j with p_j >= p_i of m * p_j / rank_j
        best = 1.0
        ranks = sorted(range(m), key=lambda k: p[k])
        for r, j in enumerate(ranks, start=1):
            if p[j] >= p[i]:
                best = min(best, m * p[j] / r)
        out.append(best)
    return out


# ---------------------------------------------------------------- tests


def test_bootstrap_ci_matches_exact_bootstrap_distribution():
    x = [0.3, 1.1, 2.0, 4.5, 7.25]
    lo_ref, hi_ref = ref_exact_bootstrap_quantiles(x, [0.025, 0.975])
    ci = stats.bootstrap_ci(x, n_boot=200_000, seed=1)
    assert ci.estimate == pytest.approx(ref_mean(x), rel=1e-12)
    # Monte Carlo quantiles of 200k draws sit within a few hundredths of the exact ones (range of x is ~7)
    assert ci.low == pytest.approx(lo_ref, abs=0.05)
    assert ci.high == pytest.approx(hi_ref, abs=0.05)
    assert ci.n == 5 and ci.n_boot == 200_000


def test_bootstrap_ci_coverage_is_near_nominal():
    rng = np.random.default_rng(0)
    covered = 0
    reps = 300
    for r in range(reps):
        x = rng.normal(2.0, 1.0, size=40)
        ci = stats.bootstrap_ci(x, n_boot=1000, seed=r)
        covered += ci.low <= 2.0 <= ci.high
    # percentile bootstrap of a mean at n=40: ~94%; 300 reps give a binomial sd of ~1.4 points
    assert 0.88 <= covered / reps <= 0.99


def test_bootstrap_is_reproducible_and_chunking_invariant(monkeypatch):
    x = np.arange(30.0) ** 1.5
    a = stats.bootstrap_ci(x, n_boot=5000, seed=7)
    assert a == stats.bootstrap_ci(x, n_boot=5000, seed=7)
    assert a != stats.bootstrap_ci(x, n_boot=5000, seed=8)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 90)  # 3 resamples per batch
    assert stats.bootstrap_ci(x, n_boot=5000, seed=7) == a


def test_bootstrap_custom_statistic_and_degenerate_inputs():
    x = [1.0, 2.0, 3.0, 10.0]
    ci = stats.bootstrap_ci(x, statistic=lambda s: np.median(s, axis=-1), n_boot=2000)
    assert ci.estimate == 2.5 and 1.0 <= ci.low <= ci.high <= 10.0
    one = stats.bootstrap_ci([3.0])
    assert one.estimate == 3.0 and one.low is None and one.high is None
    with pytest.raises(StepscopeError):
        stats.bootstrap_ci([])
    with pytest.raises(StepscopeError):
        stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(StepscopeError):
        stats.bootstrap_ci([1.0, 2.0], level=1.5)


def test_bootstrap_diff_ci_contains_true_difference_and_is_ordered():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 2.0, 150)
    ci = stats.bootstrap_diff_ci(a, b, n_boot=4000)
    assert ci.estimate == pytest.approx(a.mean() - b.mean())
    assert ci.low < ci.estimate < ci.high
    assert ci.low < 1.0 < ci.high
    # the width matches the normal-theory standard error within 15%
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert (ci.high - ci.low) / (2 * 1.96 * se) == pytest.approx(1.0, rel=0.15)


def test_paired_bootstrap_keeps_pairs():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 10, 60)  # a large shared per-pair effect
    a, b = base + 0.5 + rng.normal(0, 0.1, 60), base
    paired = stats.paired_bootstrap_ci(a, b, n_boot=4000)
    unpaired = stats.bootstrap_diff_ci(a, b, n_boot=4000)
    assert paired.estimate == pytest.approx(0.5, abs=0.05)
    assert paired.low > 0.4 and paired.high < 0.6  # pairing removes the shared variance
    assert unpaired.low < 0 < unpaired.high  # ignoring it cannot see the effect
    with pytest.raises(StepscopeError):
        stats.paired_bootstrap_ci([1.0, 2.0], [1.0])
    # a constant paired improvement over very different problems: every resample sees exactly it
    base = rng.uniform(0, 1, 40)
    ci = stats.paired_bootstrap_ci(base + 0.05, base, n_boot=2000)
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((0.05, 0.05, 0.05), abs=1e-12)
    with pytest.raises(StepscopeError):
        stats.paired_bootstrap_ci([1, 2], [1, 2, 3])


def test_paired_bootstrap_matches_exact_enumeration():
    a = np.array([0.3, 0.2, 0.7, 0.95, 0.8])  # treatment
    b = np.array([0.2, 0.5, 0.0, 0.9, 0.4])  # control
    d = (a - b).tolist()
    lo_ref, hi_ref = ref_exact_bootstrap_quantiles(d, [0.05, 0.95])
    ci = stats.paired_bootstrap_ci(a, b, level=0.9, n_boot=200_000, seed=1)
    assert ci.estimate == pytest.approx(np.mean(d)) and ci.level == 0.9 and ci.n == 5
    # Monte Carlo against the exact 5^5 enumeration; the distribution's atoms are ~0.01 apart
    assert ci.low == pytest.approx(lo_ref, abs=0.015)
    assert ci.high == pytest.approx(hi_ref, abs=0.015)
    swapped = stats.paired_bootstrap_ci(b, a, level=0.9, n_boot=200_000, seed=1)  # control - treatment
    assert swapped.estimate == pytest.approx(-ci.estimate)
    assert (swapped.low, swapped.high) == pytest.approx((-ci.high, -ci.low), abs=1e-12)


def test_paired_bootstrap_custom_statistic_resamples_pairs():
    a, b = [1.0, 2.0, 3.0, 10.0], [0.5, 2.5, 2.0, 4.0]
    med = stats.paired_bootstrap_ci(a, b, statistic=lambda x, y: np.median(x - y, axis=-1), n_boot=3000)
    assert med.estimate == pytest.approx(np.median(np.subtract(a, b)))
    assert min(np.subtract(a, b)) <= med.low <= med.high <= max(np.subtract(a, b))
    one = stats.paired_bootstrap_ci([3.0], [1.0])
    assert one.estimate == 2.0 and one.low is None and one.high is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False).map(lambda v: round(v, 2)), min_size=1, max_size=9))
def test_paired_permutation_exact_matches_enumeration(d):
    b = [0.0] * len(d)
    res = stats.paired_permutation_test(d, b, n_perm=10_000)
    assert res.extra["exact"]
    assert res.p_value == pytest.approx(ref_sign_flip_p(d), abs=1e-12)
    assert res.statistic == pytest.approx(ref_mean(d))


def test_paired_permutation_monte_carlo_is_close_to_exact():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.3, 1, 16), rng.normal(0, 1, 16)
    exact = stats.paired_permutation_test(a, b, n_perm=2 ** 16)
    mc = stats.paired_permutation_test(a, b, n_perm=20_000, seed=2, exact=False)
    assert exact.extra["exact"] and not mc.extra["exact"]
    assert mc.p_value == pytest.approx(exact.p_value, abs=0.015)
    one_sided = stats.paired_permutation_test(a, b, n_perm=2 ** 16, alternative="greater")
    if exact.statistic > 0:
        assert one_sided.p_value <= exact.p_value
    with pytest.raises(StepscopeError):
        stats.paired_permutation_test(a, b, alternative="bigger")


def test_paired_permutation_exact_rule():
    """Exact when n <= 16 or 2**n <= n_perm; forced either way by `exact`; refused above 24 pairs."""
    rng = np.random.default_rng(8)
    for n, n_perm, want in [(16, 10, True), (17, 10_000, False), (17, 2 ** 17, True), (13, 50, True)]:
        d = rng.normal(0.2, 1, n)
        res = stats.paired_permutation_test(d, np.zeros(n), n_perm=n_perm)
        assert res.extra["exact"] is want and res.extra["n_perm"] == (2 ** n if want else n_perm), (n, n_perm)
        if want and n <= 13:
            assert res.p_value == pytest.approx(ref_sign_flip_p(d.tolist()), abs=1e-12)
    d = rng.normal(0.2, 1, 18)
    forced = stats.paired_permutation_test(d, np.zeros(18), exact=True)
    assert forced.extra["exact"] and forced.extra["n_perm"] == 2 ** 18
    assert stats.paired_permutation_test(d, np.zeros(18), n_perm=100_000, seed=3).p_value == pytest.approx(
        forced.p_value, abs=0.01)
    with pytest.raises(StepscopeError, match="exact=False"):
        stats.paired_permutation_test(np.ones(25), np.zeros(25), exact=True)


def test_paired_permutation_exact_equals_brute_force_and_monte_carlo_is_close():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.integers(0, 5, 9) / 4
        b = rng.integers(0, 5, 9) / 4
        ref = ref_sign_flip_p((a - b).tolist())
        assert stats.paired_permutation_test(a, b).p_value == pytest.approx(ref, abs=1e-12)
        mc = stats.paired_permutation_test(a, b, exact=False, n_perm=100_000, seed=5)
        assert mc.p_value == pytest.approx(ref, abs=0.01)


def test_paired_permutation_edge_cases():
    assert stats.paired_permutation_test([0.5, 0.5, 0.1], [0.5, 0.5, 0.1]).p_value == 1.0
    # all 5 differences negative: only the all-plus and all-minus sign vectors are as extreme
    res = stats.paired_permutation_test(np.zeros(5), np.ones(5))
    assert res.p_value == pytest.approx(2 / 32) and res.statistic == -1.0
    # Monte Carlo p never reaches 0
    p = stats.paired_permutation_test(np.zeros(40), np.ones(40), n_perm=500).p_value
    assert p == pytest.approx(1 / 501)


def test_permutation_test_exact_matches_enumeration():
    a, b = [1.2, 3.4, 2.2, 5.0], [0.1, 0.5, 2.9, 1.0, 0.3]
    res = stats.permutation_test(a, b, n_perm=10_000)
    assert res.extra["exact"] and res.extra["n_perm"] == math.comb(9, 4)
    assert res.p_value == pytest.approx(ref_label_perm_p(a, b), abs=1e-12)
    mc = stats.permutation_test(a, b, n_perm=50, seed=1)
    assert not mc.extra["exact"] and 0 < mc.p_value <= 1


def test_welch_matches_hand_formula():
    a = [2.1, 3.3, 1.9, 4.4, 2.8, 3.0]
    b = [1.0, 0.7, 1.9, 1.2]
    t, df, p = ref_welch(a, b)
    res = stats.welch_test(a, b)
    assert res.statistic == pytest.approx(t, rel=1e-10)
    assert res.extra["df"] == pytest.approx(df, rel=1e-10)
    assert res.p_value == pytest.approx(p, rel=1e-8)
    assert res.effect_size == pytest.approx(ref_hedges(a, b), rel=1e-10)
    assert stats.welch_test(b, a).statistic == pytest.approx(-t, rel=1e-10)


def test_welch_undefined_cases_are_none():
    assert stats.welch_test([1.0], [2.0, 3.0]).p_value is None
    res = stats.welch_test([1.0, 1.0], [1.0, 1.0])
    assert res.p_value is None and res.statistic is None and res.effect_size is None


def test_mann_whitney_matches_enumeration():
    a = [0.31, 1.7, 2.2, 0.05, 3.9]
    b = [0.2, 0.4, 0.02, 1.1]
    res = stats.mann_whitney_test(a, b)
    assert res.statistic == pytest.approx(ref_u(a, b))
    assert res.p_value == pytest.approx(ref_mw_exact_p(a, b), rel=1e-9)
    assert res.effect_size == pytest.approx(2 * ref_u(a, b) / (len(a) * len(b)) - 1)
    assert stats.cliffs_delta(a, b) == pytest.approx(res.effect_size)
    same = stats.mann_whitney_test([1.0, 1.0], [1.0, 1.0, 1.0])
    assert same.p_value is None and same.effect_size == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 1, allow_nan=False)), min_size=0, max_size=12))
def test_holm_and_bh_match_loops(p):
    present = [x for x in p if x is not None]
    h, q = stats.holm(p), stats.benjamini_hochberg(p)
    rh, rq = ref_holm(present), ref_bh(present)
    assert [x is None for x in h] == [x is None for x in p]
    assert [x for x in h if x is not None] == pytest.approx(rh, abs=1e-12)
    assert [x for x in q if x is not None] == pytest.approx(rq, abs=1e-12)
    for raw, adj_h, adj_q in zip(present, rh, rq):
        assert raw - 1e-15 <= adj_q <= adj_h + 1e-15 or adj_h == 1.0


def test_effect_sizes_signs_and_none():
    assert stats.hedges_g([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) > 0
    assert stats.hedges_g([1.0], [0.0, 1.0]) is None
    assert stats.cliffs_delta([5.0, 6.0], [1.0, 2.0]) == 1.0
    assert stats.cliffs_delta([], [1.0]) is None


# ---------------------------------------------------------------- correlation permutation test, ranks, slope


def ref_average_ranks(xs):
    """1-based ranks, ties averaged, by counting (no sorting)."""
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def ref_pearson(xs, ys):
    mx, my = ref_mean(xs), ref_mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def test_average_ranks_and_ols_slope_match_references():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, size=9).astype(float)  # many ties
        assert stats.average_ranks(x).tolist() == pytest.approx(ref_average_ranks(x.tolist()))
        y = rng.normal(size=9)
        assert float(stats.ols_slope(y[None, :], x[None, :])[0]) == pytest.approx(
            np.polyfit(x, y, 1)[0] if np.ptp(x) else np.nan, nan_ok=True)
    assert np.isnan(stats.ols_slope(np.ones((1, 3)), np.ones((1, 3)))[0])  # no spread in x: no slope


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_correlation_permutation_test_is_exact_by_enumeration(method):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 4, size=6).astype(float)
    y = x + rng.normal(scale=1.0, size=6)
    rx, ry = (ref_average_ranks(x.tolist()), ref_average_ranks(y.tolist())) if method == "spearman" else (x, y)
    rho = ref_pearson(list(rx), list(ry))
    null = [ref_pearson(list(rx), [ry[i] for i in perm]) for perm in itertools.permutations(range(6))]
    res = stats.correlation_permutation_test(x, y, method=method)
    assert res.statistic == pytest.approx(rho) and res.effect_size == pytest.approx(rho)
    assert res.extra["exact"] and res.extra["n_perm"] == 720
    assert res.p_value == pytest.approx(np.mean([abs(r) >= abs(rho) - 1e-12 for r in null]))
    greater = stats.correlation_permutation_test(x, y, method=method, alternative="greater")
    assert greater.p_value == pytest.approx(np.mean([r >= rho - 1e-12 for r in null]))


def test_correlation_permutation_test_random_draws_and_undefined_cases():
    rng = np.random.default_rng(11)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    res = stats.correlation_permutation_test(x, y, n_perm=2000, seed=1)
    assert not res.extra["exact"] and res.p_value >= 1 / 2001 and res.p_value < 0.05
    assert res == stats.correlation_permutation_test(x, y, n_perm=2000, seed=1)  # reproducible from the seed
    # no association: the p-value is not small, and it is about uniform over independent data sets
    ps = [stats.correlation_permutation_test(rng.normal(size=30), rng.normal(size=30), n_perm=400, seed=k).p_value
          for k in range(200)]
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.10
    const = stats.correlation_permutation_test(np.ones(5), np.arange(5.0))
    assert const.statistic is None and const.p_value is None
    with pytest.raises(StepscopeError):
        stats.correlation_permutation_test([1.0, 2.0], [1.0, 2.0], method="kendall")


def test_paired_comparison_is_the_bootstrap_and_the_sign_flip_test():
    a, b = [0.5, 1.0, 0.25, 0.75, 1.0], [0.25, 1.0, 0.5, 0.25, 0.5]
    c = stats.paired_comparison(a, b, n_boot=500, seed=2)
    ci = stats.paired_bootstrap_ci(a, b, n_boot=500, seed=2)
    assert (c["diff"], c["ci_low"], c["ci_high"]) == (ci.estimate, ci.low, ci.high)
    assert c["p_value"] == stats.paired_permutation_test(a, b).p_value
    assert (c["n"], c["wins"], c["losses"]) == (5, 3, 1)
    one = stats.paired_comparison([1.0], [0.0])
    assert one["ci_low"] == one["ci_high"] == one["diff"] == 1.0
