"""`stepscope saliency` and bench/saliency_scale.py: outputs, summaries, one-line errors, nothing half-written."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from stepscope.cli import main
from stepscope.saliency import SaliencyResult, step_saliency
from stepscope.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
RESP = ("First, add the numbers in the question. Three plus four equals seven here. Then double it, which gives "
        "fourteen.\n</think>\n\nThe answer is fourteen.")
RESP_OPEN = "First, add the numbers in the question. Three plus four equals seven here. Then double"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = make_tokenizer("think")
    d = tmp_path_factory.mktemp("model")
    make_model("llama", vocab_size=len(tok), layers=4).save_pretrained(d / "m")
    tok.save_pretrained(d / "m")
    short = make_model("llama", vocab_size=len(tok), layers=2, max_position_embeddings=40)
    short.save_pretrained(d / "short")
    tok.save_pretrained(d / "short")
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tok = make_tokenizer("think")
    d = tmp_path_factory.mktemp("inputs")
    tr = Trace.from_text(tok, question="What is (3 + 4) * 2?", response=RESP, meta={"id": "one"})
    tr.save(d / "one.json")
    recs = [{"id": "a/b ../x", "problem": "What is 3 + 4?", "response": RESP},
            {"id": "open", "problem": "What is 3 + 4?", "response": RESP_OPEN}]
    (d / "recs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return d, tr


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_writes_one_folder_per_trace(tmp_path, model_dir, inputs):
    d, tr = inputs
    out = tmp_path / "sal"
    rc, stdout, stderr = _cli(["saliency", str(d / "one.json"), str(d / "recs.jsonl"), "--model",
                               str(model_dir / "m"), "--out", str(out), "--device", "cpu", "--dtype", "float32",
                               "--layers", "shallow,deep", "--no-progress"])
    assert rc == 0, stderr
    assert "memory estimate" in stdout and "brute-force reference would need" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_b_.._x", "one", "open"]
    for name in names:
        assert f"{name}: " in stdout  # a summary line per trace
        res = SaliencyResult.load(out / name)
        assert res.maps.shape == (2, res.trace.num_steps, res.trace.num_steps)
        assert res.meta["layers"] == [0, 3] and res.meta["model"] == str(model_dir / "m")
    # the CLI gives the same maps as the library
    from stepscope.models import load_model

    model, _ = load_model(str(model_dir / "m"), device="cpu", dtype="float32")
    lib = step_saliency(model, tr, layers=[0, 3])
    torch.testing.assert_close(SaliencyResult.load(out / "one").maps, lib.maps, rtol=1e-6, atol=0)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, model_dir, inputs):
    d, _ = inputs
    out = tmp_path / "sal"
    # a trace longer than the model's context
    rc, _, stderr = _cli(["saliency", str(d / "one.json"), "--model", str(model_dir / "short"), "--out", str(out),
                          "--device", "cpu", "--no-progress"])
    last = stderr.strip().splitlines()[-1]  # (transformers prints its loading bar above)
    assert rc == 2 and last.startswith("stepscope saliency: error: trace one has 60 tokens, more than the model's "
                                       "context of 40")
    assert not out.exists()
    # summary loss with one trace lacking a summary: refused before any trace is computed
    rc, _, stderr = _cli(["saliency", str(d / "recs.jsonl"), "--model", str(model_dir / "m"), "--out", str(out),
                          "--device", "cpu", "--loss", "summary", "--no-progress"])
    assert rc == 2 and "needs a summary" in stderr and "(trace open)" in stderr
    assert not out.exists()
    rc, _, stderr = _cli(["saliency", str(d / "missing.json"), "--out", str(out)])
    assert rc == 2 and "no such file" in stderr
    rc, _, stderr = _cli(["saliency", str(d / "one.json"), "--model", str(model_dir / "m"), "--out", str(out),
                          "--device", "cpu", "--layers", "7"])
    assert rc == 2 and "out of range" in stderr


def test_parse_layers():
    """The --layers rules (the one parser, stepscope.layers) on a 30-layer model."""
    from stepscope.errors import StepscopeError
    from stepscope.layers import parse_layers

    assert parse_layers("all", 30) is None
    assert parse_layers("shallow", 30) == list(range(7))
    assert parse_layers("deep", 30) == list(range(23, 30))
    assert parse_layers("0,3, 10-12,-1", 30) == [0, 3, 10, 11, 12, 29]
    assert parse_layers("shallow,deep", 2) == [0, 1]
    for bad in ("x", "3-40", "1..2"):
        with pytest.raises(StepscopeError):
            parse_layers(bad, 30)


def test_bench_script_tiny(tmp_path, monkeypatch):
    """The benchmark loop end to end on a tiny model (measurements in-process instead of subprocesses)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import saliency_scale as B

    def in_process(args, method, T, timeout, save_maps=None):
        a = B.argparse.Namespace(shape=args.shape, method=method, T=T, save_maps=save_maps)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            B.worker(a)
        return json.loads(next(x for x in buf.getvalue().splitlines() if x.startswith("RESULT "))[7:])

    monkeypatch.setattr(B, "measure_cpu_subprocess", in_process)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = B.main(["--device", "cpu", "--shape", "tiny", "--lengths", "40,80", "--methods", "reference,chunked",
                     "--reference-max", "40", "--out-dir", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "saliency_cpu_tiny.json").read_text())
    by = {(r["method"], r["T"]): r for r in report["rows"]}
    assert by[("chunked", 40)]["status"] == "ok" and by[("chunked", 80)]["status"] == "ok"
    assert by[("reference", 40)]["status"] == "ok" and by[("reference", 80)]["status"] == "skipped"
    assert by[("chunked", 80)]["peak_bytes"] > 0 and by[("chunked", 80)]["time_s"] > 0
    assert report["agreement"][0]["max_rel_err"] < 1e-5
    md = (tmp_path / "saliency_cpu_tiny.md").read_text()
    assert "| 40 |" in md and "peak chunked/ref" in md
    tr = B.synthetic_trace(100, 50)
    assert len(tr) == 100 and tr.step_ids()[-1] == tr.num_steps - 1
    assert tr.segments["summary"] == (90, 100)
