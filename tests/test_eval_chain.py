"""Gain by chain length and the effect on the chain, on records built with a known answer: a gain that grows with
the baseline's length, and none. The construction makes the truth exact: problems come in pairs of equal length
whose gains are truth + e and truth - e, so every bin's mean gain and the least-squares slope equal the truth
whatever the noise e, and the rank correlation of pure noise with length is exactly 0. StepFlow's own lengths run
the other way, so bins drawn from them (or from both arms) would come out reversed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluate.chain import parse_bins
from stepscope.evaluate.summary import headline_table, markdown, summarize, write_summary

N = 8  # samples per problem: accuracies in eighths
OFFSETS = [-1, 1, -2, 2, 0, 0, -3, 3]  # a baseline sample's steps minus its problem's length (mean 0)
INFO = {"model": "m", "benchmark": "toy", "n_samples": N, "n_problems": 60,
        "arms": {"baseline": None, "stepflow": {"tau_max": 0.15}}, "temperature": 0.6, "top_p": 0.95,
        "max_new_tokens": 4096}


def build(gain_eighths: tuple[int, int, int]) -> tuple[list[dict], dict]:
    """60 problems in 3 length groups of 10 equal-length pairs; StepFlow gains gain_eighths[k] / 8 in group k.

    Returns the records and the truth: problem -> (baseline length, true gain)."""
    recs, truth = [], {}
    for k in range(3):
        for j in range(10):
            length = 10 + 30 * k + 2 * j  # group k: 10-28, 40-58, 70-88 steps
            for half, sign in enumerate((1, -1)):
                pid = f"g{k}-{j:02d}-{half}"
                base = 3 + j % 2  # correct baseline samples
                flow = base + gain_eighths[k] + sign * (j % 2)  # noise +-1/8 that cancels within the pair
                truth[pid] = (length, gain_eighths[k] / N)
                for s in range(N):
                    steps = length + OFFSETS[s]
                    recs.append({"problem_id": pid, "sample": s, "arm": "baseline", "correct": s < base,
                                 "thinking_closed": True, "budget_forced": s == N - 1, "thinking_steps": steps,
                                 "thinking_tokens": 12 * steps, "new_tokens": 12 * steps + 30})
                    # StepFlow's chains: long where the baseline's are short (binning on them would reverse the bins)
                    recs.append({"problem_id": pid, "sample": s, "arm": "stepflow", "correct": s < flow,
                                 "thinking_closed": True, "budget_forced": False, "thinking_steps": 115 - length,
                                 "thinking_tokens": 12 * (115 - length), "new_tokens": 12 * (115 - length) + 30})
    return recs, truth


def true_slope(truth: dict) -> float:
    x = np.array([v[0] for v in truth.values()], dtype=float)
    y = np.array([v[1] for v in truth.values()], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def test_gain_that_grows_with_length_comes_out_as_built():
    recs, truth = build((0, 1, 3))
    s = summarize(recs, INFO, n_boot=2000, n_perm=2000)
    sec = s["chain_length"]
    assert sec["available"] and sec["measure"] == "steps" and sec["binned_on"] == "baseline"
    # the bins are the three built groups, by the baseline's length only
    assert [b["n_problems"] for b in sec["bins"]] == [20, 20, 20]
    assert [(b["min_length"], b["max_length"]) for b in sec["bins"]] == [(10, 28), (40, 58), (70, 88)]
    assert sec["per_problem_length"] == {p: pytest.approx(v[0]) for p, v in truth.items()}
    for k, b in enumerate(sec["bins"]):
        group = [p for p in truth if p.startswith(f"g{k}-")]
        for arm in ("baseline", "stepflow"):  # each arm's accuracy in the bin, from the records directly
            acc = [np.mean([r["correct"] for r in recs if r["problem_id"] == p and r["arm"] == arm]) for p in group]
            assert b["arms"][arm]["accuracy"] == pytest.approx(np.mean(acc))
        c = b["comparisons"]["stepflow"]
        built = (0, 1, 3)[k] / N
        assert c["diff"] == pytest.approx(built, abs=1e-12)  # exactly the built gain
        assert c["ci_low"] < built < c["ci_high"] or c["ci_low"] <= built <= c["ci_high"]  # covers the truth
        assert c["ci_high"] - c["ci_low"] > 0.01  # a real interval (the noise is there)
        assert c["n"] == 20
    assert sec["bins"][0]["comparisons"]["stepflow"]["ci_low"] < 0 < sec["bins"][0]["comparisons"]["stepflow"]["ci_high"]
    assert sec["bins"][2]["comparisons"]["stepflow"]["ci_low"] > 0.2  # the long bin's gain is clearly there
    t = sec["trend"]["stepflow"]
    assert t["spearman_rho"] > 0.7 and t["p_value"] < 0.01
    slope = true_slope(truth) * 100  # per 100 steps
    assert t["slope"] == pytest.approx(slope, rel=1e-9)  # the noise cancels within pairs: OLS gives the truth
    assert t["slope_ci_low"] < slope < t["slope_ci_high"]
    md = markdown(s)
    assert "## Gain by chain length" in md and "Only the baseline arm decides the bins" in md
    assert "| 3 | 70.0–88.0 | 20 |" in md and "Spearman ρ" in md and "permutation test over 60 problems" in md


def test_no_gain_gives_flat_bins_and_no_trend():
    recs, truth = build((0, 0, 0))
    s = summarize(recs, INFO, n_boot=2000, n_perm=2000)
    sec = s["chain_length"]
    for b in sec["bins"]:
        c = b["comparisons"]["stepflow"]
        assert c["diff"] == pytest.approx(0.0, abs=1e-12) and c["ci_low"] < 0 < c["ci_high"]
        assert c["p_value"] > 0.5
    t = sec["trend"]["stepflow"]
    assert t["spearman_rho"] == pytest.approx(0.0, abs=1e-12) and t["p_value"] > 0.9
    assert t["slope"] == pytest.approx(0.0, abs=1e-12) and t["slope_ci_low"] < 0 < t["slope_ci_high"]


def test_bins_by_tokens_and_by_given_edges():
    recs, _ = build((0, 1, 3))
    by_tokens = summarize(recs, INFO, n_boot=500, n_perm=500, length_by="tokens")["chain_length"]
    assert by_tokens["unit"] == "tokens" and [b["n_problems"] for b in by_tokens["bins"]] == [20, 20, 20]
    assert by_tokens["slope_per"] == 1000 and by_tokens["bins"][2]["min_length"] == 12 * 70
    edges = summarize(recs, INFO, n_boot=500, n_perm=500, length_bins="28,58")["chain_length"]
    assert edges["edges"] == [28.0, 58.0] and [b["n_problems"] for b in edges["bins"]] == [20, 20, 20]  # L <= edge
    two = summarize(recs, INFO, n_boot=500, n_perm=500, length_bins="40,")["chain_length"]
    assert [b["n_problems"] for b in two["bins"]] == [22, 38]  # 10..28 and 40 (20 + 2) | 42..88
    halves = summarize(recs, INFO, n_boot=500, n_perm=500, length_bins=2)["chain_length"]
    assert [b["n_problems"] for b in halves["bins"]] == [30, 30]
    assert parse_bins("3") == 3 and parse_bins(None) == 3 and parse_bins("200,800") == [200.0, 800.0]
    for bad in ("0", "x", "800,200", "5,5", "1,nan"):
        with pytest.raises(StepscopeError):
            parse_bins(bad)


def test_effect_on_the_chain_is_the_built_paired_difference():
    recs, truth = build((0, 1, 3))
    s = summarize(recs, INFO, n_boot=2000, n_perm=2000)
    chain = s["chain"]
    lengths = np.array([v[0] for v in truth.values()], dtype=float)
    assert chain["arms"]["baseline"]["thinking_steps"]["mean"] == pytest.approx(lengths.mean())
    assert chain["arms"]["stepflow"]["thinking_steps"]["mean"] == pytest.approx((115 - lengths).mean())
    c = chain["comparisons"]["stepflow"]
    diff = (115 - 2 * lengths).mean()
    assert c["thinking_steps"]["diff"] == pytest.approx(diff)
    assert c["thinking_steps"]["ci_low"] < diff < c["thinking_steps"]["ci_high"]
    assert c["thinking_tokens"]["diff"] == pytest.approx(12 * diff)
    # one baseline sample in eight was budget-forced; StepFlow closed every chain on its own
    assert chain["arms"]["baseline"]["budget_forced_share"]["mean"] == pytest.approx(1 / 8)
    assert chain["arms"]["baseline"]["closed_share"]["mean"] == pytest.approx(7 / 8)
    assert c["budget_forced_share"]["diff"] == pytest.approx(-1 / 8)
    assert c["closed_share"]["ci_low"] == c["closed_share"]["ci_high"] == pytest.approx(1 / 8)
    md = markdown(s)
    se = lengths.std(ddof=1) / np.sqrt(lengths.size)
    assert "## Effect on the chain" in md and f"| baseline | {lengths.mean():.1f} ± {se:.1f} | " in md
    assert "| difference | +17.0 [" in md and "| -12.5 [-12.5, -12.5] |" in md


OLD = Path(__file__).resolve().parent / "data" / "eval_run_old"  # written by stepscope before chain and cost


def test_a_run_written_before_these_fields_still_summarizes(tmp_path, capsys):
    """tests/data/eval_run_old: run.json, results.jsonl and the summary of a run written by the runner as it was
    before records carried thinking steps, timing and fire counts (the stand-in generator of test_eval_runner)."""
    import shutil

    from stepscope import cli

    old = [json.loads(x) for x in (OLD / "results.jsonl").read_text().splitlines()]
    assert old and not any({"thinking_steps", "timing", "stepflow_fires"} & set(r) for r in old)
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    assert cli.main(["eval", "--summarize", "--out", str(run)]) == 0
    md = capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    sec = s["chain_length"]
    assert sec["available"] and sec["unit"] == "tokens"  # falls back to the tokens the records carry
    assert "the records carry no thinking steps: binned by thinking tokens" in md
    assert s["chain"]["arms"]["baseline"]["thinking_steps"] is None  # unavailable, not guessed
    assert s["chain"]["arms"]["baseline"]["budget_forced_share"] is None  # these records never said
    assert s["chain"]["arms"]["baseline"]["unclosed_share"] is not None
    cost = s["cost"]
    assert not cost["available"] and cost["arms"]["baseline"]["tokens_per_second"] is None
    assert cost["ratios"]["stepflow"]["throughput"] is None
    assert "StepFlow / baseline throughput: unavailable." in md and "| baseline | n/a | n/a | n/a |" in md
    assert (run / "summary.html").read_text().count("<table>") >= 4
    # the summary.json written back then renders too: its missing sections are said to be missing
    then = markdown(json.loads((OLD / "summary.json").read_text()))
    assert then.count("Unavailable: this summary predates it.") == 3
    assert cli.main(["eval", "--table", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| model | toy |" in table
    assert f"| {run} | fake-model | toy | 5 |" in table and "| n/a | n/a |" in table


def test_the_page_and_the_table_across_runs(tmp_path, capsys):
    from stepscope import cli

    recs, _ = build((0, 1, 3))
    hostile = {**INFO, "model": "<img src=x onerror=alert(1)>", "stepscope_run": 2}
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(hostile))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = write_summary(run, n_boot=500, n_perm=500)
    page = (run / "summary.html").read_text()
    assert "<img" not in page and "<script" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<svg") == 1 and "gain by chain length" in page
    assert page.index("<h2>Gain by chain length</h2>") < page.index("<svg") < page.index("<h2>Effect on the chain")
    rows = headline_table([s, s], labels=["a", "b"]).splitlines()
    assert rows[2].startswith("| a | <img src=x onerror=alert(1)> | toy | 60 | +0.0 / +12.5 / +37.5 (by steps) |")
    assert cli.main(["eval", "--table", str(run), "--length-bins", "28,58"]) == 0
    assert "+0.0 / +12.5 / +37.5 (by steps)" in capsys.readouterr().out
    assert cli.main(["eval", "--summarize", "--out", str(run), "--length-bins", "9,3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--length-bins" in err[0] and "ascending" in err[0]
