"""StepFlow while decoding: cached decoding equals one teacher-forced forward; padded batches equal rows alone.

Reference here is StepFlow's own teacher-forced forward, which test_stepflow.py checks against the slow
independent implementation. Tolerance 1e-5 on float32 logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import has_module
from test_stepflow import QUESTIONS, build, harmony_response, left_pad, think_response
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from stepscope.errors import StepscopeError
from stepscope.flow import StepFlow, StepFlowConfig
from stepscope.flow.decode_path import DecodePath, time_paths

TOL = 1e-5

# the fused decoding kernel runs on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1); CI
# installs triton (the test extra) and sets STEPSCOPE_REQUIRE_TRITON: without it only the PyTorch path is tested
KERNELS = ["torch", "triton"] if has_module("triton", "TRITON", "the test extra installs it") else ["torch"]


def prompt_and_continuation(tok, fam: str, i: int) -> tuple[list[int], list[int]]:
    msgs = [{"role": "user", "content": QUESTIONS[i]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    resp = harmony_response(i) if fam == "harmony" else think_response(i)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(resp, add_special_tokens=False)["input_ids"]
    return p, c


def teacher_forced(model, tok, cfg, ids: list[int]) -> torch.Tensor:
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch,fam", [("llama", "think"), ("gptoss", "harmony")])
def test_generate_logits_equal_teacher_forced(arch, fam, kernel):
    """model.generate on a left-padded batch, its continuations forced so that thinking steps (and SMI) occur
    while decoding: the raw logits of every step equal each row's own teacher-forced forward. kernel="triton":
    the fused decoding kernel (GPT-OSS: with sinks and sliding windows) gives the same logits and stats."""
    model, tok = build(arch, fam)
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt=fam)
    pc = [prompt_and_continuation(tok, fam, i) for i in range(2)]
    n = min(40, *(len(c) for _, c in pc))  # several thinking steps, so SMI fires while decoding
    ids, mask, _, los = left_pad([p for p, _ in pc], pad=tok.pad_token_id or 0)
    with torch.no_grad(), StepFlow(model, tok, cfg, kernel=kernel) as flow:
        assert flow.decode_path.uses_kernel is (kernel == "triton")
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, logits_processor=LogitsProcessorList([Force([c for _, c in pc],
                                                                                           ids.shape[1])]),
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id or 0)
    st = flow.stats
    assert st.total_smi_fires >= 4 and st.total_oeb_fires > 0
    raw = torch.stack(out.logits, dim=1)  # [B, n, V]
    tf_fires = tf_elig = 0
    for b, (p, c) in enumerate(pc):
        assert out.sequences[b, ids.shape[1]:].tolist() == c[:n]
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        assert (raw[b] - want).abs().max().item() < TOL
        with torch.no_grad(), StepFlow(model, tok, cfg) as tf:  # the queries decoding saw: all but the last
            model(torch.tensor([p + c[:n - 1]]))
        tf_fires += tf.stats.total_oeb_fires
        tf_elig += sum(tf.stats.oeb_eligible.values())
        # the row's own counts (prefill + decoding, through the deferred per-row reduction) = the row alone
        rs, ts = flow.row_stats(b), tf.stats
        assert (rs.oeb_fires, rs.oeb_eligible, rs.smi_fires) == (ts.oeb_fires, ts.oeb_eligible, ts.smi_fires)
        for i in rs.oeb_layers:
            assert rs.bridge_mass_before[i] == pytest.approx(ts.bridge_mass_before[i], abs=1e-5)
            assert rs.bridge_mass_after[i] == pytest.approx(ts.bridge_mass_after[i], abs=1e-5)
    # the same OEB decisions, query-head by query-head, counted by the decode path's deferred stats
    assert st.total_oeb_fires == tf_fires and sum(st.oeb_eligible.values()) == tf_elig
    assert flow.decode_path.uses_kernel is (kernel == "triton")  # the kernel stayed in use (no silent fallback)


def test_greedy_generate_equals_teacher_forced_argmax():
    """Unforced greedy decoding (the model's own tokens), batch and rows alone, generate and a manual loop."""
    model, tok = build("qwen3", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    prompts = []
    for i in range(2):
        p, c = prompt_and_continuation(tok, "think", i)
        prompts.append(p + c[:25 + 10 * i])  # a prefix of thinking with a few closed steps
    ids, mask, _, _ = left_pad(prompts, pad=0)
    n = 24
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        batch = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)[:, ids.shape[1]:]
        alone = [model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0)[0, len(p):] for p in prompts]
    assert flow.stats.total_oeb_fires > 0
    for b, p in enumerate(prompts):
        gen = batch[b].tolist()
        assert gen == alone[b].tolist()
        logits = teacher_forced(model, tok, cfg, p + gen)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == gen
        # a manual cached loop gives the same tokens and logits
        cache = DynamicCache()
        with torch.no_grad(), StepFlow(model, tok, cfg):
            x = torch.tensor([p])
            got = []
            for _ in range(n):
                lg = model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]
                got.append(lg)
                x = lg.argmax().view(1, 1)
        got = torch.stack(got)
        assert got.argmax(-1).tolist() == gen
        assert (got - logits[len(p) - 1:-1]).abs().max().item() < TOL


