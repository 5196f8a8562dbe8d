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

