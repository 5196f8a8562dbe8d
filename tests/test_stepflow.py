"""StepFlow against an independent, slow reference: explicit group shifts and value means in Python loops.

The reference below shares no code with stepscope.flow: it reads segments and steps from an offline Trace,
computes every OEB query and head one at a time with logit shifts log(tau/p) and a fresh softmax (docs/method.md
§5 in its logit form), and adds SMI as alpha times an explicit mean of value vectors. Tolerance: 1e-5 on
float32 logits (the two paths differ only in summation order and in sdpa versus explicit attention).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from tiny import make_model, make_tokenizer
from transformers import LogitsProcessor

from stepscope.errors import StepscopeError
from stepscope.flow import StepFlow, StepFlowConfig
from stepscope.trace import Trace

TOL = 1e-5

QUESTIONS = [
    "What is 12 times 13? Give the final number.",
    "A train leaves at noon and travels 60 miles per hour. How far has it gone by 3 pm?",
]
THINKING = [
    "First I split the product into easy parts. Twelve times ten is one hundred and twenty. "
    "Twelve times three is thirty six.\n\nAdding the two parts gives one hundred fifty six. "
    "Let me check it another way. Thirteen times twelve must be the same number!",
    "The train runs for three hours between noon and three. Each hour it covers sixty miles. "
    "So the distance is three times sixty miles.\n\nThat makes one hundred and eighty miles in total. "
    "Is that reasonable? Yes, since sixty miles each hour for three hours adds up.",
]
ANSWERS = ["The answer is 156.\n\nIt was checked twice.", "It has gone 180 miles."]


def think_response(i: int, closed: bool = True) -> str:
    return THINKING[i] + ("</think>\n\n" + ANSWERS[i] if closed else "")


def harmony_response(i: int) -> str:
    return ("<|channel|>analysis<|message|>" + THINKING[i] + "<|end|><|start|>assistant<|channel|>final<|message|>"
            + ANSWERS[i] + "<|return|>")


def sharpen(model, factor: float = 12.0):
    """Peaky attention, so that bridge masses vary and OEB both fires and holds back."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor / 3)
    return model


# -- the reference ---------------------------------------------------------------------------------------------

def _segment_of(trace: Trace, r: int) -> str:
    for kind in ("question", "thinking", "summary"):
        a, b = trace.segments[kind]
        if a <= r < b:
            return kind
    raise AssertionError(r)


def _smi_fires(trace: Trace, window) -> dict[int, list[int]]:
    """real query index -> real key indices of the previous step's window."""
    fires = {}
    for prev, cur in zip(trace.steps, trace.steps[1:]):
        if prev.kind == "thinking" and cur.kind == "thinking":
            r = max(cur.token_start, prev.closed_at)
            ks = list(range(prev.token_start, prev.token_end))
            if window != "step":
                ks = ks[-window:]
            if _segment_of(trace, r) == "thinking":
                fires[r] = ks
    return fires


