"""StepFlow inside vLLM on a tiny random Llama saved as a folder, and the vLLM trace runner.

One engine for the module. Teacher-forced through our transformers StepFlow over vLLM's tokens, the argmax is
vLLM's token and its logprob agrees within 1e-3; `stepscope.vllm.generate_traces` writes the same traces (token
ids, steps, meta fields) as the transformers engine's `generate_traces` for greedy decoding, both arms.
"""

import os

import pytest
from conftest import require_vllm

require_vllm()

import torch  # noqa: E402
from tiny import make_model, make_tokenizer, peaked  # noqa: E402

from stepscope.flow import StepFlow, StepFlowConfig, generate_traces  # noqa: E402

CFG = StepFlowConfig(fmt="think", tau_max=0.95)  # near-uniform attention: p(B) ~ |B|/(|B|+|S|) < sqrt of it
QUESTIONS = ["What is 2 + 2?", "Name a prime number above 10, please.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def arch():
    return "llama"  # tests/test_vllm_tiny_qwen2.py runs this module's tests on Qwen2


def tiny_folder(tmp_path_factory, arch: str):
    """(folder, model, tokenizer): the random model saved once per test session, so that the modules using it
    share one engine (stepscope.vllm.driver.engine.load_llm; tests/test_vllm_cli.py's commands make the same one)."""
    path = tmp_path_factory.getbasetemp() / f"tiny_{arch}_vllm"
    # CPU_ATTN needs head_dim in {32, 64, ...}
    model = peaked(make_model(arch, hidden_size=128, intermediate_size=256, head_dim=32, layers=4, seed=1))
    tok = make_tokenizer("think")
    if not path.exists():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path), model, tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory, arch):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from stepscope.vllm.driver.engine import engine_kwargs, load_llm, shutdown_engines

    path, model, tok = tiny_folder(tmp_path_factory, arch)
    yield load_llm(**engine_kwargs(path, dtype="float32", max_model_len=512)), model, tok
    shutdown_engines()


def assert_matches_teacher_forced(llm, model, tok, key: str, max_tokens, cfg: StepFlowConfig = CFG) -> None:
    """vLLM with StepFlow (config `cfg`) against our transformers StepFlow teacher-forced over vLLM's tokens: every
    argmax equals vLLM's token, the chosen tokens' logprobs agree within 1e-3 and the fire counts are equal
    (request i of QUESTIONS asks for max_tokens(i) tokens under the stats key f"{key}{i}"); returns vLLM's outputs
    and its stats."""
    import stepscope.vllm as sv
    from stepscope.prompts import build_prompt

    ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS]
    params = [sv.sampling_params(cfg, f"{key}{i}", max_tokens=max_tokens(i), temperature=0, logprobs=1)
              for i in range(len(ids))]
    outs = llm.generate([sv.prompt(p, cfg) for p in ids], params, use_tqdm=False)
    stats = sv.collect_stats(llm, keys=[f"{key}{i}" for i in range(len(ids))], clear=True)
    for i, (p, o) in enumerate(zip(ids, outs)):
        c = o.outputs[0]
        gen = list(c.token_ids)
        with torch.no_grad(), StepFlow(model, tok, cfg, kernel="torch") as flow:
            logits = model(torch.tensor([p + gen[:-1]])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[len(p) - 1:]
        assert ref.argmax(-1).tolist() == gen
        lps = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, gen)])
        assert (lps - ref.gather(-1, torch.tensor(gen)[:, None])[:, 0]).abs().max().item() < 1e-3
        s, r = stats[f"{key}{i}"], flow.stats
        assert s.oeb_fires == r.oeb_fires and s.oeb_eligible == r.oeb_eligible and s.smi_fires == r.smi_fires
        assert s.interventions == r.interventions
        assert s.total_oeb_fires > 0
    return outs, stats


def test_stepflow_matches_teacher_forced_transformers(setup):
    llm, model, tok = setup
    assert_matches_teacher_forced(llm, model, tok, "t", lambda i: 20 + 6 * i)


