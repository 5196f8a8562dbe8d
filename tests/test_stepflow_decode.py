"""StepFlow while decoding: cached decoding equals one teacher-forced forward; padded batches equal rows alone.

Reference here is StepFlow's own teacher-forced forward, which test_stepflow.py checks against the slow
independent implementation. Tolerance 1e-5 on float32 logits. The fused kernel's path (its choice, first-use
check, fallback and timing) is tested in test_stepflow_decode_kernel.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import has_module
from test_stepflow import TOL, Force, build, left_pad, prompt_and_continuation, teacher_forced
from transformers import DynamicCache, LogitsProcessorList

from stepscope.errors import StepscopeError
from stepscope.flow import StepFlow, StepFlowConfig

# the fused decoding kernel runs on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1); CI
# installs triton (the test extra) and sets STEPSCOPE_REQUIRE_TRITON: without it only the PyTorch path is tested
KERNELS = ["torch", "triton"] if has_module("triton", "TRITON", "the test extra installs it") else ["torch"]


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
