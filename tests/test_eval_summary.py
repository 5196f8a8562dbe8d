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


def test_summary_breaks_accuracy_down_by_a_record_field():
    from stepscope.evaluate.summary import markdown, summarize

    info = {"model": "m", "benchmark": "lcb", "n_samples": 2, "n_problems": 4,
            "arms": {"baseline": None, "stepflow": {}}, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 9}
    level = {"a": "easy", "b": "easy", "c": "hard", "d": "hard"}
    outcome = {("a", "baseline"): [1, 1], ("a", "stepflow"): [1, 1], ("b", "baseline"): [0, 1],
               ("b", "stepflow"): [1, 1], ("c", "baseline"): [0, 0], ("c", "stepflow"): [0, 1],
               ("d", "baseline"): [0, 0], ("d", "stepflow"): [0, 0]}
    recs = [{"problem_id": p, "sample": s, "arm": arm, "correct": bool(ok), "difficulty": level[p]}
            for (p, arm), oks in outcome.items() for s, ok in enumerate(oks)]
    recs.append({"problem_id": "e", "sample": 0, "arm": "baseline", "correct": True, "difficulty": "medium"})
    plain = summarize(recs, info, by=())
    assert "by" not in plain
    s = summarize(recs, info, by=["difficulty"])
    assert {k: v for k, v in s.items() if k != "by"} == plain
    assert summarize(recs, info) == s  # by default, the known fields that the records carry
    assert "by" not in summarize([{k: v for k, v in r.items() if k != "difficulty"} for r in recs], info)
    by = s["by"]["difficulty"]
    assert set(by) == {"easy", "hard"}  # problem e is not complete: it is in no group
    for value, probs in [("easy", "ab"), ("hard", "cd")]:
        assert by[value]["n_problems"] == 2
        for arm in ("baseline", "stepflow"):
            acc = [statistics.mean(outcome[(p, arm)]) for p in probs]
            got = by[value]["arms"][arm]
            assert got["accuracy"] == pytest.approx(statistics.mean(acc))
            assert got["se"] == pytest.approx(statistics.stdev(acc) / math.sqrt(2))
    md = markdown(s)
    assert "| difficulty | problems | baseline | StepFlow |" in md and "| easy | 2 | 75.0 ± 25.0 | 100.0 ± 0.0 |" in md
