"""The generation loop: exactness against transformers' generate, per-row sampling, budget forcing, stops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import make_model, make_tokenizer, new_ids, peaked

from stepscope.decoding import DecodeConfig
from stepscope.errors import StepscopeError
from stepscope.flow.generate import generate_traces, response_text, run_config, sample_tokens, stop_token_ids
from stepscope.formats import HARMONY, THINK
from stepscope.prompts import build_prompt, forced_close_text

QUESTIONS = ["What is 2+3?", "Name a prime bigger than 10, and explain why it is prime.", "hi"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("think")


@pytest.fixture(scope="module")
def llama():
    return peaked(make_model("llama", layers=2))


def hf_generate(model, tok, questions, max_new_tokens, eos):
    prompts = [build_prompt(tok, q)[1] for q in questions]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(eos), pad_token_id=0)
    rows = []
    for r in out[:, P:].tolist():  # cut each row after its first stop token, as our loop does
        k = next((i for i, t in enumerate(r) if t in eos), None)
        rows.append(r if k is None else r[:k + 1])
    return rows


def early_stop_token(model, tok, questions, n):
    """A token that row 0 writes (greedy) a few steps in and the other rows do not write before it."""
    rows = hf_generate(model, tok, questions, n, stop_token_ids(model, tok))
    for k in range(2, n):
        t = rows[0][k]
        if t not in rows[0][:k] and all(t not in r[:k + 3] for r in rows[1:]):
            return t
    pytest.skip("no usable early stop token for this random model")


# -- exactness of the loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gptoss"])
def test_greedy_equals_transformers_generate(tok, arch):
    """Left-padded batch, KV cache, one row stopping early (and leaving the batch): same tokens as generate()."""
    model = make_model(arch, layers=2)
    n = 14  # gptoss: longer than its sliding window of 8
    stop = early_stop_token(model, tok, QUESTIONS, n)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    eos = stop_token_ids(model, tok)
    assert stop in eos
    want = hf_generate(model, tok, QUESTIONS, n, eos)
    got = generate_traces(model, tok, QUESTIONS, max_new_tokens=n, temperature=0, batch_size=3, progress=False)
    assert [new_ids(t) for t in got] == want
    assert got[0].meta["stop_reason"] == "eos" and len(new_ids(got[0])) < n
    assert got[1].meta["stop_reason"] == "length" and len(new_ids(got[1])) == n


def test_sampled_row_is_the_same_alone_and_in_a_batch(tok, llama):
    seeds = [11, 22, 33]
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=0, progress=False)
    together = generate_traces(llama, tok, QUESTIONS, seeds=seeds, batch_size=3, **kw)
    alone = [generate_traces(llama, tok, [q], seeds=[s], batch_size=1, **kw)[0] for q, s in zip(QUESTIONS, seeds)]
    assert [new_ids(t) for t in together] == [new_ids(t) for t in alone]
    # other batch companions and order, with top-k too
    kw2 = dict(kw, top_k=50)
    a = generate_traces(llama, tok, [QUESTIONS[1], QUESTIONS[0], QUESTIONS[1]], seeds=[22, 5, 7], **kw2)
    b = generate_traces(llama, tok, [QUESTIONS[1]], seeds=[22], **kw2)
    assert new_ids(a[0]) == new_ids(b[0])
    assert new_ids(a[0]) != new_ids(a[2])  # another seed, another sample
    again = generate_traces(llama, tok, QUESTIONS, seeds=seeds, batch_size=2, **kw)
    assert [new_ids(t) for t in again] == [new_ids(t) for t in together]


def test_sampled_row_survives_a_neighbour_leaving_the_batch(tok, llama):
    """A row that finishes early leaves the batch; the others keep their samples (their uniforms stay aligned)."""
    kw = dict(max_new_tokens=20, temperature=0.8, top_p=0.95, progress=False)
    base = generate_traces(llama, tok, QUESTIONS[:2], seeds=[3, 4], batch_size=1, **kw)
    stop = new_ids(base[0])[4]
    if stop in new_ids(base[1]):
        pytest.skip("the chosen stop token also appears in the other row")
    llama.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        got = generate_traces(llama, tok, QUESTIONS[:2], seeds=[3, 4], batch_size=2, **kw)
    finally:
        llama.generation_config.eos_token_id = tok.eos_token_id
    first = new_ids(base[0])
    assert new_ids(got[0]) == first[:first.index(stop) + 1]
    assert new_ids(got[1]) == new_ids(base[1])


# -- budget forcing ------------------------------------------------------------------------------------------


def close_index(tok, forced: list[int], marker: str) -> int:
    """Index in `forced` of the token that completes `marker`."""
    return next(j for j in range(len(forced)) if marker in tok.decode(forced[:j + 1]))


@pytest.mark.parametrize("budget", [0, 7])
def test_budget_forcing_closes_the_thinking_at_the_budget(tok, llama, budget):
    tr = generate_traces(llama, tok, QUESTIONS[:2], max_new_tokens=budget + 12, max_thinking_tokens=budget,
                         temperature=0, progress=False)
    forced = tok(forced_close_text(THINK), add_special_tokens=False)["input_ids"]
    for t in tr:
        gen, P = new_ids(t), t.meta["num_prompt_tokens"]
        assert gen[budget:budget + len(forced)] == forced
        assert t.meta["budget_forced"] and t.meta["thinking_closed"] and t.meta["thinking_tokens"] == budget
        assert t.segments["thinking"][1] == P + budget + close_index(tok, forced, "</think>") + 1
        assert t.segments["summary"][1] == len(t) and "</think>" in response_text(t)


# -- a scripted model: the host-side logic (natural closes, stops, streaming, harmony) ------------------------


class ScriptedLM(torch.nn.Module):
    """Writes a fixed script per row, chosen by the row's prompt length; it keeps (script, step) in the KV
    cache, so rows leaving the batch (cache row selection) are followed exactly."""

    def __init__(self, vocab_size: int, scripts: dict[int, list[int]]):
        super().__init__()
        from transformers import GenerationConfig, LlamaConfig

        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  num_key_value_heads=1, intermediate_size=8)
        self.generation_config = GenerationConfig(eos_token_id=2)
        self.emb = torch.nn.Embedding(1, 1)
        self.by_len = {n: i for i, n in enumerate(scripts)}
        width = max(len(s) for s in scripts.values()) + 1
        self.table = torch.full((len(scripts), width), 5, dtype=torch.long)  # after a script: token 5 forever
        for i, s in enumerate(scripts.values()):
            self.table[i, :len(s)] = torch.tensor(s)
        self.vocab_size = vocab_size

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        B, Q = input_ids.shape
        if cache.get_seq_length() == 0:
            sid = torch.tensor([self.by_len[int(n)] for n in attention_mask.sum(-1)])
            state = torch.stack([sid, torch.zeros_like(sid)], -1).float()  # [B, 2]
        else:
            prev = cache.layers[0].keys[:, 0, -1, :]  # [B, 2]
            state = prev + torch.tensor([0.0, 1.0])
        k = state[:, None, None, :].expand(B, 1, Q, 2).contiguous()
        cache.update(k, k, 0)
        sid, step = state[:, 0].long(), state[:, 1].long().clamp(max=self.table.shape[1] - 1)
        nxt = self.table[sid, step]  # [B]
        logits = torch.nn.functional.one_hot(nxt, self.vocab_size).float()[:, None, :] * 50.0
        return SimpleNamespace(logits=logits)


def scripted(tok, questions, texts, fmt="auto"):
    lens = [len(build_prompt(tok, q, fmt=fmt)[1]) for q in questions]
    assert len(set(lens)) == len(lens)
    scripts = {n: tok(t, add_special_tokens=False)["input_ids"] for n, t in zip(lens, texts)}
    return ScriptedLM(len(tok), scripts)


ANSWER = "Two plus three makes five. Let me check: 2 + 3 = 5, yes.\n</think>\n\nThe answer is \\boxed{5}.<|im_end|>"
ENDLESS = "I keep thinking about it. " * 6


def test_natural_close_stop_and_rows_leaving(tok):
    model = scripted(tok, QUESTIONS, [ANSWER, ENDLESS, "Short one.\n</think>\n\nOk.<|im_end|>"])
    tr = generate_traces(model, tok, QUESTIONS, max_new_tokens=40, max_thinking_tokens=30, temperature=0,
                         progress=False)
    assert response_text(tr[0]) == ANSWER.removesuffix("<|im_end|>")
    assert tr[0].meta["stop_reason"] == "eos" and not tr[0].meta["budget_forced"] and tr[0].thinking_closed
    assert tr[2].meta["stop_reason"] == "eos" and response_text(tr[2]) == "Short one.\n</think>\n\nOk."
    assert tr[1].meta["budget_forced"] and tr[1].thinking_closed and tr[1].meta["stop_reason"] == "length"
    assert tr[1].meta["thinking_tokens"] == 30 and len(new_ids(tr[1])) == 40
    assert response_text(tr[1]).startswith(ENDLESS[:60]) and "\n</think>\n\n" in response_text(tr[1])
    # sampling cannot leave a one-hot script either
    again = generate_traces(model, tok, QUESTIONS, max_new_tokens=40, max_thinking_tokens=30, temperature=1.0,
                            top_p=0.5, progress=False)
    assert [new_ids(t) for t in again] == [new_ids(t) for t in tr]


def test_stream_gives_the_response_text(tok):
    text = "Café, naïve, 漢字 and emoji 🙂 here. Done.\n</think>\n\nÀ bientôt 🙂.<|im_end|>"
    model = scripted(tok, QUESTIONS[:1], [text])
    pieces: list[str] = []
    tr = generate_traces(model, tok, QUESTIONS[:1], max_new_tokens=80, temperature=0, stream=pieces.append)
    assert "".join(pieces) == response_text(tr[0]) == text.removesuffix("<|im_end|>")
    assert all("\ufffd" not in p for p in pieces)


def test_harmony_budget_forcing(harmony_tokenizer):
    tok = harmony_tokenizer
    text = "<|channel|>analysis<|message|>We need to add. " + "Still thinking here. " * 5
    model = scripted(tok, QUESTIONS[:1], [text], fmt="harmony")
    tr = generate_traces(model, tok, QUESTIONS[:1], max_new_tokens=40, max_thinking_tokens=6, fmt="harmony",
                         temperature=0, progress=False)[0]
    forced = tok(forced_close_text(HARMONY), add_special_tokens=False)["input_ids"]
    head = len(tok("<|channel|>analysis<|message|>", add_special_tokens=False)["input_ids"])
    gen = new_ids(tr)
    assert gen[head + 6:head + 6 + len(forced)] == forced
    assert tr.fmt == "harmony" and tr.meta["thinking_tokens"] == 6 and tr.thinking_closed
    assert tr.segments["summary"][0] == tr.meta["num_prompt_tokens"] + head + 6 + 1  # after "<|end|>"
    assert tr.segment_text("summary").startswith("<|start|>assistant<|channel|>final<|message|>")


# -- sampling against a slow reference ------------------------------------------------------------------------


def reference_sample(logits: list[float], u: float, temperature: float, top_k: int, top_p: float) -> int:
    """Plain Python: scale, keep the top-k, keep the top-p nucleus, walk the kept mass in vocabulary order."""
    import math

    x = [v / temperature for v in logits]
    V = len(x)
    if 0 < top_k < V:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    e = [math.exp(v - m) if v > -math.inf else 0.0 for v in x]
    z = sum(e)
    p = [v / z for v in e]
    if top_p < 1.0:
        sp = sorted(p, reverse=True)
        acc, thresh = 0.0, sp[0]
        for v in sp:
            if acc >= top_p:
                break
            thresh, acc = v, acc + v
        p = [v if v >= thresh else 0.0 for v in p]
    target = u * sum(p)
    acc = 0.0
    for i, v in enumerate(p):
        acc += v
        if acc > target:
            return i
    return max(i for i, v in enumerate(p) if v > 0)


def test_sample_tokens_matches_reference():
    g = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 4, 1.0), (0.6, 5, 0.8)]:
        logits = torch.randn(64, 12, generator=g, dtype=torch.float64) * 2
        u = torch.rand(64, generator=g, dtype=torch.float64)
        got = sample_tokens(logits, u, temperature, top_k, top_p).tolist()
        # float32 inside sample_tokens: compare away from boundaries, where float rounding cannot decide
        want = [reference_sample(row.tolist(), float(x), temperature, top_k, top_p) for row, x in zip(logits, u)]
        assert got == want


def test_sample_tokens_frequencies_follow_the_filtered_distribution():
    """A fine grid of uniforms maps onto each kept token in proportion to its probability (within 1/grid)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    got = sample_tokens(logits.expand(n, -1), u, temperature=0.8, top_k=0, top_p=0.9)
    freq = torch.bincount(got, minlength=6).double() / n
    p = torch.softmax(logits[0].double() / 0.8, -1)
    keep = torch.zeros(6, dtype=torch.bool)
    acc = 0.0
    for i in torch.argsort(p, descending=True).tolist():
        if acc >= 0.9:
            break
        keep[i], acc = True, acc + float(p[i])
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    assert torch.allclose(freq, q, atol=2.0 / n)