def test_a_registered_repair_runs_exact_with_oeb_and_smi(setup):
    """The test-only repair of tests/toy_intervention.py (registered in vLLM's processes through
    $STEPSCOPE_INTERVENTIONS, tests/conftest.py) beside OEB and SMI: vLLM equals the transformers engine, whose
    repair tests/test_interventions.py checks against an independent reference, token by token and count by
    count; without the repair the teacher-forced logprobs move (so vLLM applied it)."""
    llm, model, tok = setup
    toy = StepFlowConfig(**{**CFG.to_json(), "interventions": {"toy_gain": {"layers": [1, 3], "gain": 0.5}}})
    outs, stats = assert_matches_teacher_forced(llm, model, tok, "toy", lambda i: 16 + 4 * i, toy)
    assert all(stats[f"toy{i}"].interventions["toy_gain"][1] > 0 for i in range(len(QUESTIONS)))
    c = outs[0].outputs[0]
    gen, prompt = list(c.token_ids), list(outs[0].prompt_token_ids)
    with torch.no_grad(), StepFlow(model, tok, CFG, kernel="torch") as flow:
        logits = model(torch.tensor([prompt + gen[:-1]])).logits[0].float()
    without = torch.log_softmax(logits, -1)[len(prompt) - 1:].gather(-1, torch.tensor(gen)[:, None])[:, 0]
    lps = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, gen)])
    assert (lps - without).abs().max().item() > 1e-2
    assert flow.stats.interventions == {}


def test_a_calibrated_config_file_runs_exact(setup, tmp_path):
    """A config as `stepscope calibrate --out` writes it (StepFlowConfig JSON with its own bands and a measured
    tau_max), loaded with StepFlowConfig.load, is exact in vLLM as the module's own config is."""
    import json

    llm, model, tok = setup
    path = tmp_path / "stepflow.json"
    path.write_text(json.dumps(StepFlowConfig(fmt="think", oeb_layers=[1, 2], smi_layers=[3], tau_max=0.8).to_json()))
    assert_matches_teacher_forced(llm, model, tok, "cal", lambda i: 12 + 4 * i, StepFlowConfig.load(path))


def _assert_same_traces(got, want, stepflow):
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [s.to_json() for s in g.steps] == [s.to_json() for s in w.steps]
        for k in ("question", "seed", "num_prompt_tokens", "num_new_tokens", "stop_reason", "budget_forced",
                  "thinking_tokens"):
            assert g.meta[k] == w.meta[k], k
        cg = {k: v for k, v in g.meta["config"].items() if k not in ("engine", "engine_version", "model", "dtype")}
        cw = {k: v for k, v in w.meta["config"].items() if k not in ("model", "dtype")}
        assert cg == cw
        assert g.meta["config"]["engine"] == "vllm" and g.meta["config"]["engine_version"]
        if stepflow is not None:
            a, b = g.meta["stepflow_stats"], w.meta["stepflow_stats"]
            for k in ("oeb_fires", "oeb_eligible", "smi_fires", "tokens"):
                assert a[k] == b[k], k
            for k in ("bridge_mass_before", "bridge_mass_after"):
                assert all(abs(a[k][i] - b[k][i]) < 1e-4 for i in a[k]), k


def assert_runner_matches(llm, model, tok, stepflow, **kw) -> list:
    """`stepscope.vllm.generate_traces` on the engine and the transformers engine's `generate_traces` on the model,
    greedy over QUESTIONS with the same settings (r1 prompts, think format, `kw`), write the same traces
    (`_assert_same_traces`); returns vLLM's."""
    import stepscope.vllm as sv

    kw = dict(stepflow=stepflow, temperature=0.0, prompt_style="r1", fmt="think", **kw)
    got = sv.generate_traces(llm, tok, QUESTIONS, progress=False, **kw)
    want = generate_traces(model, tok, QUESTIONS, progress=False, flow_kernel="torch", **kw)
    _assert_same_traces(got, want, stepflow)
    return got


@pytest.mark.parametrize("stepflow", [None, CFG], ids=["plain", "stepflow"])
def test_runner_writes_the_transformers_engines_traces(setup, stepflow):
    llm, model, tok = setup
    got = assert_runner_matches(llm, model, tok, stepflow, max_new_tokens=16)
    assert all(g.meta["timing"]["phases"] == 1 for g in got)


@pytest.mark.parametrize("stepflow", [None, CFG], ids=["plain", "stepflow"])
def test_budget_forcing_equals_the_transformers_engines(setup, stepflow):
    """Budget forcing in phases (the forced end marker in a new request's prompt): the same tokens, steps,
    counts and StepFlow stats as the transformers engine, which forces it inside one decode loop."""
    llm, model, tok = setup
    got = assert_runner_matches(llm, model, tok, stepflow, max_new_tokens=24, max_thinking_tokens=6)
    forced = [g for g in got if g.meta["budget_forced"]]
    assert forced and all(g.meta["timing"]["phases"] >= 2 and g.meta["thinking_tokens"] == 6 for g in forced)
    assert all(g.segments["summary"][1] > g.segments["summary"][0] for g in forced)  # it went on after the marker