@pytest.mark.parametrize("arch,fam,over,window", [
    ("gptoss", "harmony", {}, "step"),
    ("mistral", "think", {"sliding_window": 12}, 4),
])
def test_token_by_token_with_sliding_cache(arch, fam, over, window):
    """One token at a time through a cache that keeps only the sliding window (GPT-OSS: alternate layers), after
    a prompt fed in two chunks: every logit equals the teacher-forced forward, SMI windows clipped alike."""
    model, tok = build(arch, fam, **over)
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], smi_window=window, fmt=fam)
    p, c = prompt_and_continuation(tok, fam, 0)
    seq = p + c
    want = teacher_forced(model, tok, cfg, seq)
    cache = DynamicCache(config=model.config)
    got = []
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        half = len(p) // 2
        got.append(model(input_ids=torch.tensor([seq[:half]]), past_key_values=cache, use_cache=True).logits[0])
        got.append(model(input_ids=torch.tensor([seq[half:len(p)]]), past_key_values=cache,
                         use_cache=True).logits[0])
        for t in range(len(p), len(seq)):
            got.append(model(input_ids=torch.tensor([[seq[t]]]), past_key_values=cache, use_cache=True).logits[0])
    got = torch.cat(got)
    assert (got - want).abs().max().item() < TOL
    assert flow.stats.total_smi_fires >= 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_leave_the_batch(kernel):
    """A decode loop drops a finished row (cache.batch_select_indices + select_rows): the other row goes on
    exactly as if alone."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    pc = [prompt_and_continuation(tok, "think", i) for i in range(2)]
    ids, mask, pos, _ = left_pad([p for p, _ in pc])
    T = ids.shape[1]
    cache = DynamicCache()
    out = []
    with torch.no_grad(), StepFlow(model, tok, cfg, kernel=kernel) as flow:
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        rows = [0, 1]
        for step in range(40):
            if step == 10:  # row 1 finishes; row 0 (left-padded) goes on
                cache.batch_select_indices(torch.tensor([0]))
                flow.select_rows([0])
                mask, pos, rows = mask[:1], pos[:1], [0]
            x = torch.tensor([[pc[r][1][step]] for r in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
            p = pos[:, -1:] + 1
            pos = torch.cat([pos, p], 1)
            lg = model(input_ids=x, attention_mask=mask, position_ids=p, past_key_values=cache,
                       use_cache=True).logits
            out.append(lg[0, -1])
    p0, c0 = pc[0]
    want = teacher_forced(model, tok, cfg, p0 + c0[:40])[len(p0):]
    assert (torch.stack(out) - want).abs().max().item() < TOL
    with torch.no_grad(), StepFlow(model, tok, cfg) as tf:
        model(torch.tensor([p0 + c0[:40]]))
    rs = flow.row_stats(0)  # row 0 kept its counts while row 1 left
    assert (rs.oeb_fires, rs.oeb_eligible, rs.smi_fires) == (tf.stats.oeb_fires, tf.stats.oeb_eligible,
                                                             tf.stats.smi_fires)
    assert rs.total_oeb_fires > 0 and flow.row_stats(1).tokens == len(pc[1][0]) + 10
    with pytest.raises(StepscopeError, match="out of range"):
        flow.row_stats(2)
    assert T > len(p0)  # row 0 was padded


def test_sampling_runs_and_fires():
    model, tok = build("qwen2", "think")
    pc = [prompt_and_continuation(tok, "think", i) for i in range(2)]
    ids, mask, _, _ = left_pad([p for p, _ in pc])
    torch.manual_seed(0)
    with torch.no_grad(), StepFlow(model, tok, tau_max=0.6, fmt="think") as flow:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95,
                             max_new_tokens=12, num_return_sequences=2, pad_token_id=0)
    assert out.shape == (4, ids.shape[1] + 12)
    # every real prompt token (each prompt twice) and 11 fed-back tokens per row reached the segmenters
    assert flow.stats.total_oeb_fires > 0 and flow.stats.tokens == 2 * int(mask.sum()) + 4 * 11


def test_wrapping_eager_equals_wrapping_sdpa():
    pc = prompt_and_continuation(build("llama", "think")[1], "think", 1)
    logits = []
    for impl in ("sdpa", "eager"):
        model, tok = build("llama", "think", attn_implementation=impl)
        logits.append(teacher_forced(model, tok, StepFlowConfig(tau_max=0.6, alpha=0.5, fmt="think"),
                                     pc[0] + pc[1]))
    assert (logits[0] - logits[1]).abs().max().item() < TOL


def test_cache_it_did_not_see_is_an_error():
    model, tok = build("llama", "think")
    p, c = prompt_and_continuation(tok, "think", 0)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
        with StepFlow(model, tok, fmt="think"), pytest.raises(StepscopeError, match="lost track"):
            model(input_ids=torch.tensor([c[:1]]), past_key_values=cache, use_cache=True)


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
@pytest.mark.parametrize("fault", [None, "raise", "wrong", "dot_raises", "dot_wrong"])
def test_auto_kernel_is_checked_once_and_dropped_when_it_fails(fault, monkeypatch):
    """kernel="auto" (as on CUDA): the first decoding step compares the fused kernel with the PyTorch path. A
    good kernel stays in use; when its tl.dot form raises or disagrees, its broadcast form is tried (no
    warning when that one is good); a kernel whose both forms raise or disagree is dropped with a warning. The
    logits are right in every case."""
    from stepscope.core import kernels

    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    real = kernels.oeb_decode
    calls = []

    def faulty(*a, **k):
        dot = k["plan"].dot
        calls.append(dot)
        bad = fault in ("raise", "wrong") or (fault or "").startswith("dot_") and dot
        if bad and fault.endswith("raise"):
            raise RuntimeError("triton compile error (simulated)")
        out = real(*a, **k)
        return out + 1e-2 if bad else out

    monkeypatch.setattr(kernels, "oeb_decode", faulty)
    n = 12
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        # kernel="auto" as on a CUDA device with triton, the check alone: no timing of the paths
        # (test_auto_times_the_paths_... does that)
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", tune=False, off_cuda=True))
        assert flow.decode_path.uses_kernel and not flow.decode_path.checked
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with flow:
                out = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, output_logits=True, return_dict_in_generate=True,
                                     logits_processor=LogitsProcessorList([Force([c], len(p))]), pad_token_id=0)
    raw = torch.stack(out.logits, dim=1)[0]
    assert (raw - want).abs().max().item() < TOL
    msgs = [str(w.message) for w in caught if "fused decoding kernel" in str(w.message)]
    path = flow.decode_path
    if fault is None:
        assert path.uses_kernel and path.checked and not msgs and len(calls) == 2 * (n - 1)  # every step, both
        assert all(calls) and path.dot  # the tl.dot form throughout
    elif fault.startswith("dot_"):  # the dot form once, then the broadcast form for the rest
        assert path.uses_kernel and path.checked and not msgs and calls == [True] + [False] * (2 * (n - 1))
        assert not path.dot
    else:  # both forms tried once, then the PyTorch path
        assert not path.uses_kernel and len(msgs) == 1 and calls == [True, False]
        assert ("failed" if fault == "raise" else "differs") in msgs[0]


def test_kernel_choice_is_checked():
    model, tok = build("llama", "think")
    with pytest.raises(StepscopeError, match="kernel must be"):
        StepFlow(model, tok, kernel="cuda")
    if "triton" in KERNELS:
        import os

        old = os.environ.pop("TRITON_INTERPRET", None)
        try:  # on a CPU without the interpreter, the kernel cannot run
            with pytest.raises(StepscopeError, match="needs triton and a CUDA device"):
                StepFlow(model, tok, kernel="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
    assert StepFlow(model, tok).decode_path.uses_kernel is False  # auto on a CPU: the PyTorch path


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_auto_kernel_check_keeps_a_good_kernel_in_bfloat16():
    """In bf16 the PyTorch path rounds its scores to bf16; the first-step check compares the kernel with that
    path in float32, so a correct kernel is kept (no false fallback) even with sharp attention."""
    model, tok = build("qwen2", "think")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:  # sharp attention, as trained models have: large scores
            layer.self_attn.q_proj.weight.mul_(8.0)
    p, c = prompt_and_continuation(tok, "think", 1)
    p = p + c[:40]  # decoding deep inside the thinking, where the bridge is small
    flow = StepFlow(model, tok, StepFlowConfig(tau_max=0.6, fmt="think"),
                    kernel=DecodePath("auto", tune=False, off_cuda=True))  # the check alone, no timing
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with flow:
            model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=4, min_new_tokens=4,
                           pad_token_id=0)
    assert flow.decode_path.uses_kernel and flow.decode_path.checked and flow.stats.total_oeb_fires > 0


def _decode_steps(model, tok, cfg, p: list[int], c: list[int], n: int, hook=None):
    """Prefill p, then decode the forced tokens c[:n] one per forward; returns the StepFlow, what
    `hook(flow)` saw at each attention layer of each decoding step, and the logits [len(p) - 1 + n, V] that
    predicted p[1:] + c[:n] (the prefill's last and each step's)."""
    cache = DynamicCache()
    seen, logits = [], []
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        if hook is not None:
            handles = [layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append((m.layer_idx, hook(flow))))
                       for layer in model.model.layers]
        logits.append(model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True).logits[0])
        seen.clear()
        for t in c[:n]:
            logits.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0])
            assert not flow.rows.has_pending  # fed by the end of every forward
            assert flow.segmenters[0].num_tokens == cache.get_seq_length()
        if hook is not None:
            for h in handles:
                h.remove()
    return flow, seen, torch.cat(logits)[:-1]


def test_decoding_feeds_the_segmenters_at_the_first_smi_layer():
    """A decoding step's token reaches the segmenters after the layers below the first SMI layer have been
    called (so that the device runs them meanwhile), inside that layer's attention."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    flow, seen, _ = _decode_steps(model, tok, cfg, p, c, 6, hook=lambda f: f.rows.has_pending)
    assert len(seen) == 6 * 4
    for i in range(0, len(seen), 4):
        # (a module's pre-hook runs before its attention function, which feeds in layer 2)
        assert seen[i:i + 4] == [(0, True), (1, True), (2, True), (3, False)]