# -- stop tokens and bad input -------------------------------------------------------------------------------


def test_stop_tokens(harmony_tokenizer):
    smol = make_tokenizer("smollm2")
    model = make_model("llama", layers=1)
    ids = stop_token_ids(model, smol)
    assert smol.convert_tokens_to_ids("<|im_end|>") in ids
    h = stop_token_ids(model, harmony_tokenizer)
    assert harmony_tokenizer.convert_tokens_to_ids("<|return|>") in h
    assert harmony_tokenizer.convert_tokens_to_ids("<|end|>") not in h  # ends the analysis, not the turn


@pytest.mark.parametrize("kwargs, msg", [
    (dict(questions=["a", "b"], stream=print), "single question"),
    (dict(questions=["a"], seeds=[1, 2]), "seeds"),
    (dict(questions=["a"], temperature=-1), "temperature"),
    (dict(questions=["a"], temperature=0, do_sample=True), "temperature > 0"),
    (dict(questions=["a"], top_p=0), "top_p"),
    (dict(questions=["  "]), "empty"),
    (dict(questions=["a"], max_new_tokens=0), "max_new_tokens"),
    (dict(questions=["a"], prompt_style="cot"), "prompt style"),
])
def test_bad_input_is_a_clear_error(tok, llama, kwargs, msg):
    with pytest.raises(StepscopeError, match=msg):
        generate_traces(llama, tok, progress=False, **kwargs)


