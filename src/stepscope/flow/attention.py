"""StepFlow's attention function: the Odds-Equal Bridge and Step Momentum Injection inside the attention registry.

`register(orig)` registers, under the name "stepscope_flow_<orig>", an attention function that wraps the
implementation `orig` the user chose (sdpa, eager, flash_attention_*), together with `orig`'s mask function
(without it transformers hands the function no mask, even for a left-padded batch). The function reads the
running StepFlow from `module._stepscope_flow` (set on every attention module while a StepFlow context is
open; absent, it is the wrapped implementation, untouched).

Per layer:
- outside the OEB and SMI bands, or when this forward has nothing to do there (no thinking/summary query, no
  SMI fire), the wrapped implementation runs untouched;
- OEB layers compute attention themselves, row-blocked (never more than `block_elems` scores at once):
  scores -> softmax (with GPT-OSS sinks as an extra logit whose mass belongs to O) -> per-segment masses by one
  small matmul with the key-segment one-hot -> p(B), p(S) of each query and head -> where p(B) < tau_B (and
  p(B), p(S), tau_S > 0) the KL projection multiplies B's probabilities by tau_B / p(B) and S's by
  tau_S / p(S), tau_S = 1 - p(O) - tau_B; O is untouched. This equals adding log(tau_B / p(B)) and
  log(tau_S / p(S)) to the logits (METHOD.md §5), without a second softmax;
- SMI layers add alpha * (mean value vector of the previous step's last w tokens, per kv head, shared by the
  query heads of a GQA group) to the attention output of the query at each fire position, before o_proj.

Decisions (ours): OEB leaves a query alone when the projection does not exist, i.e. p(B) = 0 (nothing to
scale) or tau_S <= 0 (the rest O, sink included, already holds more than 1 - tau_B). Probabilities are
computed in float32 (as transformers' eager path does), the weighted sum of values in the value dtype.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import StepscopeError
from . import kernels
from .state import LayerGeometry, decode_groups, layer_geometry

PREFIX = "stepscope_flow_"
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_EAGER_BY_CLASS: dict[type, Callable] = {}


def registered_name(orig: str) -> str:
    return PREFIX + orig


def _eager_of(module) -> Callable:
    """The eager attention function of the module's own modeling file (GPT-OSS's handles sinks)."""
    cls = type(module)
    fn = _EAGER_BY_CLASS.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:  # a modeling file without its own: the standard one (no sinks)
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        _EAGER_BY_CLASS[cls] = fn
    return fn


def original_function(orig: str, module) -> Callable:
    if orig == "eager":
        return _eager_of(module)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[orig]


def register(orig: str) -> str:
    """Register the StepFlow attention and mask functions wrapping `orig`; return the registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if orig not in SUPPORTED:
        raise StepscopeError(f"StepFlow wraps sdpa, eager or flash attention; this model uses {orig!r} "
                             "(load it with attn_implementation='sdpa')")
    name = registered_name(orig)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(orig)
    if mask_fn is None:
        raise StepscopeError(f"transformers has no mask function for {orig!r}")
    AttentionInterface.register(name, _make_flow_attention(orig))
    AttentionMaskInterface.register(name, mask_fn)
    return name


def _make_flow_attention(orig: str) -> Callable:
    def stepscope_flow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 **kwargs):
        flow = getattr(module, "_stepscope_flow", None)
        fn = original_function(orig, module)
        if flow is None or flow._fwd is None:
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return flow_attention(flow, fn, module, query, key, value, attention_mask, scaling, dropout, kwargs)

    stepscope_flow_attention.__name__ = f"stepscope_flow_attention_{orig}"
    return stepscope_flow_attention