class Reference:
    """Registers an eager attention function that applies StepFlow by brute force, row by row."""

    NAME = "stepscope_test_reference"

    def __init__(self, model, traces: list[Trace], los: list[int], cfg: StepFlowConfig):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        self.model, self.traces, self.los, self.cfg = model, traces, los, cfg
        self.oeb, self.smi = cfg.resolve(model.config.num_hidden_layers)
        self.fires = [_smi_fires(t, cfg.smi_window) for t in traces]
        self.oeb_fired = 0
        AttentionInterface.register(self.NAME, self._attention)
        AttentionMaskInterface.register(self.NAME, eager_mask)

    def logits(self, ids, mask, pos):
        cfg = self.model.config
        saved = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = self.NAME
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        finally:
            cfg._attn_implementation_internal = saved

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, w = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
        layer = module.layer_idx
        if layer not in self.oeb and layer not in self.smi:
            return out, w
        out = out.clone()  # [B, T, H, D]
        B, H, T, D = query.shape
        n_rep = H // key.shape[1]
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        sinks = getattr(module, "sinks", None)
        for b in range(B):
            lo, trace = self.los[b], self.traces[b]
            for t in range(lo, T):
                r = t - lo
                ks = [k for k in range(lo, t + 1) if window is None or t - k < window]
                kt = torch.tensor(ks)
                seg = _segment_of(trace, r)
                fire = seg == "thinking" and r in self.fires[b]
                win = torch.tensor([k + lo for k in self.fires[b][r] if k + lo in ks]) if fire else None
                for h in range(H):
                    kv = h // n_rep
                    z = (key[b, kv, kt] @ query[b, h, t]) * scaling  # [n]
                    if layer in self.oeb and seg != "question":
                        z = self._shift(z, [k - lo for k in ks], seg, r, trace,
                                        None if sinks is None else sinks[h])
                    if layer in self.oeb or fire:
                        full = torch.cat([z, sinks[h].reshape(1)]) if sinks is not None else z
                        p = torch.softmax(full, 0)[:len(ks)]
                        o = p @ value[b, kv, kt]
                    else:
                        o = out[b, t, h]
                    if layer in self.smi and fire and len(win):
                        o = o + self.cfg.alpha * value[b, kv, win].mean(0)
                    out[b, t, h] = o
        return out, None

    def _shift(self, z, reals, seg, r, trace, sink):
        """Explicit docs/method.md §5 shifts of one query's logits (keys given by real index)."""
        t0, s0 = trace.segments["thinking"][0], trace.segments["summary"][0]
        k = torch.tensor(reals)
        if seg == "thinking":
            in_b, in_s = k < t0, (k >= t0) & (k <= r)
        else:
            in_b, in_s = (k >= t0) & (k < s0), (k >= s0) & (k <= r)
        nb, ns = int(in_b.sum()), int(in_s.sum())
        if nb == 0:
            return z
        tau_b = min(math.sqrt(nb / (nb + ns)), self.cfg.tau_max)
        full = torch.cat([z, sink.reshape(1)]) if sink is not None else z
        p = torch.softmax(full.double(), 0)[:len(reals)]
        pb, ps = float(p[in_b].sum()), float(p[in_s].sum())
        tau_s = 1.0 - (1.0 - pb - ps) - tau_b
        if not (pb < tau_b and pb > 0 and ps > 0 and tau_s > 0):
            return z
        self.oeb_fired += 1
        z = z.clone()
        z[in_b] += math.log(tau_b / pb)
        z[in_s] += math.log(tau_s / ps)
        return z


# -- helpers ----------------------------------------------------------------------------------------------------

