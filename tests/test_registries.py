"""Where users extend stepscope: a new format and a new benchmark are one registration each, and every module
that needs them asks the registry (segmentation, prompts, grading, StepFlow, generation, `stepscope eval`).
The one list of question-field names serves every reader of problems."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from types import SimpleNamespace

import pytest
from tiny import make_model, save_model_dir

from stepscope.cli import main
from stepscope.errors import StepscopeError, TraceError
from stepscope.evaluate.grading import Grade
from stepscope.formats import FORMATS, Format, get_format
from stepscope.io import QUESTION_KEYS

Q = "What is 2 + 3?"
RESPONSE = ("Two plus three: count three steps up from two. That gives five in the end.\n</reason>\n\n"
            "The answer is \\boxed{5}.")


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


# -- a format -------------------------------------------------------------------------------------------------


@pytest.fixture
def reason():
    """A test-only format, registered in this one place (and taken out of the registry afterwards)."""
    from stepscope.formats import register_format

    fmt = register_format(Format("reason", "<reason>", "</reason>", assistant_start=("<|im_start|>assistant",),
                                 end_of_turn=("<|eor|>",), detect=("<reason>", "</reason>")))
    yield fmt
    del FORMATS["reason"]


def test_a_registered_format_segments_traces(reason, chatml_tokenizer):
    from stepscope.trace import Trace

    tr = Trace.from_text(chatml_tokenizer, question=Q, response=RESPONSE)  # "auto": the text names the format
    assert tr.format is reason and tr.fmt == "reason" and tr.thinking_closed
    assert tr.segment_text("summary") == "\n\nThe answer is \\boxed{5}."
    assert tr.segment_text("thinking").endswith("</reason>")
    # the steps are those of the same response in the think format, marker for marker
    as_think = Trace.from_text(chatml_tokenizer, question=Q, response=RESPONSE.replace("reason", "think"), fmt="think")
    assert [(s.kind, s.text.replace("reason", "think")) for s in tr.steps] == \
        [(s.kind, s.text) for s in as_think.steps]
    assert Trace.from_json(tr.to_json()).format is reason  # the registered format comes back from its JSON


def test_a_registered_format_builds_prompts(reason, chatml_tokenizer):
    from stepscope.prompts import build_prompt, forced_close_text

    text, _ = build_prompt(chatml_tokenizer, Q, fmt="reason")
    assert text.endswith("<|im_start|>assistant\n<reason>\n")  # the prompt opens its thinking
    assert "close your thinking with </reason>" in text  # a plain chat model is told its end marker
    assert forced_close_text(reason) == "\n</reason>\n\n"


def test_a_registered_format_is_graded(reason):
    from stepscope.evaluate.grading import grade_choice, summary_of

    assert summary_of(RESPONSE) == "\n\nThe answer is \\boxed{5}."  # read from the text
    assert summary_of(RESPONSE, fmt="reason") == summary_of(RESPONSE, fmt=reason)
    assert summary_of("<reason> still thinking", starts_in_thinking=False) is None  # opened, never closed
    assert grade_choice("B", "Options weighed.\n</reason>\nThe answer is (B).")
    assert summary_of(RESPONSE, fmt="think") is None  # another format's markers do not close it


def test_without_the_registration_the_format_is_unknown(chatml_tokenizer):
    from stepscope.evaluate.grading import summary_of
    from stepscope.flow import StepFlowConfig

    assert "reason" not in FORMATS
    assert summary_of(RESPONSE) is None
    with pytest.raises(TraceError, match="unknown format 'reason'"):
        get_format("reason")
    with pytest.raises(StepscopeError, match="fmt must be"):
        StepFlowConfig(fmt="reason")


def test_a_registered_format_drives_stepflow_and_generation(reason, chatml_tokenizer):
    from stepscope.flow import StepFlow, StepFlowConfig, generate_traces
    from stepscope.flow.generate import stop_token_ids

    assert StepFlowConfig(fmt=reason).fmt == "reason"  # a registered Format is kept by name, not as markers
    cfg = StepFlowConfig.from_json(StepFlowConfig(fmt="reason").to_json())
    model = make_model("llama", vocab_size=len(chatml_tokenizer), layers=2)
    assert StepFlow(model, chatml_tokenizer, cfg).format is reason
    tr = generate_traces(model, chatml_tokenizer, [Q], stepflow=StepFlowConfig(), fmt="reason", max_new_tokens=2,
                         temperature=0, progress=False)[0]
    assert tr.format is reason and tr.meta["config"]["stepflow"]["fmt"] == "reason"
    assert tr.segments["thinking"][0] < tr.meta["num_prompt_tokens"]  # the prompt opened the thinking
    # its end-of-turn token stops generation where the tokenizer holds it as a special token
    tok = copy.deepcopy(chatml_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|eor|>"]})
    assert tok.convert_tokens_to_ids("<|eor|>") in stop_token_ids(SimpleNamespace(), tok)
    rc, out, _ = cli(["generate", "--help"])
    assert rc == 0 and "reason" in out.split("--fmt", 1)[1].split("--markers", 1)[0]  # a --fmt choice


# -- a benchmark ----------------------------------------------------------------------------------------------


def toy_grader(problem, trace, *, timeout, code_limits) -> Grade:
    """Right exactly when the gold answer is "yes", whatever the model wrote (the math grader would call every
    response of the random tiny model wrong)."""
    return Grade(problem.answer == "yes", f"toy:{problem.id}", thinking_closed=trace.thinking_closed)


@pytest.fixture
def toy():
    """A test-only benchmark, registered in this one place (and taken out of the registry afterwards)."""
    from stepscope.evaluate import benchmarks
    from stepscope.evaluate.benchmarks import BenchmarkSpec, register_benchmark

    spec = register_benchmark(BenchmarkSpec("toy-arith", "ToyArith", "yes-or-no arithmetic for the registry test",
                                            paper_samples=2, grader=toy_grader, aliases=("toy",)))
    yield spec
    del benchmarks.SPECS["toy-arith"], benchmarks.ALIASES["toy"]


def test_a_registered_benchmark_runs_through_stepscope_eval(toy, tmp_path):
    tiny_model_dir = save_model_dir(tmp_path / "model")
    rc, out, _ = cli(["eval", "--help"])
    assert rc == 0 and "toy-arith" in out and "yes-or-no arithmetic for the registry test" in out
    assert "2 samples per problem; also toy" in " ".join(out.split())

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "Is 2 even?", "answer": "yes"},
                                                            {"question": "Is 3 even?", "answer": "no"}]),
                    encoding="utf-8")
    run = tmp_path / "run"
    rc, out, err = cli(["eval", "--benchmark", "toy", "--data-file", str(data), "--model", str(tiny_model_dir),
                        "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3", "--temperature", "0",
                        "--no-progress", "--out", str(run)])
    assert rc == 0, err
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["benchmark"] == "toy-arith" and info["n_samples"] == 2  # its paper protocol is the default
    records = [json.loads(x) for x in (run / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 * 2 * 2  # problems x samples x arms
    for r in records:  # graded by its own grader
        assert r["answer"] == f"toy:{r['problem_id']}" and r["correct"] is (r["gold"] == "yes")
    assert "ToyArith" in (run / "summary.md").read_text(encoding="utf-8") and "ToyArith" in out


def test_a_registered_benchmark_loads_by_name_and_alias_and_says_how_to_get_it(toy, tmp_path):
    from stepscope.evaluate import load_benchmark

    data = tmp_path / "toy.csv"
    data.write_text("question,answer\nIs 4 even?,yes\n", encoding="utf-8")
    b = load_benchmark("TOY", data_file=data)
    assert b.name == "toy-arith" and [p.id for p in b.problems] == ["toy-arith-00"]
    with pytest.raises(StepscopeError, match="^toy-arith: no installed package holds it; pass a local file"):
        load_benchmark("toy")
    with pytest.raises(StepscopeError, match="is taken"):
        from stepscope.evaluate.benchmarks import BenchmarkSpec, register_benchmark

        register_benchmark(BenchmarkSpec("other", "Other", "x", aliases=("toy",)))


def test_without_the_registration_the_benchmark_is_unknown():
    from stepscope.evaluate import load_benchmark

    with pytest.raises(StepscopeError, match="unknown benchmark 'toy'"):
        load_benchmark("toy")


# -- the question field names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", QUESTION_KEYS)
def test_every_reader_of_problems_knows_every_question_field(key, tmp_path):
    """Records of evaluation tools, benchmark rows and `stepscope generate --input` read the same fields."""
    from stepscope.commands.generate import read_problems
    from stepscope.evaluate.problems import rows_to_problems
    from stepscope.trace import record_fields

    rec = {key: "What is 6 * 7?", "answer": "42", "response": "Six sevens.\n</think>\n42"}
    assert record_fields(rec)[0] == "What is 6 * 7?"
    assert rows_to_problems([rec], "b")[0].question == "What is 6 * 7?"
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert read_problems(str(f)) == [("0", "What is 6 * 7?")]


# -- the documentation's examples -----------------------------------------------------------------------------


def test_the_extending_page_registers_what_it_says(chatml_tokenizer):
    """docs/extending.md's snippets run as written and register a benchmark and a format that work."""
    import re
    from pathlib import Path

    from stepscope.core import interventions
    from stepscope.evaluate import benchmarks
    from stepscope.evaluate.problems import Problem
    from stepscope.trace import Trace

    page = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 3
    try:
        for block in blocks:
            exec(compile(block, "docs/extending.md", "exec"), {})  # noqa: S102
        spec = benchmarks.benchmark_spec("mine")
        assert spec.name == "my-bench" and benchmarks.paper_samples("my-bench") == 16
        assert benchmarks.benchmark_title("my-bench") == "MyBench"
        tr = Trace.from_text(chatml_tokenizer, question=Q, response=RESPONSE, fmt="reason")
        assert tr.thinking_closed and tr.format is FORMATS["reason"]
        for gold, right in [("The answer is \\boxed{5}.", True), ("5", False)]:
            grade = spec.grader(Problem("p", Q, gold), tr, timeout=None, code_limits={})
            assert grade.correct is right and grade.answer == "\n\nThe answer is \\boxed{5}."
        _check_damp(tr, chatml_tokenizer)
    finally:
        interventions.REGISTRY.pop("damp", None)
        benchmarks.SPECS.pop("my-bench", None)
        benchmarks.ALIASES.pop("mine", None)
        FORMATS.pop("reason", None)


def _check_damp(trace, tok):
    """The page's repair: on a tiny model, the summary queries of its deep layer come out of the attention scaled
    by (1 - gamma) (read at the input of the output projection) and are counted; the other queries are not."""
    import torch
    from tiny import make_model

    from stepscope.flow import StepFlow, StepFlowConfig

    model = make_model("llama", vocab_size=len(tok))
    seen = {}

    def grab(module, args):
        seen.setdefault("x", []).append(args[0].detach().clone())

    ids = torch.tensor([trace.token_ids])
    h = model.model.layers[3].self_attn.o_proj.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(ids)
            cfg = StepFlowConfig(oeb=False, smi=False, fmt="reason", interventions={"damp": {"gamma": 0.25}})
            with StepFlow(model, tok, cfg) as flow:
                model(ids)
    finally:
        h.remove()
    plain, damped = seen["x"]
    a, b = trace.segments["summary"]
    assert b > a
    assert torch.allclose(damped[0, a:b], 0.75 * plain[0, a:b], atol=1e-6)
    assert torch.equal(damped[0, :a], plain[0, :a])
    assert flow.stats.interventions == {"damp": {3: b - a}}