@pytest.mark.parametrize("smi_layers,on", [([], True), ([2, 3], False)])
def test_decoding_without_smi_layers_still_feeds_every_token(smi_layers, on):
    """With SMI off (or no SMI layer), the forward hook feeds each decoding step's token before the next step's
    state is prepared: through the end of the thinking into the summary, the logits, the segmenters, the token
    count and the steps are those of one teacher-forced forward over the same tokens."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=smi_layers, smi=on, fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    n = len(c)
    flow, _, got_logits = _decode_steps(model, tok, cfg, p, c, n)
    with torch.no_grad(), StepFlow(model, tok, cfg) as tf:
        want_logits = model(torch.tensor([p + c[:n]])).logits[0, :-1]
    assert (got_logits - want_logits).abs().max().item() < TOL
    assert tf.segmenters[0].boundaries["summary"] is not None
    assert flow.stats.tokens == tf.stats.tokens == len(p) + n
    assert flow.stats.total_smi_fires == 0
    got, want = flow.segmenters[0], tf.segmenters[0]
    assert [(s.kind, s.token_start, s.token_end) for s in got.steps] == \
        [(s.kind, s.token_start, s.token_end) for s in want.steps]
    assert len(got.steps) >= 3


def test_a_decoding_step_that_fails_still_feeds_its_token():
    """An exception inside a decoding forward (before any SMI layer): leaving the context feeds the token the
    pre-hook held back, as the forward's start had fed it before."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    cache = DynamicCache()

    def boom(m, a):
        raise RuntimeError("boom")

    with torch.no_grad():
        with StepFlow(model, tok, cfg) as flow:
            model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
            h = model.model.layers[1].self_attn.register_forward_pre_hook(boom)
            with pytest.raises(RuntimeError, match="boom"):
                model(input_ids=torch.tensor([c[:1]]), past_key_values=cache, use_cache=True)
            h.remove()
            assert flow.rows.has_pending
    assert not flow.rows.has_pending
    assert flow.segmenters[0].num_tokens == len(p) + 1
    assert flow.stats.tokens == len(p) + 1


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_decoding_step_with_gradients_takes_the_differentiable_path():
    """The fused kernel has no backward: a decoding step that needs gradients (here through the OEB layers'
    projections) must take the PyTorch path, whose gradients equal kernel="torch"'s."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    p = p + c[:12]  # the last prompt token in thinking, so OEB acts on the decoding step
    grads = {}
    for kernel in ("torch", "triton"):
        model.zero_grad()
        cache = DynamicCache()
        with StepFlow(model, tok, cfg, kernel=kernel) as flow:
            with torch.no_grad():
                model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
            out = model(input_ids=torch.tensor([c[12:13]]), past_key_values=cache, use_cache=True)
            out.logits.float().pow(2).sum().backward()
        assert flow.stats.oeb_eligible[0] > 0
        g = model.model.layers[0].self_attn.q_proj.weight.grad
        assert g is not None and g.abs().sum() > 0
        grads[kernel] = g.clone()
    assert torch.allclose(grads["torch"], grads["triton"], rtol=1e-4, atol=1e-6)


def test_next_step_state_is_prepared_and_dropped_when_the_forward_differs():
    """After a forward with a cache, StepFlow prepares the next decoding step's state, so that a decoding
    step's pre-hook builds nothing: it runs on the prepared state. Forwards of several tokens (and a fresh
    prefill) drop it and build their own. Mixed chunk sizes give the teacher-forced logits."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 1)
    chunks = [3, 1, 1, 2, 1, 4, 1, 1]  # tokens per forward after the prompt
    cache, logits, pos = DynamicCache(), [], 0
    ran, prepared = [], []  # per forward: the state it ran on; the state prepared after it
    with torch.no_grad(), StepFlow(model, tok, cfg) as flow:
        # registered after StepFlow's hooks, so they run after them
        hooks = [model.model.register_forward_pre_hook(lambda m, a: ran.append(flow.rows.forward)),
                 model.model.register_forward_hook(lambda m, a, o: prepared.append(flow.rows.prepared))]
        logits.append(model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True).logits[0])
        for n in chunks:
            x = torch.tensor([c[pos:pos + n]])
            logits.append(model(input_ids=x, past_key_values=cache, use_cache=True).logits[0])
            pos += n
        for h in hooks:
            h.remove()
    # every forward with a cache prepares the next step; a one-token forward runs on it, the others build
    assert len(ran) == len(prepared) == 1 + len(chunks)
    assert all(st is not None for st in prepared) and len({id(st) for st in prepared}) == len(prepared)
    assert ran[0] is not None and all(st is not None for st in ran)
    for i, n in enumerate(chunks, 1):
        assert (ran[i] is prepared[i - 1]) == (n == 1), (i, n)
        assert ran[i].q_len == n and ran[i].past == len(p) + sum(chunks[:i - 1])
    want = teacher_forced(model, tok, cfg, p + c[:pos])
    assert (torch.cat(logits) - want).abs().max().item() < TOL
    assert flow.stats.total_smi_fires > 0 and flow.stats.forwards == 1 + len(chunks)


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
@pytest.mark.parametrize("arch,fam,winner", [("llama", "think", "torch"), ("llama", "think", "triton bk32 w4"),
                                             ("llama", "think", "triton bk64 w4"),
                                             ("gptoss", "harmony", "torch")])
