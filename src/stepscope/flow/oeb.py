"""The Odds-Equal Bridge in PyTorch: attention of one OEB layer, row-blocked, and its decoding-step form.

Row-blocked (never more than `block_elems` scores at once): scores -> softmax (with GPT-OSS sinks as an extra
logit whose mass belongs to O) -> per-segment masses by one small matmul with the key-segment one-hot -> p(B),
p(S) of each query and head -> `core.oeb.oeb_factors` (where p(B) < tau_B and p(B), tau_S > 0, B's
probabilities times tau_B / p(B) and S's times tau_S / p(S), tau_S = 1 - p(O) - tau_B; O untouched). This equals
adding log(tau_B / p(B)) and log(tau_S / p(S)) to the logits (docs/method.md §5), without a second softmax.

One query per row (decoding, no sinks): the same mathematics in about 15 kernels, as batched matmuls with the
group indicators (`_oeb_decode`, through `core.oeb.oeb_reweight`, the probability form vLLM's decoding rows
use too); tests/test_stepflow_decode.py checks it against the block path.

Decisions (ours): OEB leaves a query alone when the projection does not exist, i.e. p(B) = 0 (nothing to
scale) or tau_S <= 0 (the rest O, sink included, already holds more than 1 - tau_B). Probabilities are
computed in float32 (as transformers' eager path does), the weighted sum of values in the value dtype.

`stats`: a `flow_stats.FlowStats` that records fires and masses, or None (nothing recorded).
"""

from __future__ import annotations

import torch

from ..core.oeb import oeb_factors, oeb_reweight
from ..core.tally import tally_part
from .state import OebGeometry


def oeb_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: OebGeometry,
                  scaling: float, sinks: torch.Tensor | None, *, block_elems: int, stats=None, layer: int = 0,
                  dropout: float = 0.0) -> torch.Tensor:
    """Attention with the Odds-Equal Bridge. query [B, H, Q, D], key/value [B, Hkv, K, D]; returns [B, Q, H, D].

    The query heads of a GQA group are stacked as rows of one matrix per kv head ([B, Hkv, n_rep * R, D]), so
    every product is a plain batched matmul (no broadcast copies of keys or values).
    """
    B, H, Q, D = query.shape
    if Q == 1 and geo.decode is not None and sinks is None:
        return _oeb_decode(query, key, value, geo, scaling, stats, layer, dropout)
    Hkv, K = key.shape[1], key.shape[2]
    n_rep = H // Hkv
    q5 = query.view(B, Hkv, n_rep, Q, D) if query.is_contiguous() else query.reshape(B, Hkv, n_rep, Q, D)
    sink = None
    if sinks is not None:
        sink = sinks.reshape(1, Hkv, n_rep, 1, 1).to(torch.float32)
    rows = max(1, block_elems // max(1, B * H * K))
    outs = []
    for r0 in range(0, Q, rows):
        r1 = min(Q, r0 + rows)
        kend = min(K, geo.first_query + r1)  # causal: later keys are hidden from these rows
        outs.append(_oeb_block(q5[:, :, :, r0:r1], key[:, :, :kend], value[:, :, :kend], geo, r0, r1,
                               scaling, sink, stats, layer, dropout))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [B, H, Q, D]
    if stats is not None:
        stats.add_eligible(layer, geo.qt, H)
    return out.transpose(1, 2).contiguous()


def _oeb_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: OebGeometry, scaling: float,
                stats, layer: int, dropout: float) -> torch.Tensor:
    """One query per row (decoding): the same mathematics as `_oeb_block`, in about 15 kernels.

    Scores, scale and mask come from one baddbmm, the group masses (p_B, p_S) from one bmm with the group
    indicators, the targets (tau_B, tau_S) from one more, and the reweighting of every key from one baddbmm
    (O keys x 1 + B keys x factor_B + S keys x factor_S). The stats are reduced once per forward, later
    (`FlowStats.flush`). Returns [B, 1, H, D]."""
    B, H, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    n_rep = H // Hkv
    groups = geo.decode_groups()
    mkey = (Hkv, query.dtype)
    mask = geo.decode.masks.get(mkey)
    if mask is None:  # [B * Hkv, 1, K] in the score dtype, once per forward
        m = geo.addmask[:, 0, :]
        if query.dtype != torch.float32:  # keep hidden keys finite in bf16/fp16 too
            m = m.clamp_min(torch.finfo(query.dtype).min).to(query.dtype)
        mask = geo.decode.masks[mkey] = m[:, None, :].expand(B, Hkv, K).reshape(B * Hkv, 1, K)
    s = torch.baddbmm(mask, query.reshape(B * Hkv, n_rep, D), key.reshape(B * Hkv, K, D).transpose(1, 2),
                      alpha=scaling)  # [B * Hkv, n_rep, K]
    p = torch.softmax(s, dim=-1, dtype=torch.float32).view(B, H, K)
    p, fire, p_bs, factors = oeb_reweight(p, *groups)
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    if stats is not None:
        stats.add_decode(layer, fire, p_bs, factors, geo.qt.tau_b)
        stats.add_eligible(layer, geo.qt, H)
    out = torch.bmm(p.view(B * Hkv, n_rep, K).to(value.dtype), value.reshape(B * Hkv, K, D))
    return out.view(B, 1, H, D)


def _oeb_block(q5: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: OebGeometry, r0: int, r1: int,
               scaling: float, sink: torch.Tensor | None, stats, layer: int, dropout: float) -> torch.Tensor:
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
    tau_b = geo.qt.tau_b[:, None, r0:r1]  # [B, 1, R]
    factor_b, factor_s, fire = oeb_factors(p_bs[..., 0], p_bs[..., 1], tau_b)  # [B, H, R] each
    factors = torch.stack([factor_b, factor_s], dim=-1)  # [B, H, R, 2]
    f3 = torch.ones_like(mass).scatter_(-1, gidx, factors)  # [B, H, R, 3]: factor per key segment
    mult = torch.bmm(f3.view(B, H * R, 3), onehot.transpose(1, 2))  # [B, H * R, K']
    p = p.view(B, H * R, Kp) * mult
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    if stats is not None:  # fired, then p(B), p(S) before and after, summed over eligible query-heads
        el = geo.qt.eligible[:, None, r0:r1, None]  # [B, 1, R, 1]
        part = tally_part(fire, p_bs, factors * p_bs) * el  # [B, H, R, 5]
        stats.add_rows(layer, part.sum((1, 2)))
    out = torch.matmul(p.view(B, Hkv, n_rep * R, Kp).to(value.dtype), value)  # [B, Hkv, n_rep * R, D]
    return out.view(B, H, R, D)
