"""Signs of life in long generations: the decode loop's on_progress hook, the TokenProgress display, progress
inside a batch in `generate` and `eval`, and the warning before a run that is large for the device."""

from __future__ import annotations

import json

import pytest
import test_cli_errors
from test_cli_errors import FAST
from tiny import make_model, make_tokenizer

from stepscope.cli import main
from stepscope.flow import generate_traces
from stepscope.progress import TokenProgress, accepts, plan_warning

work, no_model_loading = test_cli_errors.work, test_cli_errors.no_model_loading  # the fixtures, shared


class FakeBar:
    def __init__(self):
        self.n, self.postfix = 0, []

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text):
        self.postfix.append(text)


def test_decode_loop_reports_every_token_and_row():
    tok = make_tokenizer("think")
    model = make_model("llama", vocab_size=len(tok), layers=2).eval()
    calls = []
    qs = ["What is 2+3?", "Name a prime bigger than 10, please.", "hi"]
    traces = generate_traces(model, tok, qs, max_new_tokens=7, temperature=1.0, seed=3, batch_size=2,
                             progress=False, on_progress=lambda n, done: calls.append((n, done)))
    assert sum(n for n, _ in calls) == sum(t.meta["num_new_tokens"] for t in traces)
    assert sum(d for _, d in calls) == len(qs)
    # one call per decode step: a batch runs as many steps as its longest row
    by_batch = [[traces[0], traces[1]], [traces[2]]]  # longest prompts first: "hi" is alone in batch 2
    assert len(calls) == sum(max(t.meta["num_new_tokens"] for t in b) for b in by_batch)
    assert calls[0][0] == 2 and calls[-1][0] == 1  # every live row adds one token per step


def test_token_progress_counts_and_rates():
    now = [100.0]
    bar = FakeBar()
    p = TokenProgress(bar, count_rows=True, extra=lambda: "baseline 50.0%", interval=1.0, clock=lambda: now[0])
    p.start_batch(8)
    now[0] += 2.0
    p(8)  # drawn: a second has passed since the last draw
    p(8)  # not drawn: too soon, nothing finished
    assert bar.postfix == ["baseline 50.0%, batch 0/8 rows done, 8 tokens, 4.0 tokens/s"]
    now[0] += 2.0
    p(6, 2)  # two rows finished: drawn at once
    assert bar.postfix[-1] == "baseline 50.0%, batch 2/8 rows done, 22 tokens, 5.5 tokens/s" and bar.n == 2
    p.start_batch(3)
    assert "batch 0/3 rows done, 0 tokens" in p.describe() and p.tokens == 22


def test_accepts():
    assert accepts(generate_traces, "on_progress") and accepts(lambda **kw: None, "on_progress")
    assert not accepts(lambda model, tokenizer, questions, *, decode, progress: None, "on_progress")


def test_plan_warning_by_device():
    assert plan_warning(32, 32768, "cpu", "1 problem x 16 samples x 2 arms") == (
        "this run generates 32 sequences (1 problem x 16 samples x 2 arms) of up to 32,768 new tokens each: up to "
        "1,048,576 tokens, a lot for cpu; --limit, --n-samples and --max-new-tokens make it smaller")
    assert plan_warning(32, 32768, "cuda:0", "x") is None
    assert plan_warning(4, 512, "cpu", "x") is None


def test_eval_says_before_loading_that_a_run_is_large(work, tmp_path, no_model_loading, capsys):
    argv = ["eval", "--benchmark", str(work / "bench.jsonl"), "--model", str(work / "model"), *FAST,
            "--n-samples", "16", "--out", str(tmp_path / "r")]
    with pytest.raises(AssertionError, match="loaded"):  # the warning comes first, then the (refused) load
        main(argv)
    err = capsys.readouterr().err
    assert "warning: this run generates 32 sequences (1 problem x 16 samples x 2 arms) of up to 32,768" in err


def test_eval_and_generate_show_tokens_inside_a_batch(work, tmp_path, capsys):
    argv = ["eval", "--benchmark", str(work / "bench.jsonl"), "--model", str(work / "model"), *FAST,
            "--n-samples", "3", "--max-new-tokens", "6", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "batch 3/3 rows done" in err and "tokens/s" in err and "warning" not in err
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {k} plus 2?"}) + "\n" for k in range(3)),
                        encoding="utf-8")
    assert main(["generate", "--input", str(problems), "--model", str(work / "model"), *FAST,
                 "--max-new-tokens", "6", "--no-stepflow"]) == 0
    err = capsys.readouterr().err
    assert "3/3" in err and "tokens/s" in err
    assert "3 traces, " in err and " of 3 (" in err and "by budget forcing)" in err  # no "3 trace(s)"
