"""`stepscope generate --engine vllm` and `stepscope eval --engine vllm` on a tiny random Llama folder.

The commands run in this process (`stepscope.cli.main`), so the module starts one vLLM engine (made once per
process for the same settings) and compares with the transformers engine through the same commands: greedy
output files and run records are equal (tokens, steps, budget forcing, StepFlow counts), runs resume, a file of
one engine is not resumed by the other, and each row's sample depends on its seed alone. Data parallelism (two
more engine processes) gives the single engine's file.
"""

import json
import os

import pytest
from conftest import require_vllm

require_vllm()

from test_vllm_tiny_llama import tiny_folder  # noqa: E402

from stepscope.cli import main  # noqa: E402

PROBLEMS = [{"id": "a", "problem": "What is 2 + 2?", "answer": "4"},
            {"id": "b", "problem": "Name a prime number above 10, please.", "answer": "11"},
            {"id": "c", "problem": "Why is the sky blue?", "answer": "scattering"}]
ENGINE = ["--engine", "vllm", "--max-model-len", "512", "--dtype", "float32"]
TAU = ["--tau-max", "0.95"]  # near-uniform attention: OEB fires (tests/test_vllm_tiny_llama.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return tiny_folder(tmp_path_factory, "llama")[0]  # the commands' engine is tests/test_vllm_tiny_llama.py's


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    p = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS), encoding="utf-8")
    return p


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _untimed(rec):
    """A generate record without its timings (in its meta and its trace's meta)."""
    rec = json.loads(json.dumps(rec))
    for meta in (rec["meta"], rec["trace"]["meta"]):
        meta.pop("timing")
    return rec


