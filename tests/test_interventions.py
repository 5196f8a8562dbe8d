"""A repair beside OEB and SMI through the intervention interface (core/interventions.py): the test-only toy of
tests/toy_intervention.py, registered in that one module, run by the transformers engine against an independent
reference (a hook on the output projection that scales the thinking queries' inputs, the thinking read from an
offline Trace), with its config, stats, eval arms and summaries. The vLLM engine runs it in
tests/test_vllm_tiny_llama.py."""

from __future__ import annotations

import pytest
import torch
import toy_intervention  # noqa: F401  (registers "toy_gain")
from test_stepflow import QUESTIONS, left_pad, sharpen, think_response
from tiny import make_model, make_tokenizer

from stepscope.core.tally import StepFlowStats, Tally
from stepscope.errors import StepscopeError
from stepscope.evaluate.runner import build_arms
from stepscope.evaluate.summary import arm_label
from stepscope.flow import StepFlow, StepFlowConfig
from stepscope.trace import Trace

TOL = 1e-5
GAIN = 0.5


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer("think")
    model = sharpen(make_model("llama", vocab_size=len(tok)))
    traces = [Trace.from_text(tok, question=QUESTIONS[i], response=think_response(i, closed=i == 0), fmt="think")
              for i in range(2)]
    return model, tok, traces


def reference_logits(model, ids, mask, pos, thinking_cols: list[range], layers, gain=GAIN):
    """The plain model with each listed layer's o_proj input scaled by (1 + gain) at the thinking columns of
    each row: what the toy repair does, written without stepscope."""
    def hook(module, args):
        x = args[0].clone()
        for b, cols in enumerate(thinking_cols):
            x[b, list(cols)] *= 1.0 + gain
        return (x,)

    hooks = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(hook) for i in layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    finally:
        for h in hooks:
            h.remove()


def thinking_columns(traces, los) -> list[range]:
    """Each row's thinking tokens as columns of the left-padded batch (from the offline Trace's segments)."""
    return [range(lo + t.segments["thinking"][0], lo + t.segments["thinking"][1]) for t, lo in zip(traces, los)]


def test_toy_repair_teacher_forced_matches_the_reference(setup):
    model, tok, traces = setup
    cfg = StepFlowConfig(oeb=False, smi=False, fmt="think", interventions={"toy_gain": {"layers": [0, 2]}})
    ids, mask, pos, los = left_pad([t.token_ids for t in traces])
    cols = thinking_columns(traces, los)
    want = reference_logits(model, ids, mask, pos, cols, [0, 2])
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < TOL
    assert (plain - want)[real].abs().max().item() > 100 * TOL  # the repair changed something
    n = [len(c) for c in cols]
    assert n[0] > 10 and n[1] > 10
    st = flow.stats
    assert st.interventions == {"toy_gain": {0: sum(n), 2: sum(n)}}
    assert [flow.row_stats(b).interventions["toy_gain"][2] for b in (0, 1)] == n
    assert st.total_oeb_fires == 0 and st.total_smi_fires == 0
    assert "toy_gain layer   2: changed" in st.summary()


def test_toy_repair_while_decoding_matches_the_reference(setup):
    """Prefill the question, then feed the response one token at a time through the cache: the same logits as
    the reference's one forward (each decoding step's query reads its thinking from the tokens before it)."""
    from transformers import DynamicCache

    model, tok, traces = setup
    trace = traces[0]
    a, b = trace.segments["thinking"]
    n_prompt = a - 3  # decoding crosses the thinking start and its end
    ids = torch.tensor([trace.token_ids])
    cfg = StepFlowConfig(oeb=False, smi=False, fmt="think", interventions={"toy_gain": {"gain": GAIN}})
    layers = [0]  # the toy's default band: the shallow quarter of 4 layers
    want = reference_logits(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None],
                            thinking_columns([trace], [0]), layers)[0]
    got = []
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        cache = DynamicCache()
        got.append(model(input_ids=ids[:, :n_prompt], past_key_values=cache, use_cache=True).logits[0])
        for t in range(n_prompt, ids.shape[1]):
            got.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0])
    got = torch.cat(got)
    assert (got - want).abs().max().item() < TOL
    assert flow.stats.interventions == {"toy_gain": {0: b - a}}


def test_toy_repair_runs_after_oeb_and_smi_and_with_them_changes_the_output(setup):
    model, tok, traces = setup
    ids, mask, pos, los = left_pad([t.token_ids for t in traces])
    both = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[3], fmt="think")
    with torch.no_grad(), StepFlow(model, tok, both) as flow:
        plain_flow = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad(), StepFlow(model, tok, StepFlowConfig(**{**both.to_json(), "interventions": {
            "toy_gain": {"layers": [3]}}})) as flow2:
        with_toy = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (with_toy - plain_flow)[real].abs().max().item() > 100 * TOL
    s1, s2 = flow.stats, flow2.stats
    assert s2.oeb_fires == s1.oeb_fires and s2.smi_fires == s1.smi_fires and s1.total_smi_fires > 0
    assert s2.interventions["toy_gain"][3] == sum(len(c) for c in thinking_columns(traces, los))


def test_config_names_each_bad_setting_in_one_line():
    ok = StepFlowConfig(interventions={"toy_gain": None})
    assert ok.interventions == {"toy_gain": {"layers": None, "gain": GAIN}}
    assert StepFlowConfig.from_json(ok.to_json()) == ok
    assert "interventions" not in StepFlowConfig().to_json()  # OEB and SMI alone: the JSON (and salts) as always
    for spec, words in [({"nope": {}}, "unknown intervention 'nope'"),
                        ({"toy_gain": {"gamma": 1}}, "has no parameter 'gamma'"),
                        ({"toy_gain": {"gain": -2}}, "gain must be above -1"),
                        ({"toy_gain": {"gain": float("nan")}}, "gain must be a finite number"),
                        ({"toy_gain": {"layers": 3}}, "layers must be a list"),
                        (["toy_gain"], "must map names")]:
        with pytest.raises(StepscopeError, match=words):
            StepFlowConfig(interventions=spec)
    tok = make_tokenizer("think")
    with pytest.raises(StepscopeError, match="out of range"):
        StepFlow(make_model("llama", vocab_size=len(tok)), tok,
                 StepFlowConfig(fmt="think", interventions={"toy_gain": {"layers": [9]}}))


def test_eval_arms_and_labels_pick_up_a_registered_repair():
    arms = build_arms("baseline,toy_gain,stepflow+toy_gain")
    alone, both = arms["toy_gain"], arms["stepflow+toy_gain"]
    assert (alone.oeb, alone.smi, both.oeb, both.smi) == (False, False, True, True)
    assert alone.interventions == both.interventions == {"toy_gain": {"layers": None, "gain": GAIN}}
    assert arm_label("toy_gain") == "toy gain only" and arm_label("stepflow+toy_gain") == "StepFlow + toy gain"
    with pytest.raises(StepscopeError, match="toy_gain, stepflow\\+toy_gain"):
        build_arms("baseline,nope")


def test_stats_and_tallies_carry_a_repairs_counts_through_json():
    t = Tally(4, [0], [3], {"toy_gain": [1, 2]})
    t.extra["toy_gain"][[1, 2]] = [5, 7]
    t.tokens = 9
    u = Tally.from_json(t.to_json())
    u.add(t)
    st = u.to_stats()
    assert st.interventions == {"toy_gain": {1: 10, 2: 14}}
    assert StepFlowStats.from_json(st.to_json()) == st
    assert "interventions" not in Tally(4, [0], [3]).to_stats().to_json()
    assert "extra" not in Tally(4, [0], [3]).to_json()