def left_pad(seqs: list[list[int]], pad: int = 0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s)
        mask[b, T - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, pos, [T - len(s) for s in seqs]


def build(arch: str, fam: str, **kw):
    tok = make_tokenizer(fam)
    model = make_model(arch, vocab_size=len(tok), **kw)
    return sharpen(model), tok


def prompt_and_continuation(tok, fam: str, i: int) -> tuple[list[int], list[int]]:
    """The chat prompt of QUESTIONS[i] and the ids of its response (a `fam` family's thinking and answer)."""
    msgs = [{"role": "user", "content": QUESTIONS[i]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    resp = harmony_response(i) if fam == "harmony" else think_response(i)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(resp, add_special_tokens=False)["input_ids"]
    return p, c


def teacher_forced(model, tok, cfg, ids: list[int]) -> torch.Tensor:
    """The logits [T, V] of one forward over `ids` under StepFlow with `cfg` (what decoding must equal)."""
    with torch.no_grad(), StepFlow(model, tok, cfg):
        return model(torch.tensor([ids])).logits[0]  # [T, V]


class Force(LogitsProcessor):
    """Greedy decoding that must follow given continuations (one per row)."""

    def __init__(self, conts: list[list[int]], start: int):
        self.conts, self.start = conts, start

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start
        out = torch.full_like(scores, float("-inf"))
        for b, c in enumerate(self.conts):
            out[b, c[step]] = 0.0
        return out


def traces_for(tok, fam: str, closed=(True, True)) -> list[Trace]:
    out = []
    for i in range(2):
        resp = harmony_response(i) if fam == "harmony" else think_response(i, closed[i])
        out.append(Trace.from_text(tok, question=QUESTIONS[i], response=resp, fmt="harmony" if fam == "harmony"
                                   else "think"))
    return out


ARCHS = [
    ("llama", "think", {}),
    ("qwen2", "think", {}),
    ("qwen3", "think", {}),
    ("mistral", "think", {"sliding_window": 24}),
    ("gptoss", "harmony", {}),
]


# -- tests ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,fam,over", ARCHS, ids=[a[0] for a in ARCHS])
def test_teacher_forced_matches_reference(arch, fam, over):
    """A left-padded batch of two traces (one ending in the summary, one cut inside the thinking for the
    think family); OEB and SMI both in play, including summary queries and sliding windows."""
    model, tok = build(arch, fam, **over)
    traces = traces_for(tok, fam, closed=(True, False))
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3],
                         fmt="harmony" if fam == "harmony" else "think")
    ids, mask, pos, los = left_pad([t.token_ids for t in traces])
    ref = Reference(model, traces, los, cfg)
    want = ref.logits(ids, mask, pos)
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    err = (got - want)[real].abs().max().item()
    assert err < TOL, err
    assert (plain - want)[real].abs().max().item() > 100 * TOL  # StepFlow changed something
    st = flow.stats
    assert st.oeb_fires[0] > 0 and st.oeb_fires[1] > 0
    assert st.oeb_fires[0] < st.oeb_eligible[0]  # and also held back
    assert sum(st.oeb_fires.values()) == ref.oeb_fired  # same decisions, query-head by query-head
    n_fires = sum(len(f) for f in ref.fires)
    assert n_fires >= 6 and st.smi_fires == {2: n_fires, 3: n_fires}
    for i in (0, 1):
        assert st.bridge_mass_after[i] > st.bridge_mass_before[i]


@pytest.mark.parametrize("window", ["step", 2])
def test_gptoss_smi_windows_and_sinks(window):
    """GPT-OSS: SMI on a sliding layer (window 8) and a full layer, with whole-step windows that the sliding
    layer can only partly see; OEB with sinks on both kinds of layer."""
    model, tok = build("gptoss", "harmony")
    traces = traces_for(tok, "harmony")[:1]
    cfg = StepFlowConfig(tau_max=0.5, alpha=0.7, oeb_layers=[1, 2], smi_layers=[2, 3], smi_window=window,
                         fmt="harmony")
    ids, mask, pos, los = left_pad([t.token_ids for t in traces])
    want = Reference(model, traces, los, cfg).logits(ids, mask, pos)
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() < TOL
    assert flow.stats.smi_fires[2] > 0 and flow.stats.oeb_fires[2] > 0


def test_zero_strength_equals_plain_and_path_is_live():
    """tau_max = 0 and alpha = 0: the band layers run StepFlow's own attention, and the logits equal the
    plain model's; OEB saw eligible queries but never fired."""
    model, tok = build("llama", "think")
    traces = traces_for(tok, "think")
    ids, mask, pos, _ = left_pad([t.token_ids for t in traces])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with StepFlow(model, tok, tau_max=0.0, alpha=0.0, fmt="think") as flow:
            got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (got - plain)[real].abs().max().item() < TOL
    st = flow.stats
    assert st.oeb_eligible[0] > 0 and st.oeb_fires[0] == 0 and st.smi_fires[3] > 0


def test_defaults_fire_on_real_model(traces_available):
    """SmolLM2 (30 layers) with the paper's defaults on a real trace: OEB fires in the bottom quarter, SMI in the
    top quarter, and the logits match the reference (one layer of each band checked, to stay fast)."""
    from conftest import shared_trace_records

    from stepscope.models import load_model

    model, tok = load_model("default", device="cpu")
    rec = min((r for r in shared_trace_records() if "</think>" in r["response"]), key=lambda r: len(r["response"]))
    trace = Trace.from_text(tok, question=rec["problem"], response=rec["response"], fmt="think", strict=False)
    trace = Trace.from_ids(tok, trace.token_ids[:140], fmt="think")
    assert trace.segments["summary"][1] > trace.segments["summary"][0] + 10  # thinking and some summary
    cfg = StepFlowConfig(fmt="think")
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        got = model(torch.tensor([trace.token_ids])).logits
    st = flow.stats
    assert st.oeb_layers == list(range(7)) and st.smi_layers == list(range(23, 30))
    assert st.total_oeb_fires > 0 and st.total_smi_fires > 0
    small = StepFlowConfig(fmt="think", oeb_layers=[0], smi_layers=[29])
    with torch.no_grad(), StepFlow(model, tok, small):
        got = model(torch.tensor([trace.token_ids])).logits
    want = Reference(model, [trace], [0], small).logits(torch.tensor([trace.token_ids]), None, None)
    assert (got - want).abs().max().item() < 1e-4


def test_exit_restores_model_bit_identical():
    model, tok = build("qwen2", "think")
    ids = torch.tensor([traces_for(tok, "think")[0].token_ids])
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids).logits
        with StepFlow(model, tok, fmt="think"):
            assert model.config._attn_implementation.startswith("stepscope_flow_")
            model(ids)
        after = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"), StepFlow(model, tok, fmt="think"):
            model(ids)
            raise RuntimeError("boom")
        after_error = model(ids).logits
    assert torch.equal(before, after) and torch.equal(before, after_error)
    assert model.config._attn_implementation == impl
    assert not model.model._forward_pre_hooks
    assert not any("_stepscope_flow" in m.__dict__ for m in model.modules())


