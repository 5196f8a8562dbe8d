"""Step-Saliency: the chunked method against the brute-force reference, batching, options, restoration, errors.

Tolerances (float32): every map entry within 1e-5 of the reference relative to the entry, plus 1e-6 of the layer's
largest entry (so the maps agree to 1e-5 relative in max norm; small entries are sums of products with
cancellation, and the two methods' float32 forwards differ by rounding that 30 layers amplify). In float64 the attention function alone matches autograd on naive
attention to 1e-10 (whole float64 models are not compared: transformers' eager softmax runs in float32). The
reference shares no attention, loss or pooling code with the chunked method (see stepscope/saliency/reference.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import make_model, make_tokenizer

from stepscope.errors import StepscopeError
from stepscope.saliency import SaliencyError, SaliencyResult, step_saliency
from stepscope.saliency.attention import SaliencyAttention, SaliencyRun, active_run
from stepscope.saliency.core import _check_finite, frozen_eval, loss_targets
from stepscope.saliency.reference import pool_maps, reference_saliency
from stepscope.trace import Trace

QUESTION = "What is (3 + 4) * 2? Explain."
RESP = ("First, compute the sum of the two numbers given. Three plus four equals seven, as expected. "
        "Then multiply the result by two to get fourteen.\n\nLet me check this again: fourteen divided by two is "
        "seven. So the answer should be fourteen.\n</think>\n\nThe sum is seven and doubling gives fourteen.\n\n"
        "Final answer: **14**.")
RESP2 = ("We need the total. The first box has five apples and the second has six. Adding them gives eleven "
         "apples.\n</think>\n\nThere are eleven apples in total.")
HARMONY_RESP = ("<|channel|>analysis<|message|>Add the numbers first. Three plus four is seven here. Doubling seven "
                "gives fourteen, the result.<|end|><|start|>assistant<|channel|>final<|message|>The answer is "
                "fourteen.<|return|>")


def assert_maps_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(want).all() and want.abs().max() > 0
    scale = want.abs().flatten(1).amax(dim=1).view(-1, *[1] * (want.ndim - 1))  # per layer
    err = (got - want).abs()
    bound = rtol * want.abs() + rtol * 0.1 * scale
    worst = float((err / bound).max())
    assert worst <= 1.0, f"max error / bound = {worst:.3g} (max abs err {float(err.max()):.3g})"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("think")


@pytest.fixture(scope="module")
def trace(tok):
    return Trace.from_text(tok, question=QUESTION, response=RESP, meta={"id": "t1"})


@pytest.fixture(scope="module")
def trace2(tok):
    return Trace.from_text(tok, question="How many apples are there?", response=RESP2, meta={"id": "t2"})


# ---------------------------------------------------------------------------------------------------------------
# the attention function alone: exact gradients and exact pooled saliency against autograd on naive attention
# ---------------------------------------------------------------------------------------------------------------


def naive_attention(q, k, v, mask, sinks, scale, softcap, window):
    """Plain softmax attention with autograd; returns (out [B,H,Tq,D], A [B,H,Tq,Tk])."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    z = q @ k.transpose(-1, -2) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    Tq, Tk = q.shape[2], k.shape[2]
    if mask is None:
        qi = torch.arange(Tq)[:, None] + (Tk - Tq)
        ki = torch.arange(Tk)[None, :]
        allowed = ki <= qi
        if window:
            allowed = allowed & (ki > qi - window)
        z = z.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        z = z.masked_fill(~mask, float("-inf"))
    else:
        z = z + mask
    if sinks is not None:
        col = sinks.view(1, -1, 1, 1).expand(z.shape[0], -1, Tq, 1)
        a = torch.softmax(torch.cat([z, col], dim=-1), dim=-1)[..., :-1]
    else:
        a = torch.softmax(z, dim=-1)
    a.retain_grad()
    return a @ v, a


