"""What a new user hits (issue 27): ids that collide, errors that point the wrong way, contradictory flags,
wording of counts. Each test drives the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_cli_errors
from test_cli_errors import FAST, RESP, cli
from tiny import make_tokenizer

import stepscope
from stepscope.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max-new-tokens", "5", "--temperature", "0", *FAST]
work, no_model_loading = test_cli_errors.work, test_cli_errors.no_model_loading  # the fixtures, shared


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr (no header, no usage, no traceback), holding every needle."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "Traceback" not in err and lines[0].startswith("stepscope "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- 1. ids that collide ---------------------------------------------------------------------------------------


def test_generate_single_questions_get_their_own_ids(work, tmp_path):
    out = tmp_path / "mine.jsonl"
    m = ["--model", str(work / "model"), *GEN, "--out", str(out)]
    assert cli(["generate", "What is 2 plus 3?", *m])[0] == 0
    rc, _, err = cli(["generate", "What is 7 times 8?", *m])
    assert rc == 0 and "already" not in err, err
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in recs] == ["What is 7 times 8?", "What is 2 plus 3?"]  # both kept
    assert len({r["id"] for r in recs}) == 2
    rc, _, err = cli(["generate", "What is 2 plus 3?", *m])  # the same question again: resumed, not redone
    assert rc == 0 and "already" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_generate_refuses_another_question_under_an_id_on_resume(work, tmp_path):
    problems, out = tmp_path / "p.jsonl", tmp_path / "p.traces.jsonl"
    problems.write_text(json.dumps({"question": "What is 2 plus 3?"}) + "\n", encoding="utf-8")
    m = ["--model", str(work / "model"), *GEN, "--input", str(problems), "--out", str(out)]
    assert cli(["generate", *m, "--quiet"])[0] == 0
    before = out.read_bytes()
    problems.write_text(json.dumps({"question": "What is 7 times 8?"}) + "\n", encoding="utf-8")  # same id 0
    one_line_error(*cli(["generate", *m])[::2], "another question under id '0'", "--overwrite")
    assert out.read_bytes() == before


def test_saliency_name_by_content_keeps_two_traces_of_one_id(work, tmp_path):
    tok = make_tokenizer("think")
    other = RESP.replace("fourteen", "fifteen")
    Trace.from_text(tok, question="What is (3 + 4) * 2?", response=other, meta={"id": "one"}).save(tmp_path / "b.json")
    out = tmp_path / "sal"
    m = ["--model", str(work / "model"), *FAST, "--out", str(out), "--no-progress"]
    assert cli(["saliency", str(work / "one.json"), *m])[0] == 0
    one_line_error(*cli(["saliency", str(tmp_path / "b.json"), *m])[::2], "another trace", "--name-by content")
    for f in (work / "one.json", tmp_path / "b.json"):
        rc, _, err = cli(["saliency", str(f), *m, "--name-by", "content"])
        assert rc == 0, err
    named = sorted(p.name for p in out.iterdir() if p.name.startswith("one-"))
    assert len(named) == 2 and all(len(n) == len("one-") + 8 for n in named)
    rc, printed, _ = cli(["saliency", str(tmp_path / "b.json"), *m, "--name-by", "content"])
    assert rc == 0 and "already done, skipped" in printed  # a rerun finds its own folder


# -- 4. errors that point the right way ------------------------------------------------------------------------


def test_saliency_on_plain_text_says_not_json(work, tmp_path, no_model_loading):
    f = tmp_path / "trace.txt"
    f.write_text("The answer is 7. I added three and four.\n", encoding="utf-8")
    one_line_error(*cli(["saliency", str(f), "--model", str(work / "model"), "--out", str(tmp_path / "s")])[::2],
                   "not JSON or JSONL", "stepscope trace")


def test_diagnose_and_compare_on_a_file_say_it_is_a_file(work):
    for argv in (["diagnose", str(work / "one.json")],
                 ["compare", "--correct", str(work / "one.json"), "--wrong", str(work / "one.json"), "--out",
                  str(work / "cmp")]):
        one_line_error(*cli(argv)[::2], "is a file, not a saliency result folder")


def test_eval_on_an_empty_data_file_says_it_is_empty(work, tmp_path, no_model_loading):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    for bench in ("livecodebench", "gsm8k"):
        rc, _, err = cli(["eval", "--benchmark", bench, "--data-file", str(empty), "--out", str(tmp_path / "r")])
        line = one_line_error(rc, err, "the file is empty")
        assert "release" not in line and "window" not in line


def test_livecodebench_offline_is_detected_before_retrying(tmp_path):
    """An unreachable hub (nothing listens on the endpoint) is one line at once, not ~25 s of retries."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(stepscope.__file__).parents[1])}  # the stepscope under test
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
              "ALL_PROXY"):
        env.pop(k, None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "stepscope.cli", "eval", "--benchmark", "livecodebench", "--out",
                        str(tmp_path / "r")], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    one_line_error(p.returncode, p.stderr, "unreachable (offline)", "--data-file")
    assert "Retrying" not in p.stderr, f"retried for {seconds:.0f} s"  # the hub client retries with backoff


