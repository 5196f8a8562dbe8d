"""stepscope.diagnose.compare: group statistics per metric and layer, pairing by problem, adjustment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_diagnose import KINDS, structured_maps

import stepscope.diagnose as dg
from stepscope import stats
from stepscope.errors import StepscopeError

L = 8


def _group(lock, seeds, problems):
    out = []
    for s, prob in zip(seeds, problems):
        d = dg.diagnose_maps(structured_maps(L, KINDS, lock=lock, seed=s, noise=0.3), KINDS,
                             meta={"id": f"t{s}", "problem": prob})
        out.append(d)
    return out


@pytest.fixture(scope="module")
def groups():
    problems = [f"problem number {i}" for i in range(8)]
    correct = _group(0.0, range(8), problems)
    wrong = _group(0.5, range(100, 106), problems[:5] + ["a problem only the wrong group has"])
    return correct, wrong


@pytest.fixture(scope="module")
def comparison(groups):
    return dg.compare(*groups, n_boot=2000, n_perm=2000, seed=0)


def test_group_means_and_tests_match_direct_computation(groups, comparison):
    correct, wrong = groups
    layer = 0
    row = comparison.metrics["locality"][layer]
    c = [d.metrics["locality"][layer] for d in correct]
    w = [d.metrics["locality"][layer] for d in wrong]
    assert row["correct"]["estimate"] == pytest.approx(np.mean(c))
    assert row["wrong"]["estimate"] == pytest.approx(np.mean(w))
    assert row["correct"]["low"] < row["correct"]["estimate"] < row["correct"]["high"]
    assert row["difference"]["estimate"] == pytest.approx(np.mean(w) - np.mean(c))
    assert row["welch"]["p_value"] == pytest.approx(stats.welch_test(w, c).p_value)
    assert row["mann_whitney"]["statistic"] == pytest.approx(stats.mann_whitney_test(w, c).statistic)
    assert row["n_correct"] == 8 and row["n_wrong"] == 6


def test_locked_wrong_group_is_detected_in_shallow_layers_only(comparison):
    for layer in dg.layer_groups(L)["shallow"]:
        row = comparison.metrics["locality"][layer]
        assert row["difference"]["low"] > 0  # wrong - correct, interval excludes 0
        assert row["welch"]["p_holm"] < 0.01 and row["welch"]["effect_size"] > 2
        assert row["mann_whitney"]["effect_size"] == 1.0  # complete separation
    for layer in range(dg.layer_groups(L)["shallow"][-1] + 1, L):
        assert comparison.metrics["locality"][layer]["welch"]["p_holm"] > 0.05
    s = comparison.scores["lock_in_score"]
    assert s["welch"]["p_value"] < 0.001 and s["difference"]["estimate"] > 0


def test_pairing_uses_shared_problems(groups, comparison):
    correct, wrong = groups
    assert comparison.pairing["shared_problems"] == 5
    layer = 0
    row = comparison.metrics["locality"][layer]["paired"]
    assert row["n_pairs"] == 5
    by_c = {d.meta["problem_key"]: d.metrics["locality"][layer] for d in correct}
    diffs = [d.metrics["locality"][layer] - by_c[d.meta["problem_key"]] for d in wrong
             if d.meta["problem_key"] in by_c]
    assert row["difference"]["estimate"] == pytest.approx(np.mean(diffs))
    assert row["permutation"]["extra"]["exact"]  # 2**5 sign patterns
    assert row["permutation"]["p_value"] == pytest.approx(2 / 32)  # all 5 differences positive: min exact p


def test_duplicate_traces_of_a_problem_are_averaged_before_pairing():
    c = [dg.diagnose_maps(structured_maps(L, KINDS, seed=s), KINDS, meta={"problem": "p"}) for s in (1, 2)]
    w = [dg.diagnose_maps(structured_maps(L, KINDS, seed=3, lock=0.3), KINDS, meta={"problem": "p"})]
    cmp = dg.compare(c, w, n_boot=200, n_perm=200)
    row = cmp.metrics["locality"][0]
    assert row["paired"]["n_pairs"] == 1
    expect = w[0].metrics["locality"][0] - np.mean([d.metrics["locality"][0] for d in c])
    assert row["paired"]["difference"]["estimate"] == pytest.approx(expect)


def test_holm_and_bh_are_across_layers(comparison):
    rows = comparison.metrics["question_reach"]
    raw = [r["welch"]["p_value"] for r in rows]
    assert [r["welch"]["p_holm"] for r in rows] == pytest.approx(stats.holm(raw))
    assert [r["welch"]["q_bh"] for r in rows] == pytest.approx(stats.benjamini_hochberg(raw))
    assert "Holm" in comparison.to_json()["multiple_comparisons"]


def test_json_is_strict_and_table_reads(comparison):
    text = json.dumps(comparison.to_json(), allow_nan=False)
    assert '"direction": "wrong - correct"' in text
    table = comparison.table()
    assert "locality" in table and "lock_in_score" in table
    mean, low, high = comparison.curve("locality", "wrong")
    assert mean.shape == (L,) and np.all(low <= mean) and np.all(mean <= high)


def test_null_metrics_are_skipped_not_invented():
    kinds = ["question"] + ["thinking"] * 5  # no summary: decay metrics null in every trace
    rng = np.random.default_rng(0)
    c = [dg.diagnose(rng.random((4, 6, 6)) * np.tril(np.ones((6, 6))), step_kinds=kinds) for _ in range(3)]
    w = [dg.diagnose(rng.random((4, 6, 6)) * np.tril(np.ones((6, 6))), step_kinds=kinds) for _ in range(3)]
    cmp = dg.compare(c, w, n_boot=100, n_perm=100)
    row = cmp.metrics["summary_to_thinking"][0]
    assert row["correct"] is None and row["welch"] is None and row["difference"] is None
    assert cmp.metrics["locality"][0]["welch"]["p_value"] is not None
    json.dumps(cmp.to_json(), allow_nan=False)


def test_compare_errors():
    d4 = dg.diagnose(structured_maps(4, KINDS), step_kinds=KINDS)
    d8 = dg.diagnose(structured_maps(8, KINDS), step_kinds=KINDS)
    with pytest.raises(StepscopeError, match="layers"):
        dg.compare([d4], [d8])
    with pytest.raises(StepscopeError, match="at least one"):
        dg.compare([], [d8])
