"""`stepscope saliency` rerun on the same --out: finished traces are skipped (and said so), --overwrite recomputes
them, and a finished folder of other settings or another trace is refused before any work."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from tiny import make_model, make_tokenizer

from stepscope.cli import main
from stepscope.saliency import SaliencyResult
from stepscope.trace import Trace

RESP = ("First, add the numbers in the question. Three plus four equals seven here. Then double it, which gives "
        "fourteen.\n</think>\n\nThe answer is fourteen.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer("think")
    d = tmp_path_factory.mktemp("rerun")
    make_model("llama", vocab_size=len(tok), layers=2).save_pretrained(d / "m")
    tok.save_pretrained(d / "m")
    for name, q in (("one", "What is (3 + 4) * 2?"), ("two", "What is 7 * 2?")):
        Trace.from_text(tok, question=q, response=RESP, meta={"id": name}).save(d / f"{name}.json")
    return d


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _stamps(out):
    return {p.name: (p / "maps.safetensors").stat().st_mtime_ns for p in out.iterdir()}


def test_rerun_skips_finished_traces(setup, tmp_path):
    d = setup
    out = tmp_path / "sal"
    base = ["--model", str(d / "m"), "--out", str(out), "--device", "cpu", "--dtype", "float32", "--no-progress"]
    rc, stdout, err = _cli(["saliency", str(d / "one.json"), *base])
    assert rc == 0, err
    first = _stamps(out)
    maps = SaliencyResult.load(out / "one").maps

    # the same command again: nothing recomputed, and it says so
    rc, stdout, err = _cli(["saliency", str(d / "one.json"), *base])
    assert rc == 0, err
    assert "one: already done, skipped" in stdout and "pass --overwrite" in stdout
    assert _stamps(out) == first

    # a new trace beside a finished one: only the new one is computed
    rc, stdout, err = _cli(["saliency", str(d / "one.json"), str(d / "two.json"), *base])
    assert rc == 0, err
    assert "one: already done, skipped" in stdout and "two: " in stdout and "1 trace," in stdout
    now = _stamps(out)
    assert now["one"] == first["one"] and set(now) == {"one", "two"}

    # --overwrite recomputes, to the same maps
    rc, stdout, err = _cli(["saliency", str(d / "one.json"), *base, "--overwrite"])
    assert rc == 0, err
    assert "skipped" not in stdout and _stamps(out)["one"] != first["one"]
    torch.testing.assert_close(SaliencyResult.load(out / "one").maps, maps, rtol=0, atol=0)


def test_rerun_with_other_settings_or_trace_is_refused(setup, tmp_path):
    d = setup
    out = tmp_path / "sal"
    base = ["--model", str(d / "m"), "--out", str(out), "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert _cli(["saliency", str(d / "one.json"), *base])[0] == 0
    first = _stamps(out)
    rc, _, err = _cli(["saliency", str(d / "one.json"), *base, "--loss", "summary"])
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "one" in last and "loss" in last and "--overwrite" in last
    assert _stamps(out) == first
    # another trace of the same id
    other = json.loads((d / "two.json").read_text(encoding="utf-8"))
    other["meta"]["id"] = "one"
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    rc, _, err = _cli(["saliency", str(tmp_path / "other.json"), *base])
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "another trace" in last and "--overwrite" in last
    assert _stamps(out) == first
    # --overwrite replaces it
    rc, _, err = _cli(["saliency", str(tmp_path / "other.json"), *base, "--overwrite"])
    assert rc == 0, err
    assert SaliencyResult.load(out / "one").trace.token_ids == other["token_ids"]
