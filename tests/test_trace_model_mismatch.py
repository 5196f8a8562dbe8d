"""Records that name the model that wrote them, rebuilt with another model's tokenizer and chat template: `trace`
and `saliency` warn once and say how to pass --model; with the named model's tokenizer they stay quiet."""

from __future__ import annotations

import contextlib
import io
import json

from tiny import make_model, make_tokenizer

from stepscope.cli import main

RESP = ("First, add the numbers in the question. Three plus four equals seven here. Then double it, which gives "
        "fourteen.\n</think>\n\nThe answer is fourteen.")
R1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _records(path, model):
    recs = [{"id": f"r{i}", "model": model, "problem": "What is (3 + 4) * 2?", "response": RESP} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def _warnings(err):
    return [line for line in err.splitlines() if "warning:" in line]


def test_trace_warns_once_when_records_name_another_model(tmp_path):
    rc, _, err = _cli(["trace", str(_records(tmp_path / "r1.jsonl", R1))])
    assert rc == 0, err
    (w,) = _warnings(err)  # one warning for three records
    assert w.startswith("stepscope trace: warning:") and R1 in w and f"--model {R1}" in w
    assert "SmolLM2" in w or "default" in w


def test_trace_is_quiet_for_its_own_model(tmp_path):
    rc, _, err = _cli(["trace", str(_records(tmp_path / "smol.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct"))])
    assert rc == 0 and not _warnings(err), err
    # a local folder named after the records' model is that model
    folder = tmp_path / "DeepSeek-R1-Distill-Qwen-1.5B"
    tok = make_tokenizer("think")
    tok.save_pretrained(folder)
    make_model("llama", vocab_size=len(tok), layers=1).config.save_pretrained(folder)
    rc, _, err = _cli(["trace", str(_records(tmp_path / "r1.jsonl", R1)), "--model", str(folder)])
    assert rc == 0 and not _warnings(err), err
    # trace JSON keeps its tokens: nothing is rebuilt, nothing to warn about
    rc, _, err = _cli(["trace", str(tmp_path / "r1.jsonl"), "--model", str(folder), "--out", str(tmp_path / "t.jsonl")])
    assert rc == 0, err
    rc, _, err = _cli(["trace", str(tmp_path / "t.jsonl")])
    assert rc == 0 and not _warnings(err), err


def test_saliency_warns_too(tmp_path):
    tok = make_tokenizer("think")
    make_model("llama", vocab_size=len(tok), layers=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc, _, err = _cli(["saliency", str(_records(tmp_path / "r1.jsonl", R1)), "--model", str(tmp_path / "m"),
                       "--out", str(tmp_path / "sal"), "--device", "cpu", "--no-progress"])
    assert rc == 0, err
    (w,) = _warnings(err)
    assert w.startswith("stepscope saliency: warning:") and f"--model {R1}" in w
