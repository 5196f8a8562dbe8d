"""pass@k, mean ± SE and the paired statistics, each against a slow obviously-correct reference."""

import itertools
import math
import statistics

import numpy as np
import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluate.stats import (
    mean_se,
    paired_bootstrap_ci,
    paired_permutation_test,
    pass_at_k,
    pass_at_k_values,
    per_problem_means,
    per_problem_pass_at_k,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of the n samples that hold at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_accuracy_and_large_n_is_stable():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16, abs=1e-15)
    # comb(1000, 500) overflows float; the product form must not
    assert pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500), rel=1e-9)
    with pytest.raises(StepscopeError):
        pass_at_k(4, 5, 1)
    with pytest.raises(StepscopeError):
        pass_at_k(4, 2, 5)


def test_pass_at_k_values_are_powers_of_two():
    assert pass_at_k_values(1) == [1]
    assert pass_at_k_values(8) == [1, 2, 4, 8]
    assert pass_at_k_values(12) == [1, 2, 4, 8]
    assert pass_at_k_values(16) == [1, 2, 4, 8, 16]


def test_per_problem_average_first_then_mean_se():
    correct = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]
    acc = per_problem_means(correct)
    assert acc.tolist() == [0.5, 1.0, 0.25]
    m, se = mean_se(acc)
    assert m == pytest.approx(statistics.mean([0.5, 1.0, 0.25]))
    assert se == pytest.approx(statistics.stdev([0.5, 1.0, 0.25]) / math.sqrt(3))
    # problems with unequal sample counts weigh the same
    assert per_problem_means([[1], [0, 0, 0, 0]]).mean() == 0.5
    p2 = per_problem_pass_at_k(correct, 2)
    assert p2.tolist() == pytest.approx([brute_pass_at_k(4, 2, 2), 1.0, brute_pass_at_k(4, 1, 2)])
    assert math.isnan(mean_se([0.3])[1])


def exact_bootstrap_quantiles(d, level):
    """All P^P equally likely resamples enumerated; the percentile interval of their means."""
    p = len(d)
    means = [sum(d[i] for i in idx) / p for idx in itertools.product(range(p), repeat=p)]
    means.sort()

    def q(a):  # the same definition as numpy's default ("linear") on the full, exact distribution
        pos = a * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (pos - lo)

    alpha = (1 - level) / 2
    return q(alpha), q(1 - alpha)


def test_paired_bootstrap_matches_exact_enumeration():
    a = np.array([0.2, 0.5, 0.0, 0.9, 0.4])
    b = np.array([0.3, 0.2, 0.7, 0.95, 0.8])
    d = (b - a).tolist()
    lo_ref, hi_ref = exact_bootstrap_quantiles(d, 0.9)
    mean, lo, hi = paired_bootstrap_ci(a, b, level=0.9, n_boot=200_000, seed=1)
    assert mean == pytest.approx(np.mean(d))
    # Monte Carlo against the exact 5^5 enumeration; the distribution's atoms are ~0.01 apart
    assert lo == pytest.approx(lo_ref, abs=0.015)
    assert hi == pytest.approx(hi_ref, abs=0.015)


def test_paired_bootstrap_keeps_pairs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 40)
    a, b = base, base + 0.05  # a constant paired improvement over very different problems
    mean, lo, hi = paired_bootstrap_ci(a, b, n_boot=2000)
    assert (mean, lo, hi) == pytest.approx((0.05, 0.05, 0.05), abs=1e-12)
    with pytest.raises(StepscopeError):
        paired_bootstrap_ci([1, 2], [1, 2, 3])


def brute_sign_flip_p(d):
    obs = abs(sum(d) / len(d))
    hits = 0
    total = 0
    for signs in itertools.product([-1, 1], repeat=len(d)):
        total += 1
        hits += abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= obs - 1e-12
    return hits / total


def test_permutation_exact_equals_brute_force_and_monte_carlo_is_close():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.integers(0, 5, 9) / 4
        b = rng.integers(0, 5, 9) / 4
        ref = brute_sign_flip_p((b - a).tolist())
        assert paired_permutation_test(a, b) == pytest.approx(ref, abs=1e-12)
        mc = paired_permutation_test(a, b, exact=False, n_perm=100_000, seed=5)
        assert mc == pytest.approx(ref, abs=0.01)


def test_permutation_edge_cases():
    assert paired_permutation_test([0.5, 0.5, 0.1], [0.5, 0.5, 0.1]) == 1.0
    # all 5 differences positive: only the all-plus and all-minus sign vectors are as extreme
    assert paired_permutation_test(np.zeros(5), np.ones(5)) == pytest.approx(2 / 32)
    # Monte Carlo p never reaches 0
    p = paired_permutation_test(np.zeros(40), np.ones(40), n_perm=500)
    assert p == pytest.approx(1 / 501)