def _same_records(got, want):
    """generate records of the two engines: the same text, tokens, steps and counts."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert g["response"] == w["response"]
        assert g["trace"]["token_ids"] == w["trace"]["token_ids"] and g["trace"]["steps"] == w["trace"]["steps"]
        for k in ("seed", "num_prompt_tokens", "num_new_tokens", "stop_reason", "budget_forced", "thinking_tokens"):
            assert g["meta"][k] == w["meta"][k], k
        cg, cw = dict(g["meta"]["config"]), dict(w["meta"]["config"])
        assert cg.pop("engine") == "vllm" and cg.pop("engine_version")
        assert {k: v for k, v in cg.items() if k != "model"} == {k: v for k, v in cw.items() if k != "model"}
        if "stepflow_stats" in w["meta"]:
            a, b = g["meta"]["stepflow_stats"], w["meta"]["stepflow_stats"]
            for k in ("oeb_fires", "oeb_eligible", "smi_fires", "tokens"):
                assert a[k] == b[k], k


def test_generate_equals_the_transformers_engine_and_resumes(model_dir, problems, tmp_path, capsys):
    common = ["--input", str(problems), "--model", model_dir, "--max-new-tokens", "20", "--max-thinking-tokens", "6",
              "--temperature", "0", "--quiet", *TAU]
    hf, vl = tmp_path / "hf.jsonl", tmp_path / "vllm.jsonl"
    assert main(["generate", *common, "--out", str(hf), "--device", "cpu", "--dtype", "float32"]) == 0
    assert main(["generate", *common, "--out", str(vl), *ENGINE]) == 0
    got, want = _lines(vl), _lines(hf)
    _same_records(got, want)
    assert any(r["meta"]["budget_forced"] for r in got)
    assert sum(sum(r["meta"]["stepflow_stats"]["oeb_fires"].values()) for r in got) > 0

    # an interrupted file (a cut-off last line, one record missing) resumes to the same file
    text = vl.read_text(encoding="utf-8").splitlines(keepends=True)
    vl.write_text(text[0] + text[1][:25], encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", *common, "--out", str(vl), *ENGINE]) == 0
    assert [_untimed(r) for r in _lines(vl)] == [_untimed(r) for r in got]
    # the other engine's file is not resumed: its samples would not be this engine's
    assert main(["generate", *common, "--out", str(hf), *ENGINE]) == 2
    assert "written with other settings (engine, engine_version)" in capsys.readouterr().err


def test_generate_samples_depend_on_the_seed_alone(model_dir, problems, tmp_path):
    """Sampling: row i samples with --seed + i; the same question and seed alone gives the same tokens."""
    import stepscope.vllm as sv
    from stepscope.flow import StepFlowConfig
    from stepscope.models import load_tokenizer
    from stepscope.vllm.driver.engine import engine_kwargs, load_llm

    out = tmp_path / "sampled.jsonl"
    assert main(["generate", "--input", str(problems), "--model", model_dir, "--max-new-tokens", "12", "--seed", "5",
                 "--temperature", "1.0", "--out", str(out), "--quiet", *TAU, *ENGINE]) == 0
    recs = _lines(out)
    assert [r["meta"]["seed"] for r in recs] == [5, 6, 7]
    llm = load_llm(**engine_kwargs(model_dir, dtype="float32", max_model_len=512))  # the command's engine
    alone = sv.generate_traces(llm, load_tokenizer(model_dir), [PROBLEMS[2]["problem"]], seeds=[7], progress=False,
                               stepflow=StepFlowConfig(tau_max=0.95), max_new_tokens=12, temperature=1.0)
    assert alone[0].token_ids == recs[2]["trace"]["token_ids"]


def test_eval_equals_the_transformers_engine_and_resumes(model_dir, problems, tmp_path, capsys):
    common = ["--benchmark", str(problems), "--model", model_dir, "--n-samples", "2", "--arms", "baseline,stepflow",
              "--max-new-tokens", "16", "--max-thinking-tokens", "5", "--temperature", "0", "--batch-size", "2",
              "--no-progress", "--grade-timeout", "2", *TAU]
    hf, vl = tmp_path / "hf", tmp_path / "vllm"
    assert main(["eval", *common, "--out", str(hf), "--device", "cpu", "--dtype", "float32"]) == 0
    assert main(["eval", *common, "--out", str(vl), *ENGINE]) == 0
    info = json.loads((vl / "run.json").read_text())
    assert info["engine"] == "vllm" and info["engine_version"] and "engine" not in json.loads((hf / "run.json").read_text())

    def records(d):
        return sorted((json.loads(x) for x in (d / "results.jsonl").read_text().splitlines()),
                      key=lambda r: (r["problem_id"], r["sample"], r["arm"]))

    got, want = records(vl), records(hf)
    assert len(got) == len(want) == 12
    for g, w in zip(got, want):
        for k in ("problem_id", "sample", "seed", "arm", "config", "answer", "correct", "new_tokens",
                  "thinking_tokens", "summary_tokens", "stop_reason", "budget_forced", "text"):
            assert g[k] == w[k], k
    assert any(r["budget_forced"] for r in got)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (vl, hf)]
    for s in summaries:
        for arm in s["arms"].values():
            arm.pop("mean_time")
    assert summaries[0]["complete"] and summaries[0]["arms"] == summaries[1]["arms"]  # the same statistics
    assert summaries[0]["comparisons"] == summaries[1]["comparisons"]

    capsys.readouterr()
    assert main(["eval", *common, "--out", str(vl), "--resume", *ENGINE]) == 0  # nothing left to do
    assert records(vl) == got
    assert main(["eval", *common, "--out", str(vl), "--resume", "--device", "cpu", "--dtype", "float32"]) == 2
    assert "the settings differ" in capsys.readouterr().err


def test_data_parallel_generate_equals_one_engine(model_dir, problems, tmp_path):
    common = ["--input", str(problems), "--model", model_dir, "--max-new-tokens", "10", "--seed", "3",
              "--temperature", "0.8", "--quiet", *TAU, *ENGINE]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["generate", *common, "--out", str(one)]) == 0
    assert main(["generate", *common, "--out", str(two), "--data-parallel-size", "2"]) == 0
    a, b = _lines(one), _lines(two)
    assert [r["trace"]["token_ids"] for r in a] == [r["trace"]["token_ids"] for r in b]
    assert [r["meta"]["stepflow_stats"]["oeb_fires"] for r in a] == [r["meta"]["stepflow_stats"]["oeb_fires"]
                                                                     for r in b]
