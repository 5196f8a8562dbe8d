"""LiveCodeBench through the run loop: fixed responses through run_eval's generate_fn hook (real Traces), both
arms, interrupted and resumed, records with per-test statuses, the summary's difficulty/platform breakdowns
and LCB column; and the command line end to end on the bundled model."""

import json

import pytest
from test_livecodebench import call_row, stdio_row, write_rows

from stepscope.decoding import DecodeConfig
from stepscope.evaluate import EvalSettings, load_benchmark, read_results, run_eval
from stepscope.evaluate.summary import markdown, paper_table
from stepscope.trace import Trace

RIGHT = {"stdio": "a, b = map(int, input().split())\nprint(a + b)",
         "call": "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                 "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                 "                return [seen[target - x], i]\n            seen[x] = i\n"}
WRONG = {"stdio": "a, b = map(int, input().split())\nprint(a - b)",
         "call": "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]\n"}


def response(kind: str, arm: str, sample: int) -> str:
    """StepFlow writes right code; the baseline right only in sample 0 of the stdin problem."""
    good = arm == "stepflow" or (kind == "stdio" and sample == 0)
    code = (RIGHT if good else WRONG)[kind]
    return f"I will add them.\n</think>\n\nSolution:\n```python\n{code}\n```\n"


class FixedResponses:
    def __init__(self, tokenizer, kinds: dict[str, str], stop_on_call: int | None = None):
        self.tokenizer, self.kinds, self.stop_on_call = tokenizer, kinds, stop_on_call
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model, tokenizer, questions, *, decode, stepflow, seeds, batch_size, prompt_style, progress,
                 metas):
        if self.stop_on_call is not None and len(self.calls) + 1 == self.stop_on_call:
            raise KeyboardInterrupt
        assert prompt_style == "plain" and all(q.startswith("### Question:") for q in questions)
        self.calls.append((metas[0]["arm"], prompt_style))
        return [Trace.from_text(self.tokenizer, question=q,
                                response=response(self.kinds[m["id"]], m["arm"], m["sample"]), meta=dict(m))
                for q, m in zip(questions, metas)]


def test_run_interrupted_resumed_with_statuses(tmp_path, think_tokenizer):
    f = write_rows(tmp_path / "lcb.jsonl", [stdio_row(), call_row()])
    bench = load_benchmark("livecodebench", data_file=f)
    kinds = {"abc301_a": "stdio", "3000": "call"}
    settings = EvalSettings(model="fixed", benchmark=bench.name, n_samples=2,
                            arms={"baseline": None, "stepflow": {"tau_max": 0.15}},
                            decode=DecodeConfig(max_new_tokens=64), extra={"code_timeout": 5.0, "code_memory": 2048})
    out = tmp_path / "run"
    kw = dict(arm_configs={"baseline": None, "stepflow": "cfg"}, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the second batch
        run_eval(None, None, bench, settings, out, generate_fn=FixedResponses(think_tokenizer, kinds, 3), **kw)
    first = read_results(out)
    assert [(r["problem_id"], r["arm"]) for r in first] == [("abc301_a", "baseline")] * 2 + [("abc301_a", "stepflow")] * 2
    gen = FixedResponses(think_tokenizer, kinds)
    summary = run_eval(None, None, bench, settings, out, resume=True, generate_fn=gen, **kw)
    assert [a for a, _ in gen.calls] == ["baseline", "stepflow"]  # only the second batch was left
    recs = read_results(out)
    by = {(r["problem_id"], r["sample"], r["arm"]): r for r in recs}
    assert len(recs) == len(by) == 8 and all(by[(r["problem_id"], r["sample"], r["arm"])] == r for r in first)
    r = by[("abc301_a", 0, "baseline")]
    assert r["correct"] and r["status"] == "passed" and r["tests"] == ["passed"] * 3 and r["n_tests"] == 3
    assert r["difficulty"] == "easy" and r["platform"] == "atcoder" and "print(a + b)" in r["answer"]
    r = by[("abc301_a", 1, "baseline")]
    assert not r["correct"] and r["status"] == "wrong_answer" and r["failure"]["got"] == "-1\n"
    r = by[("3000", 1, "baseline")]
    assert r["status"] == "wrong_answer" and r["failure"]["expected"] == "[0, 1]" and r["failure"]["got"] == "[0, 0]"
    assert all(by[(p, s, "stepflow")]["correct"] for p in kinds for s in (0, 1))
    # accuracy: baseline (0.5 + 0) / 2, StepFlow 1; broken down by difficulty and platform
    assert summary["arms"]["baseline"]["accuracy"] == pytest.approx(0.25)
    assert summary["arms"]["stepflow"]["accuracy"] == pytest.approx(1.0)
    assert summary["by"]["difficulty"]["easy"]["arms"]["baseline"]["accuracy"] == pytest.approx(0.5)
    assert summary["by"]["platform"]["leetcode"]["arms"]["baseline"]["accuracy"] == pytest.approx(0.0)
    md = markdown(summary)
    assert "| difficulty |" in md and "| platform |" in md and "LCB" in md
    assert "| model | LCB |" in paper_table([summary])
    run = json.loads((out / "run.json").read_text())
    assert run["code_timeout"] == 5.0 and run["code_memory"] == 2048


@pytest.mark.slow
def test_cli_eval_livecodebench_on_the_bundled_model(tmp_path, capsys):
    from stepscope import cli

    f = write_rows(tmp_path / "lcb.jsonl", [stdio_row()])
    out = tmp_path / "run"
    args = ["eval", "--benchmark", "livecodebench", "--data-file", str(f), "--arms", "baseline", "--n-samples", "1",
            "--max-new-tokens", "24", "--max-thinking-tokens", "12", "--no-progress", "--code-timeout", "2",
            "--out", str(out)]
    assert cli.main(args) == 0
    (rec,) = read_results(out)
    assert rec["problem_id"] == "abc301_a" and rec["status"] in ("passed", "wrong_answer", "timeout",
                                                                   "runtime_error", "memory_limit", "no_code")
    assert rec["n_tests"] == 3 and rec["difficulty"] == "easy"
    assert "LCB" in capsys.readouterr().out
    assert cli.main(["eval", "--benchmark", "gsm8k", "--code-timeout", "2", "--out", str(tmp_path / "x")]) != 0