def test_auto_times_the_paths_and_uses_the_fastest(arch, fam, winner, monkeypatch):
    """kernel="auto" times, once per set of shapes, the kernel as planned, two launch variants and the PyTorch
    path, and decodes with the fastest (the timer is faked here so that `winner` wins). The logits stay exact,
    the stats equal kernel="torch"'s (nothing counted twice), and after the timing only the winner runs."""
    from stepscope.core import kernels

    model, tok = build(arch, fam)
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt=fam)
    p, c = prompt_and_continuation(tok, fam, 0)
    n = 12
    timed: list[list[str]] = []

    def fake_timer(runs, device):
        timed.append(sorted(runs))
        return {name: (1.0 if name == winner else 2.0) for name in runs}

    real = kernels.oeb_decode
    blocks = []

    def spy(*a, **k):
        blocks.append((k["plan"].BK, k["plan"].num_warps))
        return real(*a, **k)

    monkeypatch.setattr(kernels, "oeb_decode", spy)
    gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, output_logits=True,
               return_dict_in_generate=True, logits_processor=LogitsProcessorList([Force([c], len(p))]),
               pad_token_id=0)
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        with StepFlow(model, tok, cfg, kernel="torch") as ref_flow:
            model.generate(input_ids=torch.tensor([p]), **gen)
        # kernel="auto" as on a CUDA device with triton, its timer faked
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", timer=fake_timer, off_cuda=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with flow:
                out = model.generate(input_ids=torch.tensor([p]), **gen)
    raw = torch.stack(out.logits, dim=1)[0]
    assert (raw - want).abs().max().item() < TOL
    paths = flow.decode_paths
    assert paths and len(timed) == len(paths)  # timed once per set of shapes (keys by octave)
    if arch == "llama":  # tl.dot form: as planned (64 keys, 4 warps), 8 warps, 32 keys per block
        assert timed[0] == ["torch", "triton bk32 w4", "triton bk64 w4", "triton bk64 w8"]
    sinks = arch == "gptoss"
    for e in paths:
        assert e["path"] == ("torch" if winner == "torch" else "triton") and e["sinks"] is sinks
        assert e["keys"][0] <= len(p) + n and e["batch"] == 1 and set(e["times_us"]) == set(timed[0])
    per_tune = len(timed[0])  # the kernel as planned, then each variant once for its check
    if winner == "torch":  # no kernel call after the timing
        assert len(blocks) == len(paths) * per_tune
    else:
        bk, warps = int(winner.split()[1][2:]), int(winner.split()[2][1:])
        assert paths[0]["block_k"] == bk and paths[0]["num_warps"] == warps
        assert blocks[-1] == (bk, warps)  # the winner decodes the rest
        assert len(blocks) > len(paths) * per_tune
    got, ref = flow.stats, ref_flow.stats
    assert got.oeb_eligible == ref.oeb_eligible and got.oeb_fires == ref.oeb_fires
    assert got.total_oeb_fires > 0
    for layer in cfg.oeb_layers:
        assert got.bridge_mass_after[layer] == pytest.approx(ref.bridge_mass_after[layer], abs=1e-5)


