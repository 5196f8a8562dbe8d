"""`stepscope eval --benchmark livecodebench --data-file ...` end to end (the command line, with a generator of fixed
responses in place of a model to keep it fast): programs that made the grader itself raise (a printed signalling
NaN, a returned list nested 3,000 deep) are graded like any other, and a grading that fails inside the grader
is recorded as such, named in the summary, and the run goes on."""

import json

import pytest
from test_livecodebench import call_row, stdio_row, write_rows

from stepscope import cli
from stepscope.commands import options
from stepscope.evaluate import read_results, runner
from stepscope.trace import Trace

DEEP = "[" * 3000 + "]" * 3000  # a list nested 3,000 deep
PROGRAMS = {
    "abc001_a": "a, b = map(int, input().split())\nprint(a + b)",  # right
    "abc002_a": "input()\nprint('sNaN')",  # Decimal('sNaN') raised InvalidOperation in the comparison
    "3001": "class Solution:\n    def nest(self, n):\n        x = []\n        for _ in range(n - 1):\n"
            "            x = [x]\n        return x\n",  # right, and deep: RecursionError in the comparison
    "3002": "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n",  # right
}


def rows() -> list[dict]:
    return [stdio_row("abc001_a"), stdio_row("abc002_a"),
            call_row("3001", metadata=json.dumps({"func_name": "nest"}),
                     public_test_cases=json.dumps([{"input": "3000", "output": DEEP, "testtype": "functional"}]),
                     private_test_cases=json.dumps([])),
            call_row("3002")]


def fake_engine(tokenizer):
    def generate(model, tok, questions, *, metas, **kw):
        return [Trace.from_text(tokenizer, question=q, response=f"Done.\n</think>\n```python\n{PROGRAMS[m['id']]}\n```\n",
                                meta=dict(m)) for q, m in zip(questions, metas)]

    return options.Engine("fixed", None, tokenizer, generate, lambda **s: {}, "cpu")


def run_cli(tmp_path, name, monkeypatch, tokenizer):
    monkeypatch.setattr(options, "load_engine", lambda args, **kw: fake_engine(tokenizer))
    data = write_rows(tmp_path / "lcb.jsonl", rows())
    out = tmp_path / name
    code = cli.main(["eval", "--benchmark", "livecodebench", "--data-file", str(data), "--arms", "baseline",
                     "--n-samples", "1", "--no-progress", "--code-timeout", "5", "--out", str(out)])
    return code, out, {r["problem_id"]: r for r in read_results(out)}


def test_programs_that_broke_the_grader_are_graded(tmp_path, monkeypatch, think_tokenizer, capsys):
    code, out, recs = run_cli(tmp_path, "run", monkeypatch, think_tokenizer)
    assert code == 0 and set(recs) == set(PROGRAMS)
    assert {p: r["status"] for p, r in recs.items()} == {"abc001_a": "passed", "abc002_a": "wrong_answer",
                                                          "3001": "passed", "3002": "passed"}
    assert recs["abc002_a"]["failure"]["got"] == "sNaN\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["baseline"]["accuracy"] == pytest.approx(0.75) and summary["grader_errors"] == []


def test_a_grading_that_fails_inside_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, think_tokenizer,
                                                                        capsys):
    real = runner.grade_code

    def flaky(tests, trace, **kw):  # an internal failure for one sample only
        if "sNaN" in trace.text:
            raise RuntimeError("the comparison broke")
        return real(tests, trace, **kw)

    monkeypatch.setattr(runner, "grade_code", flaky)
    code, out, recs = run_cli(tmp_path, "run", monkeypatch, think_tokenizer)
    assert code == 0 and set(recs) == set(PROGRAMS)
    broken = recs["abc002_a"]
    assert broken["status"] == "grader_error" and not broken["correct"]
    assert broken["failure"]["error"] == "RuntimeError: the comparison broke"
    assert all(recs[p]["status"] == "passed" for p in ("abc001_a", "3001", "3002"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grader_errors"] == [{"problem_id": "abc002_a", "arm": "baseline", "sample": 0,
                                         "error": "RuntimeError: the comparison broke"}]
    assert summary["arms"]["baseline"]["grader_errors"] == 1
    captured = capsys.readouterr()
    assert "1 sample(s) could not be graded" in captured.out and "abc002_a (baseline, sample 0)" in captured.out
    assert "grading abc002_a failed inside the grader" in captured.err
