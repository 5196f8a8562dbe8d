"""What a new user hits: unwritable outputs, options checked before any work, bad model paths, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer

from stepscope import models
from stepscope.cli import main
from stepscope.commands import options
from stepscope.errors import StepscopeError
from stepscope.io import check_writable
from stepscope.trace import Trace

RESP = ("First, add the numbers in the question. Three plus four equals seven here. Then double it, which gives "
        "fourteen.\n</think>\n\nThe answer is fourteen.")
FAST = ["--device", "cpu", "--dtype", "float32"]


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """The error of a failed command: exit 2, one line, no traceback, holding every needle."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and lines, (rc, err)
    assert "Traceback" not in err and lines[-1].startswith("stepscope "), err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model folder, a trace JSON, a records file, a saliency result and a regular file to write under."""
    d = tmp_path_factory.mktemp("work")
    tok = make_tokenizer("think")
    make_model("llama", vocab_size=len(tok), layers=2).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    Trace.from_text(tok, question="What is (3 + 4) * 2?", response=RESP, meta={"id": "one"}).save(d / "one.json")
    (d / "recs.jsonl").write_text(json.dumps({"id": "r", "question": "What is 3 + 4?", "response": RESP}) + "\n",
                                  encoding="utf-8")
    (d / "bench.jsonl").write_text(json.dumps({"question": "What is 3 + 4?", "answer": "7"}) + "\n",
                                   encoding="utf-8")
    rc, _, err = cli(["saliency", str(d / "one.json"), "--model", str(d / "model"), "--out", str(d / "sal"),
                      "--no-progress", *FAST])
    assert rc == 0, err
    (d / "afile").write_text("not a folder\n", encoding="utf-8")
    return d


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Loading weights (or running the demo) fails the test: what is checked must be checked before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(options, "load_model", refuse)
    import stepscope.demo

    monkeypatch.setattr(stepscope.demo, "run_demo", refuse)


# -- check_writable --------------------------------------------------------------------------------------------


def test_check_writable_cases(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x", encoding="utf-8")
    ok = [(tmp_path / "new.jsonl", False), (tmp_path / "a" / "b" / "new.jsonl", False), (tmp_path, True),
          (tmp_path / "new-dir", True), (f, False)]
    for path, folder in ok:
        assert check_writable(path, "--out", folder=folder) == path
    assert not (tmp_path / "a").exists()  # nothing is created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no probe left behind
    bad = [(f / "out.jsonl", False, "is a file, not a folder"), (f / "x" / "y", True, "is a file, not a folder"),
           (tmp_path, False, "is a folder, expected a file"), (f, True, "is a file, expected a folder"),
           (Path("/proc/stepscope-test/out.jsonl"), False, "cannot create files in /proc")]
    for path, folder, why in bad:
        with pytest.raises(StepscopeError, match="--out ") as e:
            check_writable(path, "--out", folder=folder)
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- item 2: every command checks its output before the work -------------------------------------------------


def _commands(d: Path, bad: str) -> dict[str, list[str]]:
    m = ["--model", str(d / "model"), *FAST]
    return {
        "trace": ["trace", str(d / "recs.jsonl"), "--model", str(d / "model"), "--out", bad + ".jsonl"],
        "generate": ["generate", "What is 2+3?", *m, "--max-new-tokens", "4", "--out", bad + ".jsonl"],
        "saliency": ["saliency", str(d / "one.json"), *m, "--out", bad],
        "report": ["report", str(d / "sal"), "--out", bad + ".html"],
        "report --figures": ["report", str(d / "sal"), "--out", str(d / "ok.html"), "--figures", bad],
        "compare": ["compare", "--correct", str(d / "sal"), "--wrong", str(d / "sal"), "--out", bad],
        "diagnose --save-profile": ["diagnose", str(d / "sal"), "--no-write", "--save-profile", bad + ".json"],
        "eval": ["eval", "--benchmark", str(d / "bench.jsonl"), *m, "--max-new-tokens", "4", "--out", bad],
        "demo": ["demo", "--out", bad],
    }


@pytest.mark.parametrize("command", list(_commands(Path("."), "x")))
def test_unwritable_out_is_one_line_before_any_work(work, command, no_model_loading):
    for bad in [str(work / "afile" / "out"), "/proc/stepscope-test/out"]:
        rc, _, err = cli(_commands(work, bad)[command])
        one_line_error(rc, err, "cannot be written")
    assert not (work / "ok.html").exists()


def test_out_of_the_wrong_kind(work, no_model_loading):
    """A folder where a file is expected, and a file where a folder is."""
    rc, _, err = cli(["generate", "q", "--model", str(work / "model"), "--out", str(work)])
    one_line_error(rc, err, "is a folder")
    rc, _, err = cli(["saliency", str(work / "one.json"), "--model", str(work / "model"), "--out",
                      str(work / "afile")])
    one_line_error(rc, err, "is a file, expected a folder")


# -- item 3: eval and generate check everything before the first forward -------------------------------------


def test_eval_checks_layers_before_loading_and_leaves_nothing(work, tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["eval", "--benchmark", str(work / "bench.jsonl"), "--model", str(work / "model"), *FAST,
            "--max-new-tokens", "4", "--temperature", "0", "--no-progress", "--out", str(out)]
    with monkeypatch.context() as mp:
        mp.setattr(options, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
        rc, _, err = cli([*base, "--oeb-layers=-40"])
        one_line_error(rc, err, "--oeb-layers", "-40", "the model has 2 layers")
        assert not out.exists()
        rc, _, err = cli([*base, "--smi-layers", "5"])
        one_line_error(rc, err, "--smi-layers", "out of range")
        rc, _, err = cli([*base, "--n-samples", "0"])
        assert one_line_error(rc, err, "--n-samples") == err.strip()  # no header line before it
        assert not out.exists()
    # the fixed settings run, also as --resume of the failed attempt
    rc, _, err = cli([*base, "--oeb-layers=-1", "--resume"])
    assert rc == 0, err
    assert (out / "run.json").exists() and (out / "summary.json").exists()


def test_eval_refuses_an_existing_run_before_loading(work, tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["eval", "--benchmark", str(work / "bench.jsonl"), "--model", str(work / "model"), *FAST,
            "--max-new-tokens", "4", "--temperature", "0", "--no-progress", "--arms", "baseline", "--out", str(out)]
    assert cli(base)[0] == 0
    monkeypatch.setattr(options, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    one_line_error(*cli(base)[::2], "already holds a run")
    one_line_error(*cli([*base, "--resume", "--seed", "5"])[::2], "settings differ")


def test_generate_checks_layers_before_loading(work, tmp_path, no_model_loading):
    out = tmp_path / "g.jsonl"
    rc, _, err = cli(["generate", "What is 2+3?", "--model", str(work / "model"), *FAST, "--oeb-layers", "7",
                      "--out", str(out)])
    one_line_error(rc, err, "--oeb-layers", "out of range")
    assert not out.exists()


# -- item 5: bad model paths ---------------------------------------------------------------------------------


def test_looks_local():
    for name in ["/models/x", "./x", "../x", "~/x", "a/b/c", "x/", "a b/c"]:
        assert models.looks_local(name), name
    for name in ["gpt2", "org/model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-0.5B"]:
        assert not models.looks_local(name), name


def test_bad_model_paths_are_one_line_at_once(work, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / f).write_bytes((work / "model" / f).read_bytes())
    cases = [("/nonexistent/model", "no such folder"), (str(tmp_path / "missing"), "no such folder"),
             (str(empty), "no config.json"), (str(work / "afile"), "it is a file"), (str(no_weights), "no weights")]
    for name, why in cases:
        with pytest.raises(models.ModelLoadError, match=why):
            models.load_model(name, device="cpu")
        rc, _, err = cli(["generate", "q", "--model", name, *FAST])
        one_line_error(rc, err, why)
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        models.load_tokenizer(str(empty))
    assert models.load_tokenizer(str(no_weights)) is not None  # a tokenizer needs no weights


def test_hub_id_offline_is_one_line_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    t0 = time.perf_counter()
    rc, _, err = cli(["generate", "q", "--model", "nobody-here/no-such-model", *FAST])
    line = one_line_error(rc, err, "unreachable", "--model /path/to/folder")
    assert time.perf_counter() - t0 < 10, line


def test_trace_checks_model_also_for_trace_json(work):
    rc, _, err = cli(["trace", str(work / "one.json"), "--model", "/nonexistent"])
    one_line_error(rc, err, "no such folder")
    rc, _, err = cli(["trace", str(work / "one.json")])
    assert rc == 0, err


def test_offline_detection_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    assert models.hub_offline()



# -- item 6: the CLI speaks of its options; saliency reads --fmt/--markers; an unknown response field --------


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
    """A model whose chat template knows no thinking markers."""
    d = tmp_path_factory.mktemp("chatml-model")
    tok = make_tokenizer("chatml")
    make_model("llama", vocab_size=len(tok), layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_format_errors_name_the_cli_options(chatml_model, tmp_path):
    from stepscope.errors import TraceError
    from stepscope.trace import load_traces

    recs = tmp_path / "plain.jsonl"
    recs.write_text(json.dumps({"question": "What is 3 + 4?", "response": "Three and four. Seven."}) + "\n",
                    encoding="utf-8")
    with pytest.raises(TraceError, match=r"fmt='think'.*markers=\(start, end\)"):  # the library: parameters
        load_traces(recs, make_tokenizer("chatml"))
    rc, _, err = cli(["trace", str(recs), "--model", str(chatml_model)])
    line = one_line_error(rc, err, "--fmt think or --fmt harmony", "--markers START END")
    assert "fmt='" not in line and "markers=(" not in line


def test_saliency_reads_fmt_and_markers(work, tmp_path):
    recs = tmp_path / "custom.jsonl"
    resp = RESP.replace("</think>", "</reason>")
    recs.write_text(json.dumps({"id": "c", "question": "What is 3 + 4?", "response": "<reason>" + resp}) + "\n",
                    encoding="utf-8")
    base = ["saliency", str(recs), "--model", str(work / "model"), "--no-progress", *FAST]
    rc, _, err = cli([*base, "--out", str(tmp_path / "auto")])  # read as <think>: the thinking never closes
    assert rc == 0, err
    assert not Trace.load(tmp_path / "auto" / "c" / "trace.json").steps_of("summary")
    rc, _, err = cli([*base, "--markers", "<reason>", "</reason>", "--out", str(tmp_path / "sal")])
    assert rc == 0, err
    trace = Trace.load(tmp_path / "sal" / "c" / "trace.json")
    assert trace.fmt == "markers" and trace.steps_of("thinking") and trace.steps_of("summary")
    rc, _, err = cli([*base, "--fmt", "markers", "--out", str(tmp_path / "x")])
    one_line_error(rc, err, "--fmt markers needs --markers START END")


def test_a_response_under_an_unknown_name_is_an_error(work, chatml_model, tmp_path):
    recs = tmp_path / "renamed.jsonl"
    # "text" holds the question again; the response is under a name stepscope does not know. A chat model's
    # template (like the bundled SmolLM2's) opens no thinking, so the trace would be all question
    recs.write_text(json.dumps({"question": "What is 3 + 4?", "model_reply": RESP, "text": "What is 3 + 4?"})
                    + "\n", encoding="utf-8")
    rc, _, err = cli(["trace", str(recs), "--model", str(chatml_model), "--fmt", "think"])
    one_line_error(rc, err, str(recs), "field 'text'", "all question", "response/output/completion",
                   "model_reply")
    recs.write_text(json.dumps({"question": "What is 3 + 4?", "model_reply": RESP}) + "\n", encoding="utf-8")
    rc, _, err = cli(["trace", str(recs), "--model", str(work / "model")])
    one_line_error(rc, err, str(recs), "no response field", "response/output/completion", "model_reply")


# -- item 10: trace files, --block-rows, interrupts, tables, null scores, stats keys -------------------------


def test_a_bad_step_kind_is_one_line_naming_file_and_field(work, tmp_path):
    d = json.loads((work / "one.json").read_text(encoding="utf-8"))
    d["steps"][1]["kind"] = "banana"
    bad = tmp_path / "banana.json"
    bad.write_text(json.dumps(d), encoding="utf-8")
    rc, _, err = cli(["trace", str(bad)])
    one_line_error(rc, err, str(bad), "steps[1].kind", "'banana'")
    del d["steps"][1]["kind"]
    bad.write_text(json.dumps(d), encoding="utf-8")
    rc, _, err = cli(["saliency", str(bad), "--model", str(work / "model"), "--out", str(tmp_path / "s"), *FAST])
    one_line_error(rc, err, str(bad), "no field 'kind'")


def test_an_edited_token_id_is_detected_on_load(work, tmp_path):
    from stepscope.errors import TraceError

    d = json.loads((work / "one.json").read_text(encoding="utf-8"))
    t = len(d["token_ids"]) - 3
    d["token_ids"][t] = (d["token_ids"][t] + 1) % 256 + 300
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(d), encoding="utf-8")
    tok = make_tokenizer("think")
    Trace.load(work / "one.json", tok)  # the untouched trace passes
    with pytest.raises(TraceError, match=rf"^{bad}: token_ids\[{t}\]: id \d+ spells"):
        Trace.load(bad, tok)
    rc, _, err = cli(["saliency", str(bad), "--model", str(work / "model"), "--out", str(tmp_path / "s"), *FAST])
    one_line_error(rc, err, str(bad), f"token_ids[{t}]", "disagree")
    assert not (tmp_path / "s").exists()
    rc, _, err = cli(["trace", str(bad), "--model", str(work / "model")])
    one_line_error(rc, err, f"token_ids[{t}]")


def test_block_rows_must_be_positive(work, tmp_path, capsys):
    from stepscope.saliency import step_saliency
    from stepscope.saliency.core import SaliencyError

    with pytest.raises(SystemExit) as e:
        main(["saliency", str(work / "one.json"), "--out", str(tmp_path / "s"), "--block-rows", "0"])
    assert e.value.code == 2 and "--block-rows: must be at least 1" in capsys.readouterr().err
    model = make_model("llama", vocab_size=len(make_tokenizer("think")), layers=2)
    for bad in (0, -3, 2.5):
        with pytest.raises(SaliencyError, match="block_rows"):
            step_saliency(model, Trace.load(work / "one.json"), block_rows=bad)


def test_generate_interrupted_says_how_to_continue(work, tmp_path, monkeypatch):
    import stepscope.flow.generate as fg

    real = fg.generate_traces
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?"}) + "\n"
                                for i in range(3)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--input", str(problems), "--out", str(out), "--model", str(work / "model"), *FAST,
            "--max-new-tokens", "3", "--temperature", "0", "--batch-size", "1", "--quiet"]

    def interrupted_after_one_batch(*a, on_batch, **k):
        def save_then_stop(traces):
            on_batch(traces)
            raise KeyboardInterrupt

        return real(*a, on_batch=save_then_stop, **k)

    with monkeypatch.context() as mp:
        mp.setattr(fg, "generate_traces", interrupted_after_one_batch)
        rc, _, err = cli(argv)
    assert rc == 130
    assert "1 of 3 traces are in " + str(out) in err and "run the same command again to continue" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1
    rc, _, err = cli(argv)
    assert rc == 0, err
    assert [json.loads(x)["id"] for x in out.read_text(encoding="utf-8").splitlines()] == ["p0", "p1", "p2"]


def test_paper_table_keeps_two_runs_of_one_model_and_benchmark_apart():
    from stepscope.evaluate.summary import paper_table, summarize

    info = {"model": "org/Model-7B", "benchmark": "aime24", "n_samples": 1, "n_problems": 2,
            "arms": {"baseline": None, "stepflow": {}}, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 100}

    def run(correct):  # [(baseline, stepflow)] per problem
        return summarize([{"problem_id": p, "sample": 0, "arm": arm, "correct": bool(ok), "thinking_closed": True,
                           "new_tokens": 10, "thinking_tokens": 8}
                          for p, pair in zip("ab", correct) for arm, ok in zip(("baseline", "stepflow"), pair)], info)

    a, b = run([(1, 1), (0, 1)]), run([(0, 0), (0, 1)])
    table = paper_table([a, b], labels=["runs/t06", "runs/t10"])
    assert "| Model-7B (runs/t06), baseline → StepFlow | 50.0 → 100.0 |" in table
    assert "| Model-7B (runs/t10), baseline → StepFlow | 0.0 → 50.0 |" in table
    assert "(run 2)" in paper_table([a, b])
    single = paper_table([a], labels=["runs/t06"])
    assert "| Model-7B, baseline → StepFlow | 50.0 → 100.0 |" in single  # one run: no label


def test_null_scores_print_their_reason(work, tmp_path):
    import numpy as np

    import stepscope.diagnose as dg
    from stepscope.diagnose.diagnosis import format_scores

    maps = np.tril(np.random.default_rng(0).random((4, 3, 3))).astype("float32")
    d = dg.diagnose(maps, step_kinds=["question", "summary", "summary"])
    assert d.scores["lock_in_score"] is None
    line = format_scores(d)
    for name in dg.SCORES:
        assert d.scores[name] is not None or f"{name}=null ({d.reasons[name]})" in line, name
    rc, out, err = cli(["diagnose", str(work / "sal"), "--summary-only", "--no-write"])
    assert rc == 0, err
    shown = dg.diagnose(work / "sal" / "one")
    for name in dg.SCORES:
        if shown.scores[name] is None:
            assert f"{name}=null ({shown.reasons[name]})" in out


def test_stepflow_stats_json_keys_round_trip():
    from stepscope.flow import StepFlowStats

    st = StepFlowStats(oeb_layers=[0, 1], smi_layers=[3], oeb_fires={0: 5, 1: 0}, oeb_eligible={0: 9, 1: 4},
                       bridge_mass_before={0: 0.1, 1: 0.2}, bridge_mass_after={0: 0.15, 1: 0.2},
                       group_mass_before={0: 0.5, 1: 0.4}, group_mass_after={0: 0.45, 1: 0.4}, smi_fires={3: 7},
                       forwards=3, tokens=12, rows=1, rows_with_thinking=1)
    d = json.loads(json.dumps(st.to_json()))
    assert d["oeb_fires"] == {"0": 5, "1": 0}  # JSON keys are strings (documented)
    back = StepFlowStats.from_json(d)
    assert back == st and back.oeb_fires[0] == 5 and back.smi_fires[3] == 7
    with pytest.raises(StepscopeError, match="not StepFlow stats"):
        StepFlowStats.from_json({"oeb_fires": {"x": 1}})