def test_errors_are_clear():
    model, tok = build("llama", "think")
    ids = torch.tensor([traces_for(tok, "think")[0].token_ids])
    with torch.no_grad():
        with StepFlow(model, tok, fmt="think"):
            with pytest.raises(StepscopeError, match="input_ids"):
                model(inputs_embeds=model.model.embed_tokens(ids))
            with pytest.raises(StepscopeError, match="already open"), StepFlow(model, tok, fmt="think"):
                pass
        with pytest.raises(StepscopeError, match="tau_max"):
            StepFlow(model, tok, tau_max=1.5)
        with pytest.raises(StepscopeError, match="layers"):
            StepFlow(model, tok, oeb_layers=[9])
        with pytest.raises(StepscopeError, match="markers"):
            StepFlow(model, tok, fmt="markers")  # no markers given
        model.config._attn_implementation_internal = "flex_attention"
        try:
            with pytest.raises(StepscopeError, match="sdpa"), StepFlow(model, tok, fmt="think"):
                pass
        finally:
            model.config._attn_implementation_internal = "sdpa"
    split, _ = build("llama", "think")
    split.model.layers[-1].to("meta")  # weights on two devices, as a device_map over several GPUs gives
    with pytest.raises(StepscopeError, match="one device"), StepFlow(split, tok, fmt="think"):
        pass
    assert split.config._attn_implementation == "sdpa"  # nothing was switched


def test_config_defaults_and_json():
    c = StepFlowConfig()
    assert (c.tau_max, c.alpha, c.smi_window) == (0.15, 0.06, 4)
    assert c.resolve(30) == (list(range(7)), list(range(23, 30)))
    assert c.resolve(28) == (list(range(7)), list(range(21, 28)))
    assert c.resolve(4) == ([0], [3])
    assert c.resolve(1) == ([0], [0])
    assert StepFlowConfig(oeb=False).resolve(8) == ([], [6, 7])
    assert StepFlowConfig(smi_layers=[-1, -2, 5]).resolve(8)[1] == [5, 6, 7]
    c2 = StepFlowConfig(oeb_layers=[0, 2], tau_max=0.2, smi_window="step", markers=("<a>", "</a>"), fmt="markers")
    assert StepFlowConfig.from_json(c2.to_json()) == c2
    import json
    assert StepFlowConfig.from_json(json.dumps(c2.to_json())) == c2
    for bad in (dict(smi_window=0), dict(smi_window="x"), dict(alpha=float("nan")), dict(oeb_layers=3),
                dict(fmt="bogus")):
        with pytest.raises(StepscopeError):
            StepFlowConfig(**bad)
    with pytest.raises(StepscopeError, match="unknown"):
        StepFlowConfig.from_json({"tau": 1})