# -- 5. contradictory flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needles", [
    (["generate", "q", "--stepflow", "--no-stepflow"], ["--stepflow and --no-stepflow"]),
    (["generate", "q", "--no-stepflow", "--stepflow"], ["--stepflow and --no-stepflow"]),
    (["generate", "q", "--fmt", "think", "--markers", "A", "B"], ["--fmt think", "--markers"]),
    (["trace", "{recs}", "--fmt", "auto", "--markers", "A", "B"], ["--fmt auto", "--markers"]),
    (["saliency", "{one}", "--fmt", "harmony", "--markers", "A", "B", "--out", "{tmp}/s"], ["--fmt harmony"]),
    (["eval", "--summarize", "--resume", "--out", "{tmp}/r"], ["--summarize and --resume"]),
    (["eval", "--table", "{tmp}", "--summarize"], ["--table and --summarize"]),
    (["eval", "--benchmark", "{bench}", "--device", "cpu", "--device-map", "auto", "--out", "{tmp}/r"],
     ["--device and --device-map"]),
])
def test_contradictory_flags_are_refused_in_one_line(work, tmp_path, no_model_loading, argv, needles):
    argv = [a.format(recs=work / "recs.jsonl", one=work / "one.json", bench=work / "bench.jsonl", tmp=tmp_path)
            for a in argv]
    if argv[0] in ("generate", "trace", "saliency"):
        argv += ["--model", str(work / "model")]
    one_line_error(*cli(argv)[::2], *needles)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_the_flags_alone_still_work(work, tmp_path):
    """--markers alone (or with --fmt markers) and a lone --stepflow or --no-stepflow are accepted."""
    for extra in (["--markers", "<think>", "</think>"], ["--fmt", "markers", "--markers", "<think>", "</think>"]):
        rc, _, err = cli(["trace", str(work / "recs.jsonl"), "--model", str(work / "model"), *extra])
        assert rc == 0, err
    for flag in ("--stepflow", "--no-stepflow"):
        rc, _, err = cli(["generate", "What is 2 plus 3?", "--model", str(work / "model"), *GEN, flag])
        assert rc == 0, err


# -- 8. what the docs promise for eval --device-map ------------------------------------------------------------


def test_eval_device_map_with_stepflow_arms_is_refused_before_loading(work, tmp_path, no_model_loading):
    base = ["eval", "--benchmark", str(work / "bench.jsonl"), "--model", str(work / "model"), "--device-map", "auto",
            "--out", str(tmp_path / "r")]
    one_line_error(*cli(base)[::2], "--device-map", "StepFlow", "arms stepflow")
    one_line_error(*cli([*base, "--arms", "baseline,oeb"])[::2], "arms oeb")
    assert not (tmp_path / "r").exists()
