"""compare's unit is the problem: traces sharing a problem (samples, arms) count once, --arm picks an arm, and
small or one-problem groups and groups without a shared problem are warned about."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_diagnose import KINDS, structured_maps
from test_diagnose_cli import THINK

import stepscope.diagnose as dg
from stepscope import stats
from stepscope.cli import main
from stepscope.trace import Trace

L = 8


def _traces(problems: dict[str, float], per_problem: int, *, spread: float, seed0: int) -> list:
    """Diagnoses of `per_problem` traces of each problem: the problem sets the lock-in level, the traces of one
    problem differ only by `spread` (samples and arms of one problem are alike)."""
    out, rng = [], np.random.default_rng(seed0)
    for k, (prob, lock) in enumerate(problems.items()):
        for j in range(per_problem):
            maps = structured_maps(L, KINDS, lock=float(np.clip(lock + spread * rng.standard_normal(), 0, 0.95)),
                                   seed=seed0 + 100 * k + j, noise=0.01)
            out.append(dg.diagnose_maps(maps, KINDS, meta={"id": f"{prob}-{j}", "problem_id": prob}))
    return out


def _problem_means(group: list, layer: int) -> list[float]:
    """The slow, obvious reference: locality at `layer`, averaged over each problem's traces by a loop."""
    by: dict[str, list[float]] = {}
    for d in group:
        by.setdefault(d.meta["problem_key"], []).append(d.metrics["locality"][layer])
    return [sum(v) / len(v) for v in by.values()]


def test_statistics_are_over_problem_means():
    """Every interval and test equals the same statistic computed on the per-problem means by hand."""
    correct = _traces({f"c{k}": 0.1 * k for k in range(5)}, 3, spread=0.05, seed0=0)
    wrong = _traces({f"w{k}": 0.2 + 0.1 * k for k in range(4)}, 2, spread=0.05, seed0=1000)
    cmp = dg.compare(correct, wrong, n_boot=500, n_perm=200, seed=3)
    for layer in (0, L - 1):
        c, w = _problem_means(correct, layer), _problem_means(wrong, layer)
        row = cmp.metrics["locality"][layer]
        assert row["n_correct"] == 5 and row["n_wrong"] == 4
        assert row["correct"]["estimate"] == pytest.approx(np.mean(c), rel=1e-12)
        assert row["wrong"]["estimate"] == pytest.approx(np.mean(w), rel=1e-12)
        assert row["welch"]["p_value"] == pytest.approx(stats.welch_test(w, c).p_value, rel=1e-12)
        assert row["mann_whitney"]["statistic"] == pytest.approx(stats.mann_whitney_test(w, c).statistic)
        boot = stats.bootstrap_diff_ci(w, c, n_boot=500, seed=3 + 10 * layer + 2)
        assert (row["difference"]["low"], row["difference"]["high"]) == pytest.approx((boot.low, boot.high))
    assert cmp.groups["correct"] == {**cmp.groups["correct"], "n": 15, "n_problems": 5}
    assert "unit: the problem" in cmp.table()


def test_arms_of_one_problem_are_not_evidence():
    """The reported case: the wrong group is two arms and samples of ONE problem. Counted as independent traces,
    shallow layers came out Holm-significant with huge effect sizes; with the problem as the unit there is one
    wrong problem, so no test can be made, and the warnings say why."""
    correct = _traces({"p0": 0.0, "p1": 0.1}, 4, spread=0.01, seed0=0)
    wrong = _traces({"p2": 0.6}, 4, spread=0.01, seed0=500)
    naive = stats.welch_test([d.metrics["locality"][0] for d in wrong], [d.metrics["locality"][0] for d in correct])
    assert naive.p_value < 1e-4  # what trace-level statistics would claim
    cmp = dg.compare(correct, wrong, n_boot=200, n_perm=200)
    for name in dg.METRICS:
        for row in cmp.metrics[name]:
            assert row["welch"] is None or row["welch"]["p_holm"] is None or row["welch"]["p_holm"] >= 0.05
    text = " | ".join(cmp.warnings)
    assert "the wrong group holds 1 problem (4 traces)" in text and "the correct group holds 2 problems" in text
    assert "4 of the 4 wrong traces are of one problem (p2)" in text
    assert "no problem is in both groups" in text
    assert cmp.table().count("warning: ") == len(cmp.warnings) == 4
    assert cmp.to_json()["warnings"] == cmp.warnings


def _write(folder, tokenizer, *, problem: str, arm: str, correct: bool, lock: float, seed: int) -> None:
    from stepscope.saliency import SaliencyResult

    trace = Trace.from_text(tokenizer, question=f"Problem {problem}: what is 2+2?",
                            response=THINK + "\n</think>\n\nThe answer is 4, as computed.\n\nFinal answer: 4.",
                            meta={"id": folder.name, "problem_id": problem, "arm": arm, "sample": 0,
                                  "correct": correct})
    maps = structured_maps(L, trace.kinds, lock=lock, seed=seed, noise=0.3).astype(np.float32)
    SaliencyResult(maps=torch.from_numpy(maps), trace=trace,
                   meta={"model": "tiny", "pool": "mean", "layers": list(range(L)), "num_layers": L}).save(folder)


def test_compare_cli_arm_and_warnings(tmp_path, think_tokenizer, capsys):
    sal = tmp_path / "sal"
    for k in range(6):  # problems 0-3 right in both arms, 4-5 wrong in both
        for arm in ("baseline", "stepflow"):
            _write(sal / f"p{k}-{arm}-s0", think_tokenizer, problem=f"p{k}", arm=arm, correct=k < 4,
                   lock=0.5 * (k >= 4), seed=10 * k + (arm == "stepflow"))
    base = ["compare", "--by-meta", str(sal), "--n-boot", "200", "--n-perm", "200", "--no-figures"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    assert "2 arms (baseline, stepflow), pooled per problem; --arm NAME" in err
    assert main([*base, "--arm", "stepflow", "--out", str(tmp_path / "sf")]) == 0
    out, err = capsys.readouterr()
    cmp = json.loads((tmp_path / "sf" / "comparison.json").read_text())
    assert cmp["groups"]["correct"]["ids"] == [f"p{k}-stepflow-s0" for k in range(4)]
    assert cmp["groups"]["wrong"]["n"] == 2 and "pooled" not in err
    assert "warning: the wrong group holds 2 problems" in err and "warning: no problem is in both groups" in err
    summary = (tmp_path / "sf" / "summary.txt").read_text()
    assert "warning: no problem is in both groups" in summary and "0 problems in both groups" in out
    assert main([*base, "--arm", "smi", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--arm smi: no trace of that arm (their meta names the arms baseline, stepflow)" in err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()
