"""The run loop with a stand-in generator: paired seeds, interleaved arms, resume, truncated lines, sharding."""

import concurrent.futures as cf
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stepscope.decoding import DecodeConfig
from stepscope.errors import StepscopeError
from stepscope.evaluate import (
    EvalSettings,
    markdown,
    paper_table,
    read_results,
    run_eval,
    sample_seed,
    summarize,
)
from stepscope.evaluate.benchmarks import load_benchmark

pytest.importorskip("math_verify")
TESTS = Path(__file__).resolve().parent
GOLDS = ["12", "7", "30", "144", "5"]


@dataclass
class FakeTrace:
    """A trace with one token per character: the runner's bookkeeping does not depend on the tokenizer (the
    end-to-end test runs real traces), and child processes start without importing torch or transformers."""

    text: str
    token_ids: list
    segments: dict
    token_char_ends: list
    meta: dict

    @classmethod
    def build(cls, prompt: str, response: str, meta: dict) -> "FakeTrace":
        text = prompt + response
        end = response.rfind("</think>")
        q_end = len(prompt)
        t_end = len(text) if end < 0 else q_end + end + len("</think>")
        segments = {"question": (0, q_end), "thinking": (q_end, t_end), "summary": (t_end, len(text))}
        return cls(text, [ord(c) for c in text], segments, list(range(1, len(text) + 1)),
                   {**meta, "thinking_closed": end >= 0})

    @property
    def thinking_closed(self) -> bool:
        return self.meta["thinking_closed"]

    def segment_text(self, kind: str) -> str:
        a, b = self.segments[kind]
        return self.text[a:b]

    def steps_of(self, kind: str) -> list[str]:
        """The segment's sentences (a stand-in for the real segmenter's steps: only their number is recorded)."""
        return [p for p in self.segment_text(kind).split(". ") if p.strip()]


def fake_outcome(seed: int, stepflow) -> tuple[bool, bool]:
    """(thinking closed, correct) of a stand-in sample: a pure function of its seed and arm."""
    r = seed % 10
    closed = r != 0
    good = closed and (r >= 3 if stepflow is not None else r >= 5)  # "StepFlow" fixes r in {3, 4}
    return closed, good


class FakeGenerator:
    """Stands in for stepscope.flow.generate_traces: same call, real Traces, outcome a function of the seed."""

    def __init__(self, golds: dict[str, str], fail_on_call: int | None = None, sleep: dict | None = None):
        self.golds = golds
        self.sleep = sleep or {}  # arm -> seconds each call takes
        self.calls: list[tuple[str, list[tuple[str, int]], list[int]]] = []
        self.decodes: list[DecodeConfig] = []
        self.fail_on_call = fail_on_call

    def __call__(self, model, tokenizer, questions, *, decode, stepflow=None, seeds, metas, batch_size, prompt_style,
                 progress):
        assert prompt_style == "r1" and progress is False and len(seeds) == len(questions) == len(metas)
        self.decodes.append(decode)
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt
        self.calls.append((metas[0]["arm"], [(m["id"], m["sample"]) for m in metas], list(seeds)))
        time.sleep(self.sleep.get(metas[0]["arm"], 0.0))
        fires = None if stepflow is None else {"oeb_fires": {"0": 3}, "oeb_eligible": {"0": 10},
                                               "smi_fires": {"5": 2}, "smi_layers": [5]}
        out = []
        for q, seed, meta in zip(questions, seeds, metas):
            closed, good = fake_outcome(seed, stepflow)
            gold = self.golds[q]
            ans = gold if good else gold + "1"
            resp = (f"First I add the numbers. Then I check the sum.\n</think>\n\nThe answer is \\boxed{{{ans}}}."
                    if closed else f"First I add the numbers and get \\boxed{{{gold}}}. Then I")
            prompt = f"<|im_start|>user\n{q}\nPlease reason step by step.<|im_end|>\n<|im_start|>assistant\n<think>\n"
            out.append(FakeTrace.build(prompt, resp, {**meta, "num_new_tokens": 20, "timing": {"row_seconds": 0.01},
                                                      **({"stepflow_stats": fires} if fires else {})}))
        return out


def write_bench(folder: Path) -> Path:
    p = folder / "toy.jsonl"
    p.write_text("".join(json.dumps({"question": f"Problem {i}: compute the value.", "answer": a}) + "\n"
                         for i, a in enumerate(GOLDS)), encoding="utf-8")
    return p