def test_time_paths_times_every_candidate():
    """The timer calls each candidate once untimed, then rounds x reps times, and ranks a slow one last."""
    import time

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    t = time_paths({"fast": fast, "slow": slow}, torch.device("cpu"), reps=3, rounds=2)
    assert calls == {"fast": 7, "slow": 7}
    assert 0 <= t["fast"] < t["slow"] and t["slow"] >= 2000.0  # µs


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_auto_timing_runs_every_candidate_for_real():
    """The real timer (one round of one call, to stay quick under the interpreter) runs every candidate,
    the PyTorch path included, on the layer's real inputs; whatever wins, the logits stay exact."""
    got = []

    def quick(runs, device, **kw):
        calls = {name: 0 for name in runs}

        def counted(name, fn):
            def run():
                calls[name] += 1
                return fn()
            return run

        t = time_paths({name: counted(name, fn) for name, fn in runs.items()}, device, reps=1, rounds=1)
        got.append((t, calls))
        return t

    model, tok = build("qwen2", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 1)
    n = 6
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", timer=quick, off_cuda=True))
        with flow:
            out = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([Force([c], len(p))]))
    assert (torch.stack(out.logits, dim=1)[0] - want).abs().max().item() < TOL
    assert got and all(len(t) == 4 and min(t.values()) > 0 for t, _ in got)
    assert all(set(calls.values()) == {2} for _, calls in got)  # the untimed call and the timed one, each
    assert [e["times_us"] for e in flow.decode_paths] == [{k: round(v, 2) for k, v in t.items()} for t, _ in got]


