"""The OEB and SMI mathematics as pure functions: no state, no model, no engine; every engine calls these.

Odds-Equal Bridge (docs/method.md §5). For one query and head, the visible keys fall in three contiguous groups:
the bridge B, the current segment S and the rest O (a sink logit, GPT-OSS, belongs to O). With masses p(g):
- the target is tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max);
- the bridge fires where 0 < p(B) < tau_B and tau_S = p(B) + p(S) - tau_B > 0 (that is 1 - p(O) - tau_B);
- then B's probabilities are multiplied by tau_B / p(B) and S's by tau_S / p(S); O is untouched. Otherwise
  nothing changes (factor 1).
Engines that compute attention per key range (split-KV decoding, a paged cache) have each group's log-sum-exp
and normalized partial output; `oeb_merge` turns those into the bridged output. Engines that hold one query's
probabilities over its keys (decoding, one query per row) use the probability form: `key_groups` turns the keys'
segments into group indicators once per forward, and `oeb_reweight` projects the probabilities in a few batched
matmuls.

Step Momentum Injection (§5): at the first token of a new thinking step, in an SMI layer, each head's attention
output gains alpha times the mean value vector of the last w tokens of the step just completed.

Shapes: any leading dimensions `...` (batch, heads, queries); groups are the last axis in the order (B, S, O).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

BRIDGE, SEGMENT, OTHER = 0, 1, 2


def bridge_target(n_bridge, n_segment, tau_max: float):
    """tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max); 0 where the bridge is empty. Ints, floats, numpy arrays
    (float64 out) or tensors (float64 out)."""
    if isinstance(n_bridge, np.ndarray) or isinstance(n_segment, np.ndarray):
        nb = np.asarray(n_bridge, dtype=np.float64)
        ns = np.asarray(n_segment, dtype=np.float64)
        tau = np.minimum(np.sqrt(nb / np.maximum(nb + ns, 1.0)), tau_max)
        return np.where(nb > 0, tau, 0.0)
    if isinstance(n_bridge, torch.Tensor) or isinstance(n_segment, torch.Tensor):
        nb = torch.as_tensor(n_bridge, dtype=torch.float64)
        ns = torch.as_tensor(n_segment, dtype=torch.float64)
        tot = (nb + ns).clamp_min(1.0)
        return torch.where(nb > 0, torch.sqrt(nb / tot).clamp_max(tau_max), torch.zeros_like(nb))
    if n_bridge <= 0:
        return 0.0
    return min(math.sqrt(n_bridge / (n_bridge + n_segment)), tau_max)


def segment_codes(pos, t0, s0):
    """Each position's segment: 0 question (before t0), 1 thinking, 2 summary (from s0). pos, t0, s0: ints, numpy
    arrays (int64 out) or tensors (long out), broadcasting."""
    if isinstance(pos, torch.Tensor):
        return (pos >= t0).long() + (pos >= s0).long()
    if isinstance(pos, np.ndarray):
        return (pos >= t0).astype(np.int64) + (pos >= s0)
    return int(pos >= t0) + int(pos >= s0)


def hidden_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Keys at positions kpos [K] that a query at position qpos [...] does not see (past its position, or out
    of its sliding window of `window` keys): bool [..., K]."""
    hidden = kpos > qpos[..., None]
    if window:
        hidden |= kpos <= qpos[..., None] - window
    return hidden


def query_groups(q: int, t0: int, s0: int, lo: int = 0, window: int | None = None
                 ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The bridge and segment key ranges ([start, end) positions, only keys the query sees) of the query at
    position `q` of a row whose real tokens start at `lo`, thinking at `t0` and summary at `s0` (past every
    position while not known yet); `window`: a sliding window's size. Query in thinking: B = question, S =
    thinking up to the query; in summary: B = thinking, S = summary up to the query. None for a question query
    or an empty bridge: OEB leaves that query alone."""
    seg = segment_codes(q, t0, s0)
    if seg == 0 or q < lo:
        return None
    vis_lo = max(lo, q - window + 1) if window else lo
    b_lo, b_hi = (t0, s0) if seg == 2 else (lo, t0)
    bridge = (max(b_lo, vis_lo), max(min(b_hi, q + 1), max(b_lo, vis_lo)))
    segment = (max(b_hi, vis_lo), q + 1)
    if bridge[1] <= bridge[0]:
        return None
    return bridge, segment


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


def oeb_merge(out: torch.Tensor, lse: torch.Tensor, tau_bridge: torch.Tensor, sink: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bridged attention output from per-group partial results.

    out: [..., 3, D] each group's softmax-normalized partial output (any values where the group is empty);
    lse: [..., 3] each group's log-sum-exp of scaled logits (-inf for an empty group);
    tau_bridge: [...] targets (0 where OEB must not act); sink: [...] an extra logit whose mass belongs to O
    and which carries no value (GPT-OSS), or None.
    Returns (output [..., D] in out's dtype, fired [...], masses before [..., 2] = (p(B), p(S)), masses after
    [..., 2]), computed in float32.
    """
    lse = lse.to(torch.float32)
    parts = lse if sink is None else torch.cat([lse, sink.to(torch.float32)[..., None]], dim=-1)
    total = torch.logsumexp(parts, dim=-1, keepdim=True)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    p = torch.exp(lse - total)  # [..., 3]
    tau = torch.as_tensor(tau_bridge, dtype=torch.float32, device=lse.device)
    factor_b, factor_s, fired = oeb_factors(p[..., BRIDGE], p[..., SEGMENT], tau)
    w = p * torch.stack([factor_b, factor_s, torch.ones_like(factor_b)], dim=-1)
    o = torch.where(torch.isfinite(lse)[..., None], out.to(torch.float32), 0.0)
    merged = (w[..., None] * o).sum(-2)
    before = p[..., :2]
    return merged.to(out.dtype), fired, before, w[..., :2]


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


def group_partials(scores: torch.Tensor, value: torch.Tensor, group: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group log-sum-exps and normalized partial outputs of one query's attention (a slow, plain helper: the
    tests' reference for the split-KV kernels and `oeb_merge`).

    scores: [..., K] scaled logits (-inf = hidden); value: [..., K, D]; group: [..., K] long in {0, 1, 2}
    (B, S, O). Returns (out [..., 3, D], lse [..., 3]).
    """
    scores = scores.to(torch.float32)
    onehot = torch.nn.functional.one_hot(group.long(), 3).to(torch.bool)  # [..., K, 3]
    s3 = torch.where(onehot, scores[..., None], float("-inf"))  # [..., K, 3]
    lse = torch.logsumexp(s3, dim=-2)  # [..., 3]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(s3 - safe[..., None, :])  # [..., K, 3], 0 on hidden and other-group keys
    out = torch.einsum("...kg,...kd->...gd", w, value.to(torch.float32))
    return out, lse


def step_momentum(window_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha times the mean value vector of a window: [..., w, D] -> [..., D] (float32)."""
    return alpha * window_values.to(torch.float32).mean(dim=-2)


def smi_window(step_start: int, step_end: int, window: int | str) -> tuple[int, int]:
    """The token range whose values SMI averages for a completed step [step_start, step_end): its last
    `window` tokens, or the whole step for window="step"."""
    if window == "step":
        return step_start, step_end
    return max(step_start, step_end - int(window)), step_end