def run_fake(out, bench_file, *, n_samples=3, batch_size=4, resume=False, fail_on_call=None, rank=None, world=None,
             temperature=0.6, top_k=0, wait_timeout=30.0, sleep=None):
    bench = load_benchmark(str(bench_file))
    gen = FakeGenerator({p.prompt_text(): p.answer for p in bench.problems}, fail_on_call, sleep)
    settings = EvalSettings(model="fake-model", benchmark=bench.name, n_samples=n_samples,
                            arms={"baseline": None, "stepflow": {"tau_max": 0.15}},
                            decode=DecodeConfig(max_new_tokens=64, temperature=temperature, top_k=top_k))
    summary = run_eval(None, None, bench, settings, out, arm_configs={"baseline": None, "stepflow": "cfg"},
                       batch_size=batch_size, resume=resume, progress=False, generate_fn=gen, rank=rank,
                       world_size=world, poll_seconds=0.2, wait_timeout=wait_timeout)
    return summary, gen, bench


def comparable(records):
    return [{k: v for k, v in r.items() if k not in ("time", "rank", "timing")} for r in records]


def test_paired_records_and_summary(tmp_path):
    bench_file = write_bench(tmp_path)
    summary, gen, bench = run_fake(tmp_path / "run", bench_file)
    recs = read_results(tmp_path / "run")
    assert len(recs) == 5 * 3 * 2
    assert len({(r["problem_id"], r["sample"], r["arm"]) for r in recs}) == len(recs)
    by = {(r["problem_id"], r["sample"], r["arm"]): r for r in recs}
    per_problem = {"baseline": [], "stepflow": []}
    for p in bench.problems:
        for arm in per_problem:
            cs = []
            for s in range(3):
                r = by[(p.id, s, arm)]
                seed = sample_seed(0, p.id, s)
                assert r["seed"] == seed == by[(p.id, s, "baseline")]["seed"]  # paired
                closed, good = fake_outcome(seed, None if arm == "baseline" else "cfg")
                assert r["correct"] is good and r["thinking_closed"] is closed
                assert r["gold"] == p.answer and r["text"].startswith("<|im_start|>")
                assert r["config"] == (None if arm == "baseline" else {"tau_max": 0.15})
                assert r["new_tokens"] == 20 and r["time"] == 0.01 and r["thinking_tokens"] > 0
                cs.append(good)
            per_problem[arm].append(np.mean(cs))
    a, b = np.array(per_problem["baseline"]), np.array(per_problem["stepflow"])
    assert summary["complete"] and summary["n_problems"] == 5
    assert summary["arms"]["baseline"]["accuracy"] == pytest.approx(a.mean())
    assert summary["arms"]["baseline"]["se"] == pytest.approx(a.std(ddof=1) / np.sqrt(5))
    c = summary["comparisons"]["stepflow"]
    assert c["diff"] == pytest.approx((b - a).mean())
    d = b - a  # exact sign-flip p by enumeration
    ref = np.mean([abs(np.dot(s, d)) / 5 >= abs(d.mean()) - 1e-12 for s in itertools.product([-1, 1], repeat=5)])
    assert c["p_value"] == pytest.approx(ref)
    assert c["ci_low"] <= c["diff"] <= c["ci_high"]
    assert set(summary["arms"]["stepflow"]["pass_at_k"]) == {"1", "2"}
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "| model | benchmark | baseline | StepFlow | diff [95% CI] | p |" in md
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["n_records"] == 30


def test_arms_interleave_per_batch_and_batching_does_not_change_results(tmp_path):
    bench_file = write_bench(tmp_path)
    _, gen, _ = run_fake(tmp_path / "a", bench_file, batch_size=4)
    arms = [c[0] for c in gen.calls]
    assert arms == ["baseline", "stepflow"] * 4  # 15 units in batches of 4: both arms per batch
    for (_, ids0, seeds0), (_, ids1, seeds1) in zip(gen.calls[::2], gen.calls[1::2]):
        assert ids0 == ids1 and seeds0 == seeds1
    assert [u for c in gen.calls[::2] for u in c[1]][:4] == [("toy-00", 0), ("toy-00", 1), ("toy-00", 2),
                                                            ("toy-01", 0)]  # problem-major
    run_fake(tmp_path / "b", bench_file, batch_size=1)
    assert comparable(read_results(tmp_path / "a")) == comparable(read_results(tmp_path / "b"))