CASES = {
    "causal_gqa": dict(B=1, H=4, Hkv=2, Tq=11, Tk=11),
    "padding_mask": dict(B=2, H=2, Hkv=1, Tq=9, Tk=9, pad=True),
    "window_kwarg": dict(B=1, H=2, Hkv=2, Tq=10, Tk=10, window=3),
    "sinks": dict(B=2, H=4, Hkv=2, Tq=9, Tk=9, sinks=True, pad=True),
    "softcap": dict(B=1, H=2, Hkv=1, Tq=8, Tk=8, softcap=2.0),
    "float_mask": dict(B=1, H=2, Hkv=2, Tq=7, Tk=7, float_mask=True),
    "query_offset": dict(B=1, H=2, Hkv=1, Tq=5, Tk=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_function_gradients_and_saliency(case):
    c = CASES[case]
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Tq, Tk, D = c["B"], c["H"], c["Hkv"], c["Tq"], c["Tk"], 5
    dt = torch.float64

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    q, k, v = rnd(B, H, Tq, D).requires_grad_(), rnd(B, Hkv, Tk, D).requires_grad_(), rnd(B, Hkv, Tk, D).requires_grad_()
    sinks = rnd(H).requires_grad_() if c.get("sinks") else None
    mask = None
    if c.get("pad"):  # right padding of batch row 1 (3 tokens), as the saliency batches do
        keep = torch.ones(B, Tk, dtype=torch.bool)
        keep[-1, Tk - 3:] = False
        mask = torch.tril(torch.ones(Tq, Tk, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    if c.get("float_mask"):
        mask = torch.where(torch.tril(torch.ones(Tq, Tk, dtype=torch.bool)), rnd(Tq, Tk) * 0.5,
                           torch.tensor(float("-inf"), dtype=dt))[None, None]
    scale, softcap, window = 0.37, c.get("softcap"), c.get("window")
    upstream = rnd(B, H, Tq, D)

    # reference: autograd through naive attention, saliency from A.grad
    out_ref, a_ref = naive_attention(q, k, v, mask, sinks, scale, softcap, window)
    (out_ref * upstream).sum().backward()
    grads_ref = [x.grad.clone() for x in (q, k, v)] + ([sinks.grad.clone()] if sinks is not None else [])
    for x in (q, k, v) + ((sinks,) if sinks is not None else ()):
        x.grad = None
    sal_ref = (a_ref.detach() * a_ref.grad).abs().mean(dim=1)  # [B, Tq, Tk]

    # ours; steps over the query rows (queries are the last Tq positions of the keys when Tq < Tk)
    step_ids = [np.repeat(np.arange(4), [2, 2, 2, Tk - 6]) for _ in range(B)]
    run = SaliencyRun(step_ids=step_ids, num_steps=4, layer_slot={0: 0}, block_rows=3)
    with active_run(run):
        out = SaliencyAttention.apply(q, k, v, sinks, mask, scale, softcap, window, 0, run)
        run.phase = "backward"
        (out * upstream).sum().backward()
    torch.testing.assert_close(out, out_ref.detach(), rtol=1e-10, atol=1e-12)
    grads = [q.grad, k.grad, v.grad] + ([sinks.grad] if sinks is not None else [])
    for name, a, b in zip(["dq", "dk", "dv", "dsinks"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{name} differs")
    P = torch.from_numpy(np.eye(4)[step_ids[0]])  # [Tk, S]; query row r is token r + Tk - Tq
    want = torch.einsum("ti,btk,kj->bij", P[Tk - Tq:], sal_ref, P)
    torch.testing.assert_close(run.maps[:, 0], want, rtol=1e-10, atol=1e-13)


def test_attention_function_block_size_does_not_matter():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 23, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    ids = [np.repeat(np.arange(5), [3, 6, 4, 7, 3])]
    maps = []
    for rows in (1, 4, 16, 64):
        run = SaliencyRun(step_ids=ids, num_steps=5, layer_slot={0: 0}, block_rows=rows)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        with active_run(run):
            out = SaliencyAttention.apply(qq, kk, vv, None, None, 0.3, None, None, 0, run)
            run.phase = "backward"
            out.pow(2).sum().backward()
        maps.append((run.maps[0, 0].clone(), qq.grad.clone(), kk.grad.clone()))
    for m, dq, dk in maps[1:]:
        torch.testing.assert_close(m, maps[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dq, maps[0][1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dk, maps[0][2], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# whole models: chunked == reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gptoss"])
def test_chunked_matches_reference_float32(arch, tok, trace):
    if arch == "gptoss":
        htok = make_tokenizer("harmony")
        tr = Trace.from_text(htok, question=QUESTION, response=HARMONY_RESP)
        assert tr.steps_of("thinking") and tr.steps_of("summary")
        model = make_model(arch, vocab_size=len(htok), layers=3)
        assert len(tr) > 8  # longer than the sliding window: the window matters
    else:
        tr = trace
        model = make_model(arch, vocab_size=len(tok), layers=3)
    chunked = step_saliency(model, tr, block_rows=7)  # several blocks, the last one partial
    ref = step_saliency(model, tr, method="reference")
    assert chunked.maps.dtype == torch.float32 and chunked.maps.shape == (3, tr.num_steps, tr.num_steps)
    assert_maps_close(chunked.maps, ref.maps)
    # causality: a step never draws on later steps
    assert torch.all(chunked.maps.triu(diagonal=1) == 0)


@pytest.mark.parametrize("loss", ["response", "summary"])
def test_loss_options_match_reference(loss, tok, trace):
    model = make_model("llama", vocab_size=len(tok), layers=2)
    c = step_saliency(model, trace, loss=loss)
    r = step_saliency(model, trace, loss=loss, method="reference")
    assert_maps_close(c.maps, r.maps)
    assert c.meta["loss"] == loss
    # a different loss gives different maps (the option is not ignored)
    a = step_saliency(model, trace, loss="all")
    assert not torch.allclose(a.maps, c.maps, rtol=1e-3)


def test_loss_target_positions(trace):
    T = len(trace)
    assert loss_targets(trace, "all") == (1, T)
    assert loss_targets(trace, "response") == (trace.segments["thinking"][0], T)
    assert loss_targets(trace, "summary") == (trace.segments["summary"][0], T)


def test_summary_loss_without_summary_is_an_error(tok, trace):
    cut = Trace.from_ids(tok, trace.token_ids[:50])  # thinking never closes: empty summary
    assert cut.segments["summary"][0] == len(cut)
    model = make_model("llama", vocab_size=len(tok), layers=1)
    with pytest.raises(SaliencyError, match="needs a summary"):
        step_saliency(model, cut, loss="summary")


def test_pool_sum_and_heads_and_layers(tok, trace):
    model = make_model("qwen3", vocab_size=len(tok), layers=4)
    mean = step_saliency(model, trace, heads=True)
    total = step_saliency(model, trace, pool="sum", layers=[1, -1])
    n = torch.tensor([s.num_tokens for s in trace.steps], dtype=torch.float32)
    assert total.meta["layers"] == [1, 3] and total.maps.shape[0] == 2
    assert_maps_close(total.maps, mean.maps[[1, 3]] * n[:, None] * n[None, :])
    assert mean.head_maps.shape == (4, 4, trace.num_steps, trace.num_steps)
    assert_maps_close(mean.head_maps.mean(dim=1), mean.maps)
    ref = step_saliency(model, trace, method="reference", heads=True)
    assert_maps_close(mean.head_maps, ref.head_maps)


def test_real_weights_smollm2_real_trace(traces_available):
    """SmolLM2 (30 layers, 9 heads, 3 KV heads) on a whole real R1 trace (230 tokens with its tokenizer), every layer."""
    from stepscope.models import load_model

    path = traces_available / "tli_r1-distill-qwen-14b_math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path.name} is absent")
    rec = next(r for r in map(json.loads, filter(str.strip, path.read_text(encoding="utf-8").splitlines()))
               if r["id"] == "tli-math500-src289-r1-distill-qwen-14b")
    model, _ = load_model("default", device="cpu", dtype="float32")
    tok = make_tokenizer("think")  # the SmolLM2 tokenizer with an R1-style template
    tr = Trace.from_text(tok, question=rec["problem"], response=rec["response"])
    assert len(tr) < 300 and tr.steps_of("thinking") and tr.steps_of("summary")
    c = step_saliency(model, tr, loss="response")
    r = step_saliency(model, tr, loss="response", method="reference")
    assert c.maps.shape == (30, tr.num_steps, tr.num_steps)
    assert_maps_close(c.maps, r.maps)


# ---------------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "gptoss"])
def test_batch_of_different_lengths_equals_each_alone(arch, tok, trace, trace2):
    t3 = Trace.from_ids(tok, trace.token_ids[:40], meta={"id": "t3"})
    traces = [trace2, trace, t3]
    assert len({len(t) for t in traces}) == 3
    model = make_model(arch, vocab_size=len(tok), layers=2)
    batch = step_saliency(model, traces, batch_size=3, block_rows=16)
    for tr, res in zip(traces, batch):
        alone = step_saliency(model, tr, block_rows=16)
        assert res.trace is tr and res.meta["batch_size"] == 3
        assert_maps_close(res.maps, alone.maps)
    with frozen_eval(model):
        ref, _ = reference_saliency(model, t3, layers=[0, 1])
    assert_maps_close(batch[2].maps, ref)


# ---------------------------------------------------------------------------------------------------------------
# the model comes back exactly as it was; a model the registry cannot reach is refused
# ---------------------------------------------------------------------------------------------------------------


def _model_state(model):
    return (model.config._attn_implementation, [p.requires_grad for p in model.parameters()],
            [m.training for m in model.modules()], [("forward" in vars(m)) for m in model.modules()])


def test_model_restored_after_run_and_after_error(tok, trace):
    model = make_model("llama", vocab_size=len(tok), layers=2)
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    before = _model_state(model)
    ids = torch.tensor([trace.token_ids])
    with torch.no_grad():
        model.eval()
        logits = model(ids).logits
        model.train()
    step_saliency(model, trace)
    assert _model_state(model) == before
    step_saliency(model, trace, method="reference")
    assert _model_state(model) == before

    # a model whose attention ignores the configured implementation: a clear error, model restored
    cfg = model.config
    for layer in model.model.layers:
        orig = layer.self_attn.forward

        def fwd(*a, __orig=orig, **k):
            saved = cfg._attn_implementation_internal
            cfg._attn_implementation_internal = "sdpa"
            try:
                return __orig(*a, **k)
            finally:
                cfg._attn_implementation_internal = saved

        layer.self_attn.forward = fwd
    with pytest.raises(SaliencyError, match="no attention layer called"):
        step_saliency(model, trace)
    for layer in model.model.layers:
        del layer.self_attn.forward
    assert _model_state(model) == before
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)


def test_works_under_no_grad_and_inference_mode(tok, trace):
    model = make_model("llama", vocab_size=len(tok), layers=2)
    want = step_saliency(model, trace).maps
    with torch.no_grad():
        assert_maps_close(step_saliency(model, trace).maps, want)
    with torch.inference_mode():
        assert_maps_close(step_saliency(model, trace, method="reference").maps, want)


def test_errors_are_clear(tok, trace):
    short = make_model("llama", vocab_size=len(tok), layers=1, max_position_embeddings=64)
    with pytest.raises(SaliencyError, match="more than the model's context of 64"):
        step_saliency(short, trace)
    model = make_model("llama", vocab_size=len(tok), layers=2)
    for kw, pat in [(dict(pool="max"), "unknown pool"), (dict(loss="x"), "unknown loss"),
                    (dict(method="fast"), "unknown method"), (dict(layers=[5]), "out of range")]:
        with pytest.raises(SaliencyError, match=pat):
            step_saliency(model, trace, **kw)
    with pytest.raises(SaliencyError, match="outside the model's vocabulary"):
        step_saliency(make_model("llama", vocab_size=1000, layers=1), trace)
    assert issubclass(SaliencyError, StepscopeError)


def test_non_finite_is_an_error_suggesting_float32(tok, trace):
    model = make_model("llama", vocab_size=len(tok), layers=2, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 0] = float("inf")  # as an overflow would leave it
    with pytest.raises(SaliencyError, match=r"not finite.*overflow in bfloat16.*--dtype float32"):
        step_saliency(model, trace)
    maps = torch.zeros(3, trace.num_steps, trace.num_steps)
    maps[2, 1, 0] = float("nan")
    with pytest.raises(SaliencyError, match=r"non-finite saliency at layer 7 \(trace t1\).*--dtype float32"):
        _check_finite(maps, trace, torch.bfloat16, [0, 4, 7])


# ---------------------------------------------------------------------------------------------------------------
# the result object
# ---------------------------------------------------------------------------------------------------------------


def test_result_save_load_normalized_groups(tmp_path, tok, trace):
    model = make_model("qwen2", vocab_size=len(tok), layers=5)
    res = step_saliency(model, trace, heads=True)
    for key in ("model", "pool", "loss", "dtype", "method", "time_s", "peak_memory_bytes", "versions",
                "num_layers", "num_steps", "T"):
        assert key in res.meta, key
    assert res.meta["T"] == len(trace) and res.meta["num_steps"] == trace.num_steps
    out = res.save(tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == ["maps.safetensors", "meta.json", "trace.json"]
    back = SaliencyResult.load(tmp_path / "r")
    torch.testing.assert_close(back.maps, res.maps, rtol=0, atol=0)
    torch.testing.assert_close(back.head_maps, res.head_maps, rtol=0, atol=0)
    assert back.trace.token_ids == trace.token_ids and back.meta == json.loads(json.dumps(res.meta))
    N = res.normalized()
    rows = res.maps.sum(-1) > 0
    torch.testing.assert_close(N.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert res.layer_groups() == {"shallow": [0], "deep": [4]}
    sub = step_saliency(model, trace, layers=[0, 1, 4])
    assert sub.layer_groups() == {"shallow": [0], "deep": [2]}
    # saving over an existing folder replaces it only when complete; a failure leaves the old folder intact
    bad = SaliencyResult(maps=res.maps, trace=trace, meta={"x": object()})
    with pytest.raises(TypeError):
        bad.save(tmp_path / "r")
    assert SaliencyResult.load(tmp_path / "r").meta == back.meta
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    with pytest.raises(StepscopeError, match="missing"):
        (tmp_path / "r" / "meta.json").unlink()
        SaliencyResult.load(tmp_path / "r")


def test_reference_pooling_by_hand(trace):
    """pool_maps against an explicit double loop over token pairs."""
    T = len(trace)
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(T, T, generator=g, dtype=torch.float64).tril()
    got = pool_maps(sal, trace, "mean")
    got_sum = pool_maps(sal, trace, "sum")
    s = sal.tolist()
    for si in trace.steps:
        for sj in trace.steps:
            total = sum(s[t][k] for t in range(si.token_start, si.token_end) for k in range(sj.token_start, sj.token_end))
            assert abs(float(got_sum[si.index, sj.index]) - total) < 1e-9
            assert abs(float(got[si.index, sj.index]) - total / (si.num_tokens * sj.num_tokens)) < 1e-12
