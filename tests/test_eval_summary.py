"""The evaluation summary's bookkeeping: pass@k and mean ± SE over problems, against slow obviously-correct
references (the paired statistics it reports are tested in test_stats.py)."""

import itertools
import math
import statistics

import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluate.summary import (
    mean_se,
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
