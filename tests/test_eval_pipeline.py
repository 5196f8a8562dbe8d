"""From evaluation to correct-versus-wrong comparison on the command line: `eval --save-traces` -> `saliency`
-> `compare --by-meta`, on the bundled SmolLM2 with a tiny benchmark file and a few greedy tokens."""

import contextlib
import io
import json

import pytest

pytest.importorskip("math_verify")

from stepscope.cli import main  # noqa: E402
from stepscope.saliency import SaliencyResult  # noqa: E402

pytestmark = pytest.mark.slow

# SmolLM2 answers "2 + 3 = 5" right after the forced end of thinking; no answer it writes is -98765
PROBLEMS = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": "-98765"}]


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_eval_saliency_compare_by_meta(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    run = tmp_path / "run"
    rc, _, err = _cli(["eval", "--benchmark", "gsm8k", "--data-file", str(data), "--n-samples", "2",
                       "--max-new-tokens", "24", "--max-thinking-tokens", "6", "--temperature", "0",
                       "--batch-size", "4", "--no-progress", "--save-traces", "--out", str(run)])
    assert rc == 0, err
    records = [json.loads(line) for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 * 2 * 2  # problems x samples x arms
    assert {r["correct"] for r in records} == {True, False}
    for r in records:  # the grade travels with the saved trace
        meta = r["trace"]["meta"]
        assert meta["correct"] is r["correct"] and meta["problem_id"] == r["problem_id"]
        assert meta["arm"] == r["arm"] and meta["sample"] == r["sample"]
        assert meta["answer"] == r["answer"] and meta["gold"] == r["gold"]

    sal = tmp_path / "sal"
    rc, stdout, err = _cli(["saliency", str(run / "results.jsonl"), "--out", str(sal), "--layers", "0,1,-2,-1",
                            "--no-progress"])
    assert rc == 0, err
    by_name = {r["trace"]["meta"]["id"]: r for r in records}
    expected = sorted(f"{r['problem_id']}-{r['arm']}-s{r['sample']}" for r in records)
    assert sorted(p.name for p in sal.iterdir()) == sorted(by_name) == expected  # arm and sample in every name
    for name, r in by_name.items():
        meta = SaliencyResult.load(sal / name).trace.meta
        assert (meta["correct"], meta["problem_id"], meta["arm"], meta["sample"]) == \
            (r["correct"], r["problem_id"], r["arm"], r["sample"])

    cmp = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", "--by-meta", str(sal), "--out", str(cmp), "--n-boot", "200", "--n-perm",
                            "200", "--no-figures"])
    assert rc == 0, err
    result = json.loads((cmp / "comparison.json").read_text(encoding="utf-8"))
    n_correct = sum(r["correct"] for r in records)
    assert (result["groups"]["correct"]["n"], result["groups"]["wrong"]["n"]) == (n_correct, len(records) - n_correct)