@pytest.mark.parametrize("family", ["chatml", "smollm2"])
def test_auto_format_on_a_plain_chat_model_and_rows_without_thinking_are_reported(family):
    """A chat template without thinking markers (SmolLM2's own, and a tiny ChatML one): StepFlowConfig()'s
    fmt="auto" resolves as generation does (think), and StepFlow acts on a prompt built for it. A plain chat
    prompt never reaches a thinking segment: StepFlow says so on exit and in its stats, instead of silence."""
    import warnings

    from stepscope.prompts import build_prompt

    tok = make_tokenizer(family)
    model = sharpen(make_model("llama", vocab_size=len(tok)))
    flow = StepFlow(model, tok, StepFlowConfig(tau_max=0.6))
    assert flow.format.name == "think"
    plain = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                    tokenize=False)
    ids = torch.tensor([tok(plain, add_special_tokens=False)["input_ids"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), flow:
            model(ids)
    msgs = [str(w.message) for w in caught if "thinking segment" in str(w.message)]
    assert len(msgs) == 1 and "'think'" in msgs[0] and "<think>" in msgs[0]
    st = flow.stats
    assert (st.rows, st.rows_with_thinking, st.total_oeb_fires) == (1, 0, 0)
    assert st.to_json()["rows_with_thinking"] == 0 and "no thinking segment" in st.summary()
    assert flow.row_stats(0).rows_with_thinking == 0

    _, pids = build_prompt(tok, QUESTIONS[0])  # the prompt generation builds: it opens the thinking
    ids = torch.tensor([pids + tok(THINKING[0], add_special_tokens=False)["input_ids"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), StepFlow(model, tok, StepFlowConfig(tau_max=0.6)) as flow:
            model(ids)
    assert not [w for w in caught if "thinking segment" in str(w.message)]
    st = flow.stats
    assert (st.rows, st.rows_with_thinking) == (1, 1) and st.total_oeb_fires > 0 and st.total_smi_fires > 0
    assert "no thinking segment" not in st.summary()


def test_a_patch_of_eager_attention_removed_after_first_use_is_not_kept(monkeypatch):
    """Another library patches the modeling file's eager_attention_forward while StepFlow runs for the first
    time, then removes its patch: StepFlow with OEB and SMI off must then equal the plain model exactly."""
    from transformers.models.qwen2 import modeling_qwen2

    model, tok = build("qwen2", "think", attn_implementation="eager")
    ids = torch.tensor([traces_for(tok, "think")[0].token_ids])
    real = modeling_qwen2.eager_attention_forward

    def patched(module, query, key, value, attention_mask, **kw):
        out, w = real(module, query, key, value, attention_mask, **kw)
        return out + 0.5, w

    off = StepFlowConfig(oeb=False, smi=False, fmt="think")
    with torch.no_grad():
        plain = model(ids).logits
        monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", patched)
        with StepFlow(model, tok, off):
            patched_logits = model(ids).logits
        monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", real)
        with StepFlow(model, tok, off):
            got = model(ids).logits
    assert not torch.equal(patched_logits, plain)  # the patch was in use while it was there
    assert torch.equal(got, plain)


def test_query_geometry_equals_the_reference():
    """The vectorized OEB groups of a forward (core.geometry.query_geometry) against the reference that lists each
    query's visible keys one by one (tests/references.py): left padding, a right-padded row, rows in every
    segment, sliding windows, tau_max per row."""
    import numpy as np
    from references import reference_geometry

    from stepscope.core.geometry import BIG, query_geometry

    lo = np.array([0, 3, 5, 2, 0])
    hi = np.array([40, 40, 40, 30, 40])
    t0 = np.array([10, 3, 12, 20, BIG])
    s0 = np.array([25, 18, BIG, 26, BIG])
    tau_max = np.array([0.4, 0.4, 0.15, 0.9, 0.4])[:, None]
    fired = 0
    for past, q_len in ((0, 40), (20, 20), (39, 1)):
        for window in (None, 6):
            gidx, tau, elig = query_geometry(lo, hi, t0, s0, past, q_len, window, tau_max)
            for b in range(len(lo)):
                for i in range(q_len):
                    groups, want = reference_geometry(past + i, int(lo[b]), int(hi[b]), int(t0[b]), int(s0[b]),
                                                      window, float(tau_max[b, 0]))
                    assert tau[b, i] == np.float32(want), (past, window, b, i)
                    assert elig[b, i] == (want > 0)
                    if groups is not None:
                        assert tuple(gidx[b, i]) == groups
                        fired += 1
    assert fired > 100
