"""StepFlow inside vLLM on SmolLM2 (float32, greedy), exact against the transformers StepFlow.

One engine for the module. Its batch mixes StepFlow and plain requests of different lengths, more requests than
batch slots (rows finish, others join, rows move). Every StepFlow request is teacher-forced through our
transformers StepFlow over vLLM's tokens: the argmax is vLLM's token and the token's logprob agrees within 1e-3;
its stats equal the transformers path's. Plain requests equal the same requests run alone by plain vLLM.
"""

import os

import pytest
from conftest import require_vllm

require_vllm()

import torch  # noqa: E402
from tiny import assert_same_counts, teacher_forced  # noqa: E402

from stepscope.flow import StepFlowConfig  # noqa: E402

QUESTIONS = ["What is 12 * 13? Explain.", "A train goes 60 km in 1.5 hours. What is its speed?",
             "Is 91 a prime number? Think it through."]
LENGTHS = [40, 24, 56]
CFG = StepFlowConfig(fmt="think")
TOL = 1e-3


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    from stepscope.models import default_model_path
    from stepscope.prompts import build_prompt

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS]
    yield llm, model, tok, ids
    del llm


def _params(cfg, key, n):
    import stepscope.vllm as sv

    return sv.sampling_params(cfg, key, max_tokens=n, temperature=0, logprobs=1)


def _tokens(out):
    c = out.outputs[0]
    return list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


@pytest.fixture(scope="module")
def mixed(setup):
    """StepFlow and plain requests of each question, different lengths, 6 requests in 4 slots."""
    import stepscope.vllm as sv

    llm, _, _, ids = setup
    prompts, params = [], []
    for i, p in enumerate(ids):
        prompts += [sv.prompt(p, CFG), sv.prompt(p)]
        params += [_params(CFG, f"q{i}", LENGTHS[i]), _params(None, None, LENGTHS[i])]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, sv.collect_stats(llm, keys=[f"q{i}" for i in range(len(ids))])


def test_stepflow_requests_match_teacher_forced_transformers(setup, mixed):
    _, model, tok, ids = setup
    outs, stats = mixed
    changed = 0
    for i, p in enumerate(ids):
        gen, lps = _tokens(outs[2 * i])
        plain, _ = _tokens(outs[2 * i + 1])
        assert len(gen) == LENGTHS[i]
        ref, ref_stats = teacher_forced(model, tok, CFG, p, gen)
        assert ref.argmax(-1).tolist() == gen
        got = torch.tensor(lps)
        want = ref.gather(-1, torch.tensor(gen)[:, None])[:, 0]
        assert (got - want).abs().max().item() < TOL
        # the same counts as the transformers path (both count the tokens that were queries)
        assert_same_counts(stats[f"q{i}"], ref_stats, len(p) + len(gen) - 1)
        changed += gen != plain
    assert changed >= 1  # StepFlow changed some greedy text
    assert sum(s.total_smi_fires for s in stats.values()) > 0


def test_plain_requests_in_a_mixed_batch_equal_plain_vllm(setup, mixed):
    import stepscope.vllm as sv

    llm, model, _, ids = setup
    outs, _ = mixed
    alone = llm.generate([sv.prompt(p) for p in ids], [_params(None, None, n) for n in LENGTHS], use_tqdm=False)
    for i, p in enumerate(ids):
        gen, lps = _tokens(outs[2 * i + 1])
        gen_alone, lps_alone = _tokens(alone[i])
        assert gen == gen_alone
        assert max(abs(a - b) for a, b in zip(lps, lps_alone)) < 1e-4
        ref, _ = teacher_forced(model, None, None, p, gen)  # and plain vLLM is the plain model
        assert ref.argmax(-1).tolist() == gen


def test_stepflow_alone_equals_stepflow_in_the_mixed_batch(setup, mixed):
    """Batch composition (who else is in the batch, which row a request sits in) changes nothing."""
    import stepscope.vllm as sv

    llm, _, _, ids = setup
    outs, stats = mixed
    alone = llm.generate([sv.prompt(ids[1], CFG)], [_params(CFG, "alone", LENGTHS[1])], use_tqdm=False)
    assert _tokens(alone[0])[0] == _tokens(outs[2])[0]
    s = sv.collect_stats(llm, keys=["alone"], clear=True)["alone"]
    assert s.oeb_fires == stats["q1"].oeb_fires and s.smi_fires == stats["q1"].smi_fires


def test_bad_stepflow_config_is_refused_at_the_request(setup):
    from vllm import SamplingParams

    llm, _, _, ids = setup
    with pytest.raises(Exception, match="unknown StepFlow config key"):
        llm.generate([{"prompt_token_ids": ids[0]}],
                     SamplingParams(max_tokens=2, extra_args={"stepflow": {"bogus": 1}}), use_tqdm=False)
    with pytest.raises(Exception, match="tau_max"):
        llm.generate([{"prompt_token_ids": ids[0]}],
                     SamplingParams(max_tokens=2, extra_args={"stepflow": '{"tau_max": 2}'}), use_tqdm=False)
