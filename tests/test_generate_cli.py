"""`stepscope generate`: streaming, JSONL output, resume, settings checks, StepFlow knobs, bad input."""

from __future__ import annotations

import json

import pytest
from tiny import make_model, make_tokenizer

from stepscope.cli import build_parser, main
from stepscope.commands import options
from stepscope.commands.generate import question_id
from stepscope.trace import Trace

PROBLEMS = [{"id": "p1", "problem": "What is 2+3?"}, {"question": "Name a prime bigger than 10."},
            {"id": 7, "prompt": "hi"}]
FAST = ["--max-new-tokens", "6", "--temperature", "0", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    make_model("llama", layers=2).save_pretrained(d)
    make_tokenizer("think").save_pretrained(d)
    return str(d)


@pytest.fixture()
def problems(tmp_path):
    p = tmp_path / "problems.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS), encoding="utf-8")
    return p


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def without_timing(recs):
    for r in recs:
        r["meta"].pop("timing")
        r["trace"]["meta"].pop("timing")
    return recs


def test_single_question_streams_and_saves(model_dir, tmp_path, capsys):
    out = tmp_path / "one.jsonl"
    rc = main(["generate", "What is 2+3?", "--model", model_dir, "--out", str(out), "--no-stepflow", *FAST])
    assert rc == 0
    printed = capsys.readouterr()
    (rec,) = lines(out)
    assert printed.out == rec["response"] + "\n" and rec["response"]
    assert rec["id"] == question_id("What is 2+3?") and rec["question"] == "What is 2+3?"
    assert rec["meta"]["num_new_tokens"] == 6
    t = Trace.from_json(rec["trace"])
    assert len(t) == rec["meta"]["num_prompt_tokens"] + 6 and t.meta["config"]["stepflow"] is None
    assert "6 new tokens" in printed.err


def test_input_file_with_stepflow_knobs(model_dir, problems, capsys):
    rc = main(["generate", "--input", str(problems), "--model", model_dir, *FAST, "--tau-max", "0.5",
               "--alpha", "0.1", "--oeb-layers", "0", "--smi-layers=-1", "--smi-window", "step", "--quiet"])
    assert rc == 0
    out = problems.with_suffix(".traces.jsonl")
    recs = lines(out)
    assert [r["id"] for r in recs] == ["p1", "1", "7"]  # input order, ids from the file or the line number
    assert [r["question"] for r in recs] == ["What is 2+3?", "Name a prime bigger than 10.", "hi"]
    sf = recs[0]["meta"]["config"]["stepflow"]
    assert (sf["tau_max"], sf["alpha"], sf["oeb_layers"], sf["smi_layers"], sf["smi_window"]) == \
        (0.5, 0.1, [0], [-1], "step")
    assert recs[0]["meta"]["stepflow_stats"]["oeb_layers"] == [0]
    assert recs[0]["meta"]["stepflow_stats"]["smi_layers"] == [1]
    assert [r["meta"]["seed"] for r in recs] == [0, 1, 2]
    assert capsys.readouterr().out == ""  # nothing streamed for a file


def test_resume_skips_finished_ids_and_repairs_a_cut_line(model_dir, problems, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    args = ["generate", "--input", str(problems), "--model", model_dir, "--out", str(out), "--no-stepflow", *FAST]
    assert main(args) == 0
    full = out.read_text(encoding="utf-8").splitlines()
    want = without_timing(lines(out))
    # lose the last record and cut the middle one, as a crash would
    out.write_text(full[0] + "\n" + full[1][:50], encoding="utf-8")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "(1 done)" in err
    got = out.read_text(encoding="utf-8").splitlines()
    assert got[0] == full[0] and without_timing(lines(out)) == want  # the first record kept as it was
    assert main(args) == 0
    assert "already in" in capsys.readouterr().err


def test_resume_refuses_other_settings(model_dir, problems, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    base = ["generate", "--input", str(problems), "--model", model_dir, "--out", str(out), "--no-stepflow"]
    assert main(base + FAST) == 0
    capsys.readouterr()
    rc = main(base + FAST[:2] + ["--temperature", "0.5"] + FAST[4:])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after transformers' weight-loading bar)
    assert rc == 2 and last.startswith("stepscope generate: error:") and "other settings" in last
    assert "temperature" in last and "Traceback" not in err
    assert main(base + FAST[:2] + ["--temperature", "0.5"] + FAST[4:] + ["--overwrite", "--quiet"]) == 0
    assert all(r["meta"]["config"]["temperature"] == 0.5 for r in lines(out))


@pytest.mark.parametrize("extra, msg", [
    ([], "give a question or --input"),
    (["q", "--question", "q"], "give the question once"),
    (["q", "--no-stepflow", "--alpha", "0.1"], "--alpha given with --no-stepflow"),
    (["q", "--no-oeb", "--no-smi"], "use --no-stepflow"),
    (["q", "--oeb-layers", "3-1"], "--oeb-layers: the range '3-1' runs backwards"),
    (["q", "--smi-layers", "deep"], "--smi-layers: 'deep' needs the model's number of layers"),
    (["q", "--top-k", "-1"], "--top-k must be >= 0"),
    (["q", "--fmt", "markers"], "--fmt markers needs --markers"),
    (["q", "--markers", "<a>", "<a>"], "the start and end markers must differ"),
    (["q", "--tau-max", "1.5"], "tau_max"),
    (["q", "--top-p", "0"], "--top-p"),
    (["q", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["q", "--smi-window", "zero"], "smi_window"),
    (["q", "--no-stepflow", "--flow-kernel", "torch"], "--flow-kernel given with --no-stepflow"),
    (["q", "--tensor-parallel-size", "3"], "--engine vllm is needed for --tensor-parallel-size"),
    (["q", "--engine", "vllm", "--device", "cpu"], "--device applies to --engine transformers"),
])
def test_bad_arguments(extra, msg, capsys):
    rc = main(["generate", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_engine_vllm_without_vllm_is_one_line(command, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # `import vllm` fails as where it is absent
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"id": "a", "problem": "What is 1+1?", "answer": "2"}\n', encoding="utf-8")
    extra = ["q"] if command == "generate" else ["--benchmark", str(bench), "--out", str(tmp_path / "run")]
    rc = main([command, *extra, "--engine", "vllm", "--model", model_dir])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--engine vllm needs vLLM" in err
    assert "pip install 'stepscope[vllm]'" in err and not (tmp_path / "run").exists()


def test_bad_input_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    for content, msg in [(b'{"answer": 3}\n', "no question"), (b'{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n',
                                                               "appears twice"),
                         (b"\xff\xfe", "not valid UTF-8"), (b"", "no problems"), (b"{oops\n", "not valid JSON")]:
        bad.write_bytes(content)
        rc = main(["generate", "--input", str(bad)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (content, err)
    rc = main(["generate", "--input", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main(["generate", "q", "--out", str(tmp_path)])
    assert rc == 2 and "is a folder" in capsys.readouterr().err


def test_failure_before_the_first_trace_leaves_no_file(model_dir, tmp_path, capsys, monkeypatch):
    """An error raised while generating (here: a bad StepFlow kernel name from the environment) is one line,
    exit 2, and the --out file this run created is gone again."""
    monkeypatch.setenv("STEPSCOPE_FLOW_KERNEL", "fast")
    out = tmp_path / "never.jsonl"
    rc = main(["generate", "What is 2+3?", "--model", model_dir, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1] == ("stepscope generate: error: kernel must be auto, triton "
                                                        "or torch, got 'fast'")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_layer_options():
    """--oeb-layers / --smi-layers: inclusive ranges, lists, negative indices kept as written."""
    def config(*extra):
        return options.stepflow_config(build_parser().parse_args(["generate", "q", *extra]))

    assert config("--oeb-layers", "0-3", "--smi-layers=-3--1").oeb_layers == [0, 1, 2, 3]
    assert config("--oeb-layers", "0-3", "--smi-layers=-3--1").smi_layers == [-3, -2, -1]
    assert config("--oeb-layers", "0,2, 5-6").oeb_layers == [0, 2, 5, 6]
    assert config("--smi-layers", "7").smi_layers == [7]
    assert config().oeb_layers is None and config("--no-stepflow") is None


@pytest.mark.parametrize("kernel", [None, "torch"])
def test_flow_kernel_reaches_stepflow(kernel, model_dir, tmp_path, capsys, monkeypatch):
    """--flow-kernel pins StepFlow's decoding path; without it StepFlow reads $STEPSCOPE_FLOW_KERNEL / auto."""
    from stepscope.flow import stepflow

    seen = []
    init = stepflow.StepFlow.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self.kernel)

    monkeypatch.setattr(stepflow.StepFlow, "__init__", spy)
    monkeypatch.delenv("STEPSCOPE_FLOW_KERNEL", raising=False)
    extra = [] if kernel is None else ["--flow-kernel", kernel]
    rc = main(["generate", "What is 2+3?", "--model", model_dir, "--out", str(tmp_path / "o.jsonl"), *FAST, *extra])
    assert rc == 0 and seen == [kernel or "auto"]
    with pytest.raises(SystemExit) as e:  # argparse: usage and the error, exit 2
        main(["generate", "q", "--flow-kernel", "cuda"])
    assert e.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err
