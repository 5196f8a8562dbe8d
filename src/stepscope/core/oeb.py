"""The Odds-Equal Bridge as pure functions (docs/method.md §5): no state, no model, no engine; every engine calls these.

For one query and head, the visible keys fall in three groups: the bridge B, the current segment S and the rest
O (a sink logit, GPT-OSS, belongs to O). With masses p(g):
- the target is tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max) (`geometry.query_geometry`);
- the bridge fires where 0 < p(B) < tau_B and tau_S = p(B) + p(S) - tau_B > 0 (that is 1 - p(O) - tau_B);
- then B's probabilities are multiplied by tau_B / p(B) and S's by tau_S / p(S); O is untouched. Otherwise
  nothing changes (factor 1). `oeb_factors` is this rule; every form below applies it.

Forms (each a layout of the same computation; tests/test_functional.py and the engines' tests check each against
one slow, dense reference):
- `oeb_factors`: masses -> multipliers (the transformers engine's prefill block path, flow/oeb.py);
- `key_groups` + `oeb_reweight`: the probability form of rows with one query each (decoding, in both engines);
- `oeb_rows`: Q queries of one row over its gathered keys (vLLM's prefill rows);
- `oeb_decode_blocks`: decoding rows over their paged-cache blocks as the cache holds them (vLLM);
- the fused Triton kernels (core/kernels.py), run through the one kernel policy (core/kernel_policy.py).
Probabilities are float32.
"""

from __future__ import annotations

import functools

import torch

from .geometry import hidden_keys, segment_onehot

BLOCK_ELEMS = 1 << 22  # most (head, query, key) scores one block of `oeb_rows` holds