@pytest.mark.parametrize("fail_on_call", [2, 3])
def test_interrupt_then_resume_loses_and_repeats_nothing(tmp_path, fail_on_call):
    bench_file = write_bench(tmp_path)
    run_fake(tmp_path / "clean", bench_file)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_fake(out, bench_file, fail_on_call=fail_on_call)
    partial = read_results(out)
    assert len(partial) == 4 * (fail_on_call - 1)  # call 2 fails: batch 1 baseline only; call 3: both arms
    assert json.loads((out / "status.rank0.json").read_text())["state"] == "interrupted"
    assert not (out / "summary.json").exists()
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write('{"problem_id": "toy-03", "sample": 0, "ar')  # a write cut by a kill
    with pytest.raises(StepscopeError, match="--resume"):
        run_fake(out, bench_file)  # an existing run is never overwritten without --resume
    summary, gen, _ = run_fake(out, bench_file, resume=True)
    done_before = {(r["problem_id"], r["sample"], r["arm"]) for r in partial}
    asked = {(i, s, c[0]) for c in gen.calls for i, s in c[1]}
    assert not (asked & done_before) and len(asked) + len(done_before) == 30
    assert comparable(read_results(out)) == comparable(read_results(tmp_path / "clean"))
    assert summary["complete"]
    # a finished run resumed again has nothing to do
    _, gen2, _ = run_fake(out, bench_file, resume=True)
    assert gen2.calls == []