def flow_attention(flow, fn: Callable, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling, dropout, kwargs: dict):
    """One layer. query [B, H, Q, D], key/value [B, Hkv, K, D]; returns ([B, Q, H, D], weights or None)."""
    layer = module.layer_idx
    fs = flow._fwd
    do_oeb = fs.any_oeb and layer in flow._oeb_set
    if flow._unfed is not None and layer in flow._smi_set:  # the first SMI layer of a decoding step
        flow._feed_deferred()
    do_smi = fs.num_fires > 0 and layer in flow._smi_set
    if not (do_oeb or do_smi):
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    K = key.shape[-2]
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    window = int(window) if window else None
    mask4 = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
    gkey = (K, window, id(mask4), do_oeb)
    if K > fs.total:  # a static cache: slots after the tokens seen so far are empty
        K = fs.total
        key, value = key[:, :, :K], value[:, :, :K]
        mask4 = mask4[..., :K] if mask4 is not None else None
    geo = fs.geometry.get(gkey)
    if geo is None:
        geo = fs.geometry[gkey] = layer_geometry(fs, K, window, mask4, do_oeb)
        fs.geometry[("mask", gkey)] = attention_mask  # keep the mask alive so that its id stays unique
    weights = None
    if do_oeb:
        sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
        out = oeb_attention(query, key, value, geo, scaling if scaling is not None else module.scaling,
                            sinks, flow, layer, dropout if module.training else 0.0)
    else:
        out, weights = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if do_smi:
        if geo.pair_kidx is None:
            geo.pair_kidx = (fs.dev["pairs"][1] - geo.k_offset).clamp_(0, K - 1)
            geo.pair_weight = fs.smi_pair_weights(window)
        out = smi_inject(out, value, fs.dev["fires"], fs.dev["pairs"][0], geo.pair_kidx, geo.pair_weight,
                         fs.num_fires)
        flow._count_smi(layer, fs.host["fire_b"])
    return out, weights