def oeb_factors(p_bridge: torch.Tensor, p_segment: torch.Tensor, tau_bridge: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL projection's multipliers of B's and S's probabilities, and where it fires.

    p_bridge, p_segment: [...] masses (float32); tau_bridge: [...] targets, broadcastable (0 = not eligible).
    Returns (factor_b, factor_s, fired), factor 1 where it does not fire.
    """
    tau_s = p_bridge + p_segment - tau_bridge  # 1 - p(O) - tau_B
    fired = (p_bridge < tau_bridge) & (p_bridge > 0) & (tau_s > 0)  # (then p(S) > tau_B - p(B) > 0 too)
    factor_b = torch.where(fired, tau_bridge / p_bridge, 1.0)
    factor_s = torch.where(fired, tau_s / p_segment, 1.0)
    return factor_b, factor_s, fired


def key_groups(onehot: torch.Tensor, gidx: torch.Tensor, tau_b: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probability form's key indicators of rows with one query each.

    onehot: [B, K, 3] float32, each key's segment (question, thinking, summary) one-hot (any row for a key the
    query does not see: its probability is 0); gidx: [B, 2] long, the segment of the row's B and of its S;
    tau_b: [B] float32 targets. Returns (groups [B, K, 3]: key in B, in S, in O; groups_t [B, 2, K]: the B and S
    columns transposed; tau_pair [B, 1, 2] = (tau_B, -tau_B)). The O column is 1 - B - S, so that keys of any
    segment keep weight 1 when nothing fires (a question query has B = S = question: its O column is -1 there,
    and it never fires)."""
    seg = torch.arange(3, device=gidx.device)
    in_b = (gidx[:, None, 0] == seg).to(torch.float32)  # [B, 3]
    in_s = (gidx[:, None, 1] == seg).to(torch.float32)
    sel = torch.stack([in_b, in_s, 1.0 - in_b - in_s], dim=-1)  # [B, 3 segments, 3 groups]
    groups = torch.bmm(onehot, sel)  # [B, K, 3]
    groups_t = torch.bmm(sel[:, :, :2].transpose(1, 2), onehot.transpose(1, 2))  # [B, 2, K]
    tau = tau_b.to(torch.float32)[:, None]
    return groups, groups_t, torch.stack([tau, -tau], dim=-1)


@functools.cache
def _reweight_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Firing thresholds of (tau_B / p(B), tau_S / p(S)), and the map (p(B), p(S)) -> (0, p(B) + p(S)).

    Made outside inference mode: a cached inference tensor could not take part in a later forward that
    records gradients."""
    with torch.inference_mode(False):
        return (torch.tensor([1.0, 0.0], device=device),
                torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], device=device))


def oeb_reweight(p: torch.Tensor, groups: torch.Tensor, groups_t: torch.Tensor, tau_pair: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bridge in the probability form: one query per row, its probabilities over its keys reweighted.

    p: [B, H, K] float32 attention probabilities (a sink's mass, GPT-OSS, counted in their normalization but
    not among the keys: it belongs to O); groups, groups_t, tau_pair: `key_groups` of the rows.
    Returns (p' [B, H, K], fired [B, H, 1] bool, masses before [B, H, 2] = (p(B), p(S)), factors [B, H, 2] =
    (tau_B / p(B), tau_S / p(S)) where fired, else 1).

    The same test and factors as `oeb_factors`, in fewer kernels: (tau_B, tau_S) from one baddbmm, their ratios
    to (p(B), p(S)) from one division (fired where 1 < tau_B / p(B) < inf and tau_S / p(S) > 0), and every key's
    multiplier (O keys x 1, B keys x factor_B, S keys x factor_S) from one more baddbmm."""
    thresholds, sum_s = _reweight_constants(p.device)
    B = p.shape[0]
    p_bs = torch.bmm(p, groups[:, :, :2])  # [B, H, 2]: p(B), p(S)
    num = torch.baddbmm(tau_pair, p_bs, sum_s.expand(B, 2, 2))  # (tau_B, p(B) + p(S) - tau_B)
    ratio = num / p_bs
    fired = ((ratio > thresholds) & (ratio < float("inf"))).all(-1, keepdim=True)  # [B, H, 1]
    factors = torch.where(fired, ratio, 1.0)  # [B, H, 2]
    return p * torch.baddbmm(groups[:, None, :, 2], factors, groups_t), fired, p_bs, factors


def _bridged(s: torch.Tensor, hidden: torch.Tensor, groups, sinks: torch.Tensor | None):
    """Scores s [B, H, K] float32 (contiguous, overwritten), hidden [B, 1, K] -> `oeb_reweight` of their
    softmax (with a sink logit per head when given)."""
    s.masked_fill_(hidden, float("-inf"))
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:
        B, H, _ = s.shape
        p = torch.softmax(torch.cat([s, sinks.to(torch.float32).view(1, H, 1).expand(B, H, 1)], -1), dim=-1)[..., :-1]
    return oeb_reweight(p, *groups)


def oeb_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor,
             gidx: torch.Tensor, tau: torch.Tensor, codes: torch.Tensor, scale: float, window: int | None = None,
             sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of Q queries of one row.

    query [Q, H, D]; keys/values [Hkv, S, D] (the row's keys 0..S-1); qpos [Q] long (each query's position;
    it sees keys <= qpos, and > qpos - window in a sliding-window layer); gidx [Q, 2] long; tau [Q] float32
    (0: OEB leaves the query alone); codes [S] long; sinks [H] or None (GPT-OSS).
    Returns (out [Q, H, D] float32, fired [Q, H], masses before [Q, H, 2], after [Q, H, 2]).
    """
    Q, H, D = query.shape
    hkv, S = keys.shape[0], keys.shape[1]
    n_rep = H // hkv
    k_t = keys.to(torch.float32).transpose(-1, -2)  # [Hkv, D, S]
    v = values.to(torch.float32)
    onehot = segment_onehot(codes)  # [S, 3]
    step = max(1, BLOCK_ELEMS // max(1, H * S))
    parts = []
    for a in range(0, Q, step):
        q = query[a:a + step].to(torch.float32)
        n = q.shape[0]
        # one plain batched product per kv head: its n_rep * n queries against its keys
        q = q.view(n, hkv, n_rep, D).permute(1, 2, 0, 3).reshape(hkv, n_rep * n, D)
        s = (torch.bmm(q, k_t) * scale).view(hkv, n_rep, n, S).permute(2, 0, 1, 3).reshape(n, H, S)
        groups = key_groups(onehot.expand(n, S, 3), gidx[a:a + n], tau[a:a + n])
        hidden = hidden_keys(qpos[a:a + n, None], torch.arange(S, device=qpos.device), window)
        p, fired, p_bs, factors = _bridged(s, hidden, groups, sinks)
        out = torch.bmm(p.view(n, hkv, n_rep, S).permute(1, 2, 0, 3).reshape(hkv, n_rep * n, S), v)
        parts.append((out.view(hkv, n_rep, n, D).permute(2, 0, 1, 3).reshape(n, H, D), fired[..., 0], p_bs,
                      p_bs * factors))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def oeb_decode_blocks(query: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor,
                      groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scale: float,
                      sinks: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of R decoding rows (one query each) over their n cache blocks of `bs` keys each.

    query [R, H, D]; keys_t [R * n * Hkv, D, bs] (each block's keys of one kv head, transposed; any strides a
    batched matmul takes) and values [R * n * Hkv, bs, D], in (row, block, kv head) order, as
    `paged.*Layout.blocks` hands them out; hidden [R, 1, n * bs] bool: keys the row's query does not see
    (`geometry.hidden_keys`; every slot past a row's keys among them); groups: `key_groups` of the
    rows over the n * bs keys; sinks [H] or None. Values of hidden slots must be finite (they are weighted by 0).
    Returns (out [R, H, D] float32, fired [R, H, 1], masses before [R, H, 2], factors [R, H, 2]).
    """
    R, H, D = query.shape
    N, _, bs = keys_t.shape
    Sp = hidden.shape[-1]
    n = Sp // bs
    hkv = N // (R * n)
    n_rep = H // hkv
    q = (query.to(torch.float32) * scale).view(R, 1, hkv, n_rep, D).expand(R, n, hkv, n_rep, D)
    s = torch.bmm(q.reshape(N, n_rep, D), keys_t.to(torch.float32))  # [R * n * Hkv, n_rep, bs]
    s = s.view(R, n, hkv, n_rep, bs).permute(0, 2, 3, 1, 4).reshape(R, H, Sp)
    p, fired, p_bs, factors = _bridged(s, hidden, groups, sinks)
    p = p.view(R, hkv, n_rep, n, bs).permute(0, 3, 1, 2, 4).reshape(N, n_rep, bs)
    out = torch.bmm(p, values.to(torch.float32)).view(R, n, H, D).sum(1)
    return out, fired, p_bs, factors
