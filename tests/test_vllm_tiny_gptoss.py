"""tests/test_vllm_tiny_llama.py's tests on a tiny random GPT-OSS (attention sinks, sliding-window layers between
full-attention ones, mixture-of-experts MLPs), with their own engine; and StepFlow's OEB in both kinds of layer.

The model (tests/tiny.py) has a window of 8 keys in layers 0 and 2, full attention in layers 1 and 3, and random
sinks of a visible size; every prompt is longer than the window. `test_sinks_and_windows_are_in_play` checks that
vLLM's logprobs are those of this model and not of the same model without sinks or without windows, so the exact
agreement of the other tests covers both.
"""

import copy

from conftest import require_vllm

require_vllm()

import pytest  # noqa: E402
import torch  # noqa: E402
from test_vllm_tiny_llama import *  # noqa: E402,F401,F403
from test_vllm_tiny_llama import QUESTIONS, assert_matches_teacher_forced  # noqa: E402

from stepscope.flow import StepFlowConfig  # noqa: E402


@pytest.fixture(scope="module")
def arch():
    return "gptoss"


def _prompts(tok) -> list[list[int]]:
    from stepscope.prompts import build_prompt

    return [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS]


def _chosen_logprobs(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    """The model's logprob of each token of `gen`, teacher-forced after `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + gen[:-1]])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(ids) - 1:]
    return ref.gather(-1, torch.tensor(gen)[:, None])[:, 0]


def test_sinks_and_windows_are_in_play(setup):
    from vllm import SamplingParams

    llm, model, tok = setup
    cfg = model.config
    window = cfg.sliding_window
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    assert all(layer.self_attn.sinks.abs().max().item() > 0.5 for layer in model.model.layers)
    ids = _prompts(tok)
    assert min(len(p) for p in ids) > window
    no_sinks, no_window = copy.deepcopy(model), copy.deepcopy(model)
    for layer in no_sinks.model.layers:
        layer.self_attn.sinks.data.zero_()
    no_window.config.sliding_window = cfg.max_position_embeddings
    outs = llm.generate([{"prompt_token_ids": p} for p in ids],
                        SamplingParams(max_tokens=12, temperature=0, logprobs=1), use_tqdm=False)
    for p, o in zip(ids, outs):
        c = o.outputs[0]
        gen = list(c.token_ids)
        got = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, gen)])
        assert (got - _chosen_logprobs(model, p, gen)).abs().max().item() < 1e-3
        for other in (no_sinks, no_window):
            assert (got - _chosen_logprobs(other, p, gen)).abs().max().item() > 0.1


def test_stepflow_in_sliding_and_full_layers(setup):
    """OEB in layer 0 (sliding window) and layer 1 (full attention) teacher-forced as in the other modules; and
    in vLLM's own counts, the window limits who is eligible: in the sliding layer only the first window - 1
    thinking queries still see question keys, in the full layer every thinking query does."""
    import stepscope.vllm as sv

    llm, model, tok = setup
    cfg = StepFlowConfig(fmt="think", tau_max=0.95, oeb_layers=[0, 1])
    assert_matches_teacher_forced(llm, model, tok, "w", lambda i: 20 + 6 * i, cfg)

    ids = _prompts(tok)[0]
    llm.generate([sv.prompt(ids, cfg)], [sv.sampling_params(cfg, "win", max_tokens=24, temperature=0)],
                 use_tqdm=False)
    s = sv.collect_stats(llm, keys=["win"], clear=True)["win"]
    heads, window = model.config.num_attention_heads, model.config.sliding_window
    assert s.oeb_eligible[0] == heads * (window - 1) < s.oeb_eligible[1]
    assert s.oeb_fires[0] > 0 and s.oeb_fires[1] > 0