@pytest.mark.parametrize("q_len,use_sinks", [(1, False), (1, True), (4, False)])
def test_pytorch_paths_equal_the_pure_functions(q_len, use_sinks):
    """The PyTorch OEB paths (one query per row: the batched-matmul decoding form; with sinks or several
    queries: the block form) against the dense reference (tests/references.py: softmax, then the KL projection as
    logit shifts) query by query and head by head: the outputs within 1e-5, the same fires and eligible pairs
    (counted by FlowStats)."""
    import numpy as np
    from references import reference_oeb

    from stepscope.core.geometry import NEG, bridge_target
    from stepscope.flow.flow_stats import FlowStats
    from stepscope.flow.oeb import oeb_attention
    from stepscope.flow.state import DecodeGeometry, OebGeometry, QueryTensors

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, K, D = 4, 4, 2, 24, 8
    P = K - q_len  # the forward's first query sits at kv index P
    seg = torch.zeros(B, K, dtype=torch.long)  # key segments: question, thinking from 6 (row 3: 16), summary
    seg[:, 6:] = 1
    seg[1, 14:] = 2
    seg[3, :] = 0
    pad = torch.zeros(B, K)
    pad[0, :3] = NEG  # row 0 is left-padded
    qseg = seg[:, P:]  # [B, Q] the queries' segments (row 3: all question)
    gidx = torch.stack([(qseg - 1).clamp_min(0), qseg], -1)  # [B, Q, 2]
    real_lo = torch.tensor([3, 0, 0, 0])
    tau = torch.zeros(B, q_len)
    for b in range(B):
        for i in range(q_len):
            q, s = P + i, int(qseg[b, i])
            if s == 0:
                continue
            lo_b = int(real_lo[b]) if s == 1 else int((seg[b] == 1).nonzero()[0])
            hi_b = int((seg[b] >= s).nonzero()[0])
            tau[b, i] = bridge_target(hi_b - lo_b, q + 1 - hi_b, 0.6)
    elig = (tau > 0).to(torch.float32)
    causal = torch.arange(K)[None, :] > (P + torch.arange(q_len))[:, None]  # [Q, K]
    addmask = pad[:, None, :] if q_len == 1 else pad[:, None, :].masked_fill(causal, NEG)
    qt = QueryTensors(gidx, tau, elig, int(elig.sum()), elig.sum(1).numpy().astype(np.float64))
    geo = OebGeometry(P, torch.nn.functional.one_hot(seg, 3).float(), addmask, qt,
                      DecodeGeometry() if q_len == 1 else None)
    query = torch.randn(B, H, q_len, D, generator=g) * 2
    key, value = torch.randn(B, Hkv, K, D, generator=g) * 2, torch.randn(B, Hkv, K, D, generator=g)
    sinks = torch.randn(H, generator=g) if use_sinks else None
    stats = FlowStats(1, [0], [], torch.device("cpu"))
    stats.start_rows(B)
    got = oeb_attention(query, key, value, geo, 0.35, sinks, block_elems=1 << 22, stats=stats)  # [B, Q, H, D]
    fires = 0
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(q_len):
                z = 0.35 * key[b, kv] @ query[b, h, i] + addmask[b, 0 if q_len == 1 else i]
                z = torch.where(z <= NEG / 2, float("-inf"), z)
                grp = torch.where(seg[b] == gidx[b, i, 0], 0, torch.where(seg[b] == gidx[b, i, 1], 1, 2))
                want, fired, _, _ = reference_oeb(z.tolist(), value[b, kv].tolist(), grp.tolist(), float(tau[b, i]),
                                                  None if sinks is None else float(sinks[h]))
                assert (got[b, i, h] - torch.tensor(want)).abs().max().item() < 1e-5, (b, h, i)
                fires += int(fired)
    st = stats.totals(0, 0, 0, 0)
    assert st.oeb_fires[0] == fires > 0 and st.oeb_eligible[0] == int(elig.sum()) * H
    assert fires < st.oeb_eligible[0]  # it also held back


def test_gradients_after_a_generation_under_inference_mode():
    """StepFlow used under torch.inference_mode() first (as generate_traces does) must not leave cached inference
    tensors behind that a later decoding step with gradients would trip on."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    p = p + c[:12]
    for grad in (False, True):
        model.zero_grad()
        cache = DynamicCache()
        with StepFlow(model, tok, cfg, kernel="torch") as flow:
            with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
                with torch.no_grad():
                    model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
                out = model(input_ids=torch.tensor([c[12:13]]), past_key_values=cache, use_cache=True)
                if grad:
                    out.logits.float().pow(2).sum().backward()
        assert flow.stats.oeb_eligible[0] > 0
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