def test_resume_refuses_other_settings(tmp_path):
    bench_file = write_bench(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_fake(tmp_path / "run", bench_file, fail_on_call=2)
    with pytest.raises(StepscopeError, match="temperature"):
        run_fake(tmp_path / "run", bench_file, resume=True, temperature=0.7)
    with pytest.raises(StepscopeError, match="n_samples"):
        run_fake(tmp_path / "run", bench_file, resume=True, n_samples=4)
    # batch size may change between runs: it does not change any sample
    summary, _, _ = run_fake(tmp_path / "run", bench_file, resume=True, batch_size=2)
    assert summary["complete"]
    # --resume on a folder that does not exist yet starts the run (job scripts can always pass it)
    s2, _, _ = run_fake(tmp_path / "fresh", bench_file, resume=True)
    assert s2["complete"]


def test_decoding_settings_reach_the_generator_and_run_json(tmp_path):
    bench_file = write_bench(tmp_path)
    _, gen, _ = run_fake(tmp_path / "run", bench_file, top_k=20, temperature=0.7)
    assert {(d.max_new_tokens, d.temperature, d.top_k, d.top_p) for d in gen.decodes} == {(64, 0.7, 20, 0.95)}
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stepscope_run"] == 2
    assert {k: info[k] for k in ("max_new_tokens", "max_thinking_tokens", "temperature", "top_p", "top_k",
                                 "do_sample", "seed")} == DecodeConfig(max_new_tokens=64, temperature=0.7,
                                                                       top_k=20).to_json()
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "temperature 0.7, top-p 0.95, top-k 20, up to 64 new tokens" in md
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["decoding"]["top_k"] == 20
    assert EvalSettings(model="m", benchmark="b").decode == DecodeConfig(max_new_tokens=32768)  # the paper's budget


def test_resume_of_a_version_1_run_folder(tmp_path):
    """run.json of version 1 had no top_k or do_sample (it decoded with 0 and None): it resumes with those,
    refuses others; an unknown version is a clear error."""
    bench_file = write_bench(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_fake(out, bench_file, fail_on_call=3)
    info = json.loads((out / "run.json").read_text())
    v1 = {k: v for k, v in info.items() if k not in ("top_k", "do_sample")} | {"stepscope_run": 1}
    (out / "run.json").write_text(json.dumps(v1))
    with pytest.raises(StepscopeError, match="top_k: 0 -> 20"):
        run_fake(out, bench_file, resume=True, top_k=20)
    summary, _, _ = run_fake(out, bench_file, resume=True)
    assert summary["complete"] and summary["n_records"] == 30
    (out / "run.json").write_text(json.dumps(v1 | {"stepscope_run": 7}))
    with pytest.raises(StepscopeError, match="run format 7 is not one this stepscope reads"):
        run_fake(out, bench_file, resume=True)


def test_cli_default_budget_is_the_library_default():
    import argparse

    from stepscope.commands import eval as eval_command
    from stepscope.evaluate.runner import EVAL_MAX_NEW_TOKENS

    p = argparse.ArgumentParser()
    eval_command.add_arguments(p)
    args = p.parse_args([])
    assert args.max_new_tokens == eval_command.MAX_NEW_TOKENS == EVAL_MAX_NEW_TOKENS
    assert (args.temperature, args.top_p, args.top_k, args.seed) == (0.6, 0.95, 0, 0)


def test_shards_in_one_process_merge_to_the_single_run(tmp_path):
    bench_file = write_bench(tmp_path)
    run_fake(tmp_path / "single", bench_file)
    out = tmp_path / "sharded"
    with cf.ThreadPoolExecutor(2) as ex:  # the two ranks of one launch, side by side
        r1 = ex.submit(run_fake, out, bench_file, rank=1, world=2)
        r0 = ex.submit(run_fake, out, bench_file, rank=0, world=2)
        assert r1.result(timeout=120)[0] is None  # rank 1 finishes its share and leaves
        summary, gen, _ = r0.result(timeout=120)
    assert sorted({i for c in gen.calls for i in c[1]}) == sorted(
        [(f"toy-{p:02d}", s) for p in range(5) for s in range(3)][0::2])
    assert comparable(read_results(out)) == comparable(read_results(tmp_path / "single"))
    assert not list(out.glob("results.rank*.jsonl")) and summary["complete"]


def test_rank0_stops_when_another_rank_fails_and_ignores_stale_statuses(tmp_path):
    bench_file = write_bench(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    stale = {"rank": 1, "state": "interrupted", "time": time.time() - 5}  # left by an earlier launch
    (out / "status.rank1.json").write_text(json.dumps(stale))
    with cf.ThreadPoolExecutor(1) as ex:
        r0 = ex.submit(run_fake, out, bench_file, rank=0, world=2)
        time.sleep(1.0)
        assert not r0.done()  # still waiting for rank 1: the stale status does not stop it
        (out / "status.rank1.json").write_text(json.dumps({"rank": 1, "state": "failed", "error": "CUDA OOM",
                                                            "time": time.time()}))
        with pytest.raises(StepscopeError, match="rank 1 failed: CUDA OOM"):
            r0.result(timeout=60)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_eval_runner import run_fake
run_fake({out!r}, {bench!r}, batch_size=2)
"""


def test_two_processes_with_rank_env_merge_to_the_single_run(tmp_path):
    bench_file = write_bench(tmp_path)
    run_fake(tmp_path / "single", bench_file, batch_size=2)
    out = tmp_path / "two"
    code = CHILD.format(tests=str(TESTS), out=str(out), bench=str(bench_file))
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                                                 "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    merged = read_results(out)
    assert comparable(merged) == comparable(read_results(tmp_path / "single"))
    assert {r["rank"] for r in merged} == {0, 1}
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_summary_of_an_incomplete_run_and_tables():
    info = {"model": "org/Model-7B", "benchmark": "aime24", "n_samples": 2, "n_problems": 3,
            "arms": {"baseline": None, "stepflow": {}}, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 100}
    recs = []
    for pid, s, arm, ok in [("a", 0, "baseline", 1), ("a", 1, "baseline", 0), ("a", 0, "stepflow", 1),
                            ("a", 1, "stepflow", 1), ("b", 0, "baseline", 0), ("b", 1, "baseline", 0),
                            ("b", 0, "stepflow", 1), ("b", 1, "stepflow", 0), ("c", 0, "baseline", 1)]:
        recs.append({"problem_id": pid, "sample": s, "arm": arm, "correct": bool(ok), "thinking_closed": True,
                     "new_tokens": 10, "thinking_tokens": 8})
    s = summarize(recs, info)
    assert not s["complete"] and s["n_problems"] == 2 and s["n_problems_expected"] == 3
    assert s["arms"]["baseline"]["accuracy"] == pytest.approx(0.25)
    assert s["arms"]["stepflow"]["accuracy"] == pytest.approx(0.75)
    assert s["arms"]["stepflow"]["pass_at_k"]["2"]["mean"] == pytest.approx(1.0)
    assert s["comparisons"]["stepflow"]["diff"] == pytest.approx(0.5)
    assert s["comparisons"]["stepflow"]["wins"] == 2
    md = markdown(s)
    assert "| Model-7B | AIME24 | 25.0 ± 25.0 | 75.0 ± 25.0 | +50.0 [" in md and "run incomplete" in md
    table = paper_table([s])
    assert "| Model-7B, baseline → StepFlow | 25.0 → 75.0 |" in table


def test_cli_summarize_table_and_errors(tmp_path, capsys):
    from stepscope import cli

    bench_file = write_bench(tmp_path)
    run_fake(tmp_path / "run", bench_file)
    (tmp_path / "run" / "summary.md").unlink()
    assert cli.main(["eval", "--summarize", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.md").exists()
    assert "| model | benchmark | baseline | StepFlow |" in capsys.readouterr().out
    assert cli.main(["eval", "--table", str(tmp_path / "run")]) == 0
    assert "| fake-model, baseline → StepFlow |" in capsys.readouterr().out
    assert cli.main(["eval", "--benchmark", "gsm8k", "--arms", "baseline,magic", "--out", str(tmp_path / "x")]) == 2
    assert "unknown arm 'magic'" in capsys.readouterr().err
    assert cli.main(["eval", "--summarize", "--out", str(tmp_path / "nothing")]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def cost_from_records(recs: list[dict], arm: str) -> float:
    """tokens/s of an arm, recomputed from the records: each batch's wall time counted once."""
    batches = {r["timing"]["batch"]: r["timing"]["seconds"] for r in recs if r["arm"] == arm}
    return sum(r["new_tokens"] for r in recs if r["arm"] == arm) / sum(batches.values())


def test_each_batch_is_timed_per_arm_and_a_resume_elsewhere_is_not_comparable(tmp_path, monkeypatch):
    bench_file = write_bench(tmp_path)
    sleep = {"baseline": 0.02, "stepflow": 0.06}
    clean, _, _ = run_fake(tmp_path / "clean", bench_file, sleep=sleep)
    recs = read_results(tmp_path / "clean")
    for r in recs:  # every sample carries the wall time of the generator call that made it
        t = r["timing"]
        assert t["seconds"] >= sleep[r["arm"]] and t["rows"] == sum(x["timing"]["batch"] == t["batch"] for x in recs)
        assert t["session"]["engine"].startswith("transformers") and t["session"]["device"].startswith("cpu")
    assert len({r["timing"]["batch"] for r in recs}) == 8  # 4 batches x 2 arms
    cost = clean["cost"]
    assert cost["comparable"] and cost["machines"] == 1 and len(cost["sessions"]) == 1
    for arm in ("baseline", "stepflow"):
        assert cost["arms"][arm]["tokens_per_second"] == pytest.approx(cost_from_records(recs, arm))
        assert cost["arms"][arm]["new_tokens"] == 15 * 20 and cost["arms"][arm]["batches"] == 4
    ratio = cost["ratios"]["stepflow"]["throughput"]
    assert ratio == pytest.approx(cost_from_records(recs, "stepflow") / cost_from_records(recs, "baseline"))
    assert ratio < 0.8  # StepFlow's calls took three times as long here
    assert cost["arms"]["baseline"]["oeb_fire_rate"] is None and cost["arms"]["stepflow"]["oeb_fire_rate"] == 0.3
    thinking = sum(r["thinking_tokens"] for r in recs if r["arm"] == "stepflow")
    assert cost["arms"]["stepflow"]["smi_fire_rate"] == pytest.approx(2 * 15 / thinking)
    md = (tmp_path / "clean" / "summary.md").read_text()
    assert f"StepFlow / baseline throughput (tokens/s): {ratio:.3f}x" in md and "not comparable" not in md

    # interrupted, then resumed on another machine: the first session's timing survives, the ratio is flagged
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_fake(out, bench_file, fail_on_call=4, sleep=sleep)
    first = read_results(out)
    monkeypatch.setattr("platform.node", lambda: "another-host")
    summary, _, _ = run_fake(out, bench_file, resume=True, sleep=sleep)
    recs = read_results(out)
    key = {(r["problem_id"], r["sample"], r["arm"]): r for r in recs}
    assert [key[(r["problem_id"], r["sample"], r["arm"])]["timing"] for r in first] == [r["timing"] for r in first]
    assert len({r["timing"]["session"]["id"] for r in recs}) == 2
    assert len({r["timing"]["session"]["machine"] for r in recs}) == 2
    cost = summary["cost"]
    assert not cost["comparable"] and cost["machines"] == 2 and not cost["ratios"]["stepflow"]["comparable"]
    md = (out / "summary.md").read_text()
    assert "(not comparable)" in md and "resumed on another machine" in md