def oeb_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: LayerGeometry,
                  scaling: float, sinks: torch.Tensor | None, flow, layer: int, dropout: float = 0.0
                  ) -> torch.Tensor:
    """Attention with the Odds-Equal Bridge, in blocks of query rows. Returns [B, Q, H, D].

    The query heads of a GQA group are stacked as rows of one matrix per kv head ([B, Hkv, n_rep * R, D]), so
    every product is a plain batched matmul (no broadcast copies of keys or values).
    """
    B, H, Q, D = query.shape
    if Q == 1 and geo.kseg is not None and flow._fused is not False and not dropout and not (
            torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        # (the kernel has no backward: a decoding step that needs gradients takes the PyTorch path)
        out = _oeb_decode_fused(query, key, value, geo, scaling, sinks, flow, layer)
        if out is not None:
            return out
    Hkv, K = key.shape[1], key.shape[2]
    n_rep = H // Hkv
    q5 = query.view(B, Hkv, n_rep, Q, D) if query.is_contiguous() else query.reshape(B, Hkv, n_rep, Q, D)
    sink = None
    if sinks is not None:
        sink = sinks.reshape(1, Hkv, n_rep, 1, 1).to(torch.float32)
    if Q == 1 and geo.decode and sinks is None:
        return _oeb_decode(query, key, value, geo, scaling, sink, flow, layer, dropout)
    rows = max(1, flow.block_elems // max(1, B * H * K))
    first_q = flow._fwd.total - geo.k_offset - Q  # index, in this layer's keys, of this forward's first query
    outs = []
    for r0 in range(0, Q, rows):
        r1 = min(Q, r0 + rows)
        kend = min(K, first_q + r1)  # causal: later keys are hidden from these rows
        outs.append(_oeb_block(q5[:, :, :, r0:r1], key[:, :, :kend], value[:, :, :kend], geo, r0, r1,
                               scaling, sink, flow, layer, dropout))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [B, H, Q, D]
    if flow._stats is not None:
        flow._count_eligible(layer, geo.qt, H)
    return out.transpose(1, 2).contiguous()


class PathChoice(NamedTuple):
    """kernel="auto": the decoding path an OEB layer uses for one set of shapes, the fastest by `time_paths`."""

    path: str  # "triton" or "torch"
    block_k: int | None  # the kernel's launch parameters (None for "torch")
    num_warps: int | None
    times_us: dict  # every candidate that passed its check -> median µs per call


def path_key(query: torch.Tensor, key: torch.Tensor, sinks) -> tuple:
    """The shapes a decoding-path choice holds for: batch, heads, kv heads, head dim, dtype, sinks, and the
    number of keys by octave (the choice is timed again at 1,024, 2,048, 4,096 ... keys)."""
    B, H, _, D = query.shape
    return B, H, key.shape[1], D, query.dtype, sinks is not None, int(key.shape[2]).bit_length()


def time_paths(runs: dict[str, Callable[[], object]], device: torch.device, reps: int = 5, rounds: int = 3
               ) -> dict[str, float]:
    """Median wall-clock µs per call of each function: one untimed call each (compilation), then `rounds`
    interleaved rounds of `reps` back-to-back calls, the device synchronized around each batch of calls. Wall
    time, so that a path's host launch overhead counts as much as its device time."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for fn in runs.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def _oeb_decode_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: LayerGeometry,
                      scaling: float, sinks: torch.Tensor | None, flow, layer: int) -> torch.Tensor | None:
    """One decoding step of an OEB layer in one fused Triton kernel (flow/kernels.py), or None when the
    caller must use the PyTorch path.

    With kernel="auto" the first call is checked against the PyTorch path on the same inputs upcast to float32
    (so that bf16 rounding of the scores in that path does not count against the kernel, which works in
    float32): within 1e-4 of the output's largest magnitude for float32 inputs, 1e-2 for bf16/fp16 (the
    rounding of the output itself). GPT-OSS's sink layers are compared with the PyTorch block path. A mismatch
    or an error (e.g. a Triton that cannot compile it) of the tl.dot form first retries the broadcast form of
    the kernel (for the rest of this StepFlow); a failure of that one warns once and switches this StepFlow to
    the PyTorch path. Then, for each new set of shapes (`path_key`), kernel="auto" times the kernel's launch
    variants (each checked the same way) and the PyTorch path on this layer's inputs, and uses the fastest
    (`_tune`)."""
    B, H = query.shape[0], query.shape[1]
    qt = geo.qt
    tuned = geo.tuned
    if tuned is False and flow._paths is not None:  # once per forward: the choice made for these shapes
        tuned = geo.tuned = flow._paths.get(path_key(query, key, sinks))
        if tuned is None and query.is_cuda and torch.cuda.is_current_stream_capturing():
            tuned = geo.tuned = False  # no timing inside a CUDA graph capture: the kernel as planned
    if tuned and tuned.path == "torch":  # (a PathChoice is truthy; None and False are not)
        return None
    if geo.tau_flat is None:  # once per forward: the rows' targets as [B], and one stats slot per OEB layer
        geo.tau_flat = qt.tau_b.view(B)
        if flow._stats is not None:
            # one zeroed stats buffer per forward for all OEB layers (a layer that does not run the kernel keeps
            # zeros), reduced with the other forwards' at the next flush
            geo.fused_stats = torch.zeros(len(flow.oeb_layers), B, H, 5, dtype=torch.float32, device=query.device)
            geo.fused_parts = geo.fused_stats.unbind(0)
            flow._pending.append(("fused", geo.fused_layers, geo.fused_stats, qt, H))
    tau_b = geo.tau_flat
    part = None if geo.fused_parts is None else geo.fused_parts[flow._oeb_pos[layer]]
    while True:
        try:
            plan = geo.plan
            if plan is None or plan.H != H:  # checked and planned once per forward: the OEB layers share shapes
                over = {} if not tuned else {"block_k": tuned.block_k, "num_warps": tuned.num_warps}
                plan = geo.plan = kernels.plan_decode(query, key, value, geo.kseg, qt.qgroups, tau_b, sinks, part,
                                                      dot=flow._kernel_dot, **over)
            out = kernels.oeb_decode(query, key, value, geo.kseg, qt.qgroups, tau_b, scaling, sinks, part, plan=plan)
            why = None
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: use another path
            if flow.kernel == "triton" and not (geo.plan is not None and geo.plan.dot):
                raise
            why = f"the fused decoding kernel failed ({type(e).__name__}: {str(e)[:200]})"
        if why is None and flow._fused is None:  # first use under kernel="auto": check it against PyTorch's
            why = _check(out, _reference_decode(query, key, value, geo, scaling, sinks, flow, layer))
        if why is None:
            if flow._fused is None:
                flow._fused = True
            break
        if geo.plan is not None and geo.plan.dot:  # the tl.dot form failed here: the broadcast form, once
            flow._kernel_dot = False
            geo.plan = None
            continue
        flow._disable_fused(why)
        return None
    if tuned is None:  # kernel="auto", shapes not timed yet
        tuned = geo.tuned = flow._paths[path_key(query, key, sinks)] = _tune(
            query, key, value, geo, scaling, sinks, flow, layer, plan)
        if tuned.path == "torch":
            if part is not None:
                part.zero_()  # this layer's stats come from the PyTorch path
            return None
        geo.plan = None  # the next OEB layer plans the chosen variant
    if part is not None:
        geo.fused_layers.append(layer)  # counted (eligible pairs, stats) at the next flush
    return out


def _check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when the kernel's output is within tolerance of the PyTorch path's float32 output, else why not."""
    tol = (1e-4 if out.dtype == torch.float32 else 1e-2) * max(1.0, ref.abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= tol:
        return f"the fused decoding kernel differs from the PyTorch path by {err:.3g} (tolerance {tol:.3g})"
    return None


def _tune(query, key, value, geo: LayerGeometry, scaling: float, sinks, flow, layer: int, plan) -> PathChoice:
    """Time the kernel as planned, two more launch variants of its tl.dot form (twice the warps; half or, at
    the smallest block, twice the keys per block), and the PyTorch path, on this layer's inputs; return the
    fastest. A variant that fails or differs from the PyTorch path (`_check`) is left out. Nothing here writes
    stats."""
    qt = geo.qt
    ref = _reference_decode(query, key, value, geo, scaling, sinks, flow, layer)
    variants = [(plan.BK, plan.num_warps)]
    if plan.dot:
        variants += [(plan.BK, 8 if plan.num_warps < 8 else 4), (plan.BK // 2 if plan.BK > 16 else 32, plan.num_warps)]
    runs, params = {}, {}
    for bk, warps in variants:
        name = f"triton bk{bk} w{warps}" + ("" if plan.dot else " broadcast")
        try:
            p = kernels.plan_decode(query, key, value, geo.kseg, qt.qgroups, geo.tau_flat, sinks, dot=plan.dot,
                                    block_k=bk, num_warps=warps)

            def run(p=p):
                return kernels.oeb_decode(query, key, value, geo.kseg, qt.qgroups, geo.tau_flat, scaling, sinks,
                                          plan=p)

            if _check(run(), ref) is not None:
                continue
        except Exception:  # noqa: BLE001 - a variant this machine cannot run is not a candidate
            continue
        runs[name], params[name] = run, (bk, warps)
    runs["torch"] = lambda: _reference_decode(query, key, value, geo, scaling, sinks, flow, layer, upcast=False)
    times = time_paths(runs, query.device)
    best = min(times, key=times.get)
    if best == "torch":
        return PathChoice("torch", None, None, times)
    return PathChoice("triton", *params[best], times)


def _reference_decode(query, key, value, geo: LayerGeometry, scaling: float, sinks, flow, layer: int,
                      upcast: bool = True) -> torch.Tensor:
    """The PyTorch path's output for the same decoding step (in float32 with `upcast`), recording no stats."""
    fused, stats = flow._fused, flow._stats
    flow._fused, flow._stats = False, None
    try:
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        return oeb_attention(query, key, value, geo, scaling, sinks, flow, layer)
    finally:
        flow._fused, flow._stats = fused, stats


def _oeb_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: LayerGeometry, scaling: float,
                sink: torch.Tensor | None, flow, layer: int, dropout: float) -> torch.Tensor:
    """One query per row (decoding): the same mathematics as `_oeb_block`, in about 15 kernels.

    Scores, scale and mask come from one baddbmm, the group masses (p_B, p_S) from one bmm with the group
    indicators, the targets (tau_B, tau_S) from one more, and the reweighting of every key from one baddbmm
    (O keys x 1 + B keys x factor_B + S keys x factor_S). The stats are reduced once per forward, later
    (`StepFlow._flush_stats`). Returns [B, 1, H, D]."""
    B, H, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    n_rep = H // Hkv
    decode_groups(geo)
    mkey = (Hkv, query.dtype)
    mask = geo.masks.get(mkey)
    if mask is None:  # [B * Hkv, 1, K] in the score dtype, once per forward
        m = geo.addmask[:, 0, :]
        if query.dtype != torch.float32:  # keep hidden keys finite in bf16/fp16 too
            m = m.clamp_min(torch.finfo(query.dtype).min).to(query.dtype)
        mask = geo.masks[mkey] = m[:, None, :].expand(B, Hkv, K).reshape(B * Hkv, 1, K)
    s = torch.baddbmm(mask, query.reshape(B * Hkv, n_rep, D), key.reshape(B * Hkv, K, D).transpose(1, 2),
                      alpha=scaling)  # [B * Hkv, n_rep, K]
    p = torch.softmax(s, dim=-1, dtype=torch.float32).view(B, H, K)
    groups = geo.groups  # [B, K, 3]: in B, in S, in O
    p_bs = torch.bmm(p, groups[:, :, :2])  # [B, H, 2]: p(B), p(S)
    num = torch.baddbmm(geo.tau_pair, p_bs, flow._sum_s.expand(B, 2, 2))  # (tau_B, p(B) + p(S) - tau_B)
    ratio = num / p_bs
    # fire where 1 < tau_B / p(B) < inf (0 < p(B) < tau_B) and tau_S > 0 (then p(S) > 0)
    fire = ((ratio > flow._thresholds) & (ratio < float("inf"))).all(-1, keepdim=True)  # [B, H, 1]
    factors = torch.where(fire, ratio, 1.0)  # [B, H, 2]
    p = p * torch.baddbmm(groups[:, None, :, 2], factors, geo.groups_t)  # [B, H, K]
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    if flow._stats is not None:
        flow._pending.append((layer, fire, p_bs.detach(), factors.detach(), geo.qt.tau_b))
        flow._count_eligible(layer, geo.qt, H)
    out = torch.bmm(p.view(B * Hkv, n_rep, K).to(value.dtype), value.reshape(B * Hkv, K, D))
    return out.view(B, 1, H, D)


def _oeb_block(q5: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: LayerGeometry, r0: int, r1: int,
               scaling: float, sink: torch.Tensor | None, flow, layer: int, dropout: float) -> torch.Tensor:
    """Rows r0:r1 of the forward's queries against keys [0, K'). Returns [B, H, R, D]."""
    B, Hkv, n_rep, R, D = q5.shape
    H, Kp = Hkv * n_rep, key.shape[2]
    q4 = q5.reshape(B, Hkv, n_rep * R, D)
    s = torch.matmul(q4, key.transpose(-1, -2)).to(torch.float32)  # [B, Hkv, n_rep * R, K']
    am = geo.addmask if geo.addmask.shape[1] == 1 else geo.addmask[:, r0:r1]  # [B, R or 1, K]
    s = s.view(B, Hkv, n_rep, R, Kp).mul_(scaling).add_(am[:, None, None, :, :Kp])
    if sink is not None:  # GPT-OSS: one more logit per head, its mass part of O
        s = torch.cat([s, sink.expand(B, Hkv, n_rep, R, 1)], dim=-1)
        s = s - s.amax(dim=-1, keepdim=True)
        p = torch.softmax(s, dim=-1)[..., :-1].contiguous()
    else:
        p = torch.softmax(s, dim=-1)  # [B, Hkv, n_rep, R, K']
    onehot = geo.onehot[:, :Kp]  # [B, K', 3]
    mass = torch.bmm(p.view(B, H * R, Kp), onehot).view(B, H, R, 3)  # p of question, thinking, summary keys
    gidx = geo.qt.gidx[:, None, r0:r1].expand(B, H, R, 2)
    p_bs = mass.gather(-1, gidx)  # [B, H, R, 2]: p(B), p(S)
    p_b = p_bs[..., 0]
    tau_b = geo.qt.tau_b[:, None, r0:r1]  # [B, 1, R]
    tau_s = p_bs.sum(-1) - tau_b  # 1 - p(O) - tau_B
    fire = (p_b < tau_b) & (p_b > 0) & (tau_s > 0)  # (then p(S) > tau_B - p(B) > 0 too)
    ratio = torch.stack([tau_b.expand(B, H, R), tau_s], dim=-1) / p_bs  # [B, H, R, 2]
    factors = torch.where(fire[..., None], ratio, 1.0)
    f3 = torch.ones_like(mass).scatter_(-1, gidx, factors)  # [B, H, R, 3]: factor per key segment
    mult = torch.bmm(f3.view(B, H * R, 3), onehot.transpose(1, 2))  # [B, H * R, K']
    p = p.view(B, H * R, Kp) * mult
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    if flow._stats is not None:  # fired, then p(B), p(S) before and after, summed over eligible query-heads
        el = geo.qt.eligible[:, None, r0:r1, None]  # [B, 1, R, 1]
        part = torch.cat([fire[..., None].to(torch.float32), p_bs, factors * p_bs], -1) * el  # [B, H, R, 5]
        flow._add_rows(layer, part.sum((1, 2)))
    out = torch.matmul(p.view(B, Hkv, n_rep * R, Kp).to(value.dtype), value)  # [B, Hkv, n_rep * R, D]
    return out.view(B, H, R, D)


def smi_inject(out: torch.Tensor, value: torch.Tensor, fires: torch.Tensor, pair_fire: torch.Tensor,
               pair_kidx: torch.Tensor, pair_weight: torch.Tensor, num_fires: int) -> torch.Tensor:
    """out [B, Q, H, D] plus alpha * window mean of values at each fire (row, query). Out of place, so that a
    kernel that saved its output for backward is not disturbed."""
    B, Q, H, D = out.shape
    Hkv = value.shape[1]
    fire_b = fires[0]
    vals = value[fire_b[pair_fire], :, pair_kidx, :].to(torch.float32)  # [P, Hkv, D]
    mom = torch.zeros(num_fires, Hkv, D, dtype=torch.float32, device=out.device).index_add_(
        0, pair_fire, vals * pair_weight[:, None, None])  # [F, Hkv, D]: alpha * window mean
    delta = mom.to(out.dtype)[:, :, None, :].expand(num_fires, Hkv, H // Hkv, D).reshape(num_fires, H, D)
    return out.index_put((fire_b, fires[1]), delta, accumulate=True)