def test_decode_config_is_the_keyword_arguments(tok, llama):
    """decode=DecodeConfig(...) and the same fields as keyword arguments give the same traces and config; the
    default seeds count up from decode.seed; giving both ways, or an unknown keyword, is an error."""
    kw = dict(max_new_tokens=6, max_thinking_tokens=2, temperature=0.9, top_p=0.8, top_k=30)
    a = generate_traces(llama, tok, QUESTIONS[:2], seeds=[5, 6], progress=False, **kw)
    b = generate_traces(llama, tok, QUESTIONS[:2], decode=DecodeConfig(**kw, seed=5), progress=False)
    assert [t.token_ids for t in a] == [t.token_ids for t in b] and [t.meta["seed"] for t in b] == [5, 6]
    assert a[0].meta["config"] == b[0].meta["config"] == run_config(llama, tok, decode=DecodeConfig(**kw))
    cfg = a[0].meta["config"]
    assert {k: cfg[k] for k in kw} == kw and cfg["do_sample"] is True and "seed" not in cfg
    assert run_config(llama, tok, temperature=0)["do_sample"] is False
    with pytest.raises(StepscopeError, match="not both"):
        generate_traces(llama, tok, QUESTIONS[:1], decode=DecodeConfig(), temperature=0, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temp'"):
        generate_traces(llama, tok, QUESTIONS[:1], temp=0, progress=False)
    with pytest.raises(StepscopeError, match="decode must be a DecodeConfig"):
        generate_traces(llama, tok, QUESTIONS[:1], decode={"temperature": 0}, progress=False)
    changed = DecodeConfig()
    changed.top_k = -1  # changed after it was built: checked again
    with pytest.raises(StepscopeError, match="top_k"):
        generate_traces(llama, tok, QUESTIONS[:1], decode=changed, progress=False)


def test_meta_and_order(tok, llama):
    tr = generate_traces(llama, tok, QUESTIONS, max_new_tokens=5, temperature=0, batch_size=2, progress=False,
                         metas=[{"id": "a"}, {"id": "b"}, {"id": "c"}])
    assert [t.meta["id"] for t in tr] == ["a", "b", "c"] and [t.meta["question"] for t in tr] == QUESTIONS
    m = tr[0].meta
    assert m["seed"] == 0 and m["num_new_tokens"] == 5 and m["config"]["stepflow"] is None
    assert m["config"]["do_sample"] is False and m["timing"]["batch_seconds"] > 0
    for t in tr:
        t.validate()
        assert t.token_ids[:t.meta["num_prompt_tokens"]] == build_prompt(tok, t.meta["question"])[1]


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 10.0])
def test_sample_tokens_candidate_path_equals_full_sort(scale):
    """The partial top-k shortcut (with its per-row fallback) picks exactly what the full sort picks."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 2000, generator=g) * scale
    u = torch.rand(300, generator=g, dtype=torch.float64)
    for top_k, top_p in [(0, 0.95), (0, 0.5), (40, 1.0), (100, 0.9), (600, 0.9), (0, 1.0)]:
        fast = sample_tokens(logits, u, 0.7, top_k, top_p, candidates=64)
        full = sample_tokens(logits, u, 0.7, top_k, top_p, candidates=0)
        assert torch.equal(fast, full)


@pytest.mark.slow
def test_smollm2_short_run_plain_and_stepflow():
    """The bundled real model: our greedy loop equals generate(); StepFlow runs and acts; the trace is sound."""
    from stepscope.flow.config import StepFlowConfig
    from stepscope.models import load_model

    model, tok = load_model("default", device="cpu", dtype="float32")
    qs = ["What is 12 + 30?", "A train travels 60 km in 1.5 hours. What is its average speed?"]
    n = 8
    plain = generate_traces(model, tok, qs, max_new_tokens=n, temperature=0, progress=False)
    assert [new_ids(t) for t in plain] == hf_generate(model, tok, qs, n, stop_token_ids(model, tok))
    flow = generate_traces(model, tok, qs, stepflow=StepFlowConfig(), max_new_tokens=n, temperature=0.6,
                           max_thinking_tokens=2, progress=False)
    st = flow[0].meta["stepflow_stats"]
    assert st["oeb_layers"] == list(range(7)) and st["smi_layers"] == list(range(23, 30))
    assert sum(st["oeb_eligible"].values()) > 0 and st["forwards"] == n
    for t in flow:
        t.validate()
        assert t.fmt == "think" and t.meta["budget_forced"] and t.thinking_closed
        assert "</think>" in response_text(t)


def test_ids_beyond_the_tokenizer_are_never_picked(tok):
    """Models pad their embedding table (Qwen2.5: 152064 rows, 151665 tokens): those ids must never come out."""
    model = scripted(tok, QUESTIONS[:1], ["x"])
    model.vocab_size = len(tok) + 16
    model.table[0, 0] = len(tok) + 3  # the script's first token lies beyond the tokenizer
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=1.0)):
        tr = generate_traces(model, tok, QUESTIONS[:1], max_new_tokens=3, progress=False, **kw)[0]
        assert all(t < len(tok) for t in new_ids(tr))
