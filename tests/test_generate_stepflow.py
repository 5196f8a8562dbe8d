"""The generation loop under StepFlow: same tokens as transformers' generate under StepFlow, stats per row."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model, make_tokenizer, new_ids, peaked

from stepscope.flow.config import StepFlowConfig
from stepscope.flow.generate import generate_traces, stop_token_ids
from stepscope.flow.stepflow import StepFlow
from stepscope.prompts import build_prompt

QUESTIONS = ["What is 2+3?", "Name a prime bigger than 10, and explain why it is prime.", "hi"]
STRONG = StepFlowConfig(tau_max=0.9, alpha=2.0, smi_window="step")  # acts visibly on a random model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("think")


def first_stop(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
    out = []
    for r in rows:
        k = next((i for i, t in enumerate(r) if t in stop), None)
        out.append(r if k is None else r[:k + 1])
    return out


@pytest.mark.parametrize("arch", ["llama", "gptoss"])
def test_loop_under_stepflow_equals_generate_under_stepflow(tok, arch):
    """Greedy, left-padded, one row stopping early: our loop and transformers' generate, both under StepFlow."""
    model = make_model(arch, layers=4)
    n = 12
    plain = generate_traces(model, tok, QUESTIONS, max_new_tokens=n, temperature=0, progress=False)
    first = generate_traces(model, tok, QUESTIONS, stepflow=STRONG, max_new_tokens=n, temperature=0, progress=False)
    r0 = new_ids(first[0])
    stop = next((t for k, t in enumerate(r0[2:], 2) if t not in r0[:k]
                 and all(t not in new_ids(o)[:k + 2] for o in first[1:])), None)
    assert stop is not None
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    eos = stop_token_ids(model, tok)
    got = generate_traces(model, tok, QUESTIONS, stepflow=STRONG, max_new_tokens=n, temperature=0, progress=False)
    prompts = [build_prompt(tok, q)[1] for q in QUESTIONS]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with StepFlow(model, tok, StepFlowConfig(**{**STRONG.to_json(), "fmt": "think", "markers": None})) as sf:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             eos_token_id=sorted(eos), pad_token_id=0)
        assert sf.stats.total_oeb_fires > 0
    assert [new_ids(t) for t in got] == first_stop(out[:, P:].tolist(), eos)
    assert got[0].meta["stop_reason"] == "eos" and len(new_ids(got[0])) < n
    k = len(new_ids(got[0]))  # the stopped row left the batch (StepFlow.select_rows): fewer tokens were fed
    # each trace carries its own row's counts: its prompt, then its fed tokens (the stopped row fewer)
    fed = [t.meta["stepflow_stats"]["tokens"] for t in got]
    assert fed == [len(prompts[0]) + k - 1, len(prompts[1]) + n - 1, len(prompts[2]) + n - 1]
    assert [new_ids(t) for t in first] != [new_ids(t) for t in plain]  # StepFlow did act
    st = first[0].meta["stepflow_stats"]
    assert sum(st["oeb_fires"].values()) > 0 and st["forwards"] == n
    assert st["tokens"] == len(prompts[0]) + n - 1  # its prompt, then every fed token
    assert len({json.dumps(t.meta["stepflow_stats"]["bridge_mass_before"]) for t in first}) == 3  # rows differ
    assert first[0].meta["config"]["stepflow"]["tau_max"] == 0.9
    # the model is itself again afterwards
    model.generation_config.eos_token_id = tok.eos_token_id
    again = generate_traces(model, tok, QUESTIONS, max_new_tokens=n, temperature=0, progress=False)
    assert [new_ids(t) for t in again] == [new_ids(t) for t in plain]


def test_stepflow_rows_are_paired_and_independent_of_the_batch(tok):
    """Sampling under StepFlow: a row's tokens are the same alone and in a batch."""
    model = peaked(make_model("llama", layers=4))
    kw = dict(stepflow=STRONG, max_new_tokens=16, temperature=0.8, top_p=0.9, progress=False)
    together = generate_traces(model, tok, QUESTIONS, seeds=[5, 6, 7], batch_size=3, **kw)
    alone = [generate_traces(model, tok, [q], seeds=[s], batch_size=1, **kw)[0] for q, s in zip(QUESTIONS, [5, 6, 7])]
    assert [new_ids(t) for t in together] == [new_ids(t) for t in alone]
    # stats are per row: a row's counts are the same alone and in the batch (its bridge masses to rounding)
    for a, t in zip(alone, together):
        sa, st = a.meta["stepflow_stats"], t.meta["stepflow_stats"]
        for key in ("oeb_fires", "oeb_eligible", "smi_fires", "tokens"):
            assert sa[key] == st[key], key
        for key in ("bridge_mass_before", "bridge_mass_after"):
            assert sa[key] == pytest.approx(st[key], abs=1e-5), key
    assert sum(sum(t.meta["stepflow_stats"]["oeb_fires"].values()) for t in together) > 0


def test_budget_forcing_under_stepflow(tok):
    model = make_model("qwen3", layers=4)
    tr = generate_traces(model, tok, QUESTIONS[:2], stepflow=StepFlowConfig(), max_new_tokens=14,
                         max_thinking_tokens=5, temperature=0, progress=False)
    for t in tr:
        assert t.meta["budget_forced"] and t.thinking_closed and t.meta["thinking_tokens"] == 5
        assert t.meta["stepflow_stats"]["forwards"] == 14
