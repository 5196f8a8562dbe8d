"""StepFlow's attention for rows of a vLLM batch: OEB recomputed over one row's keys, SMI added to its output.

Both go through the pure mathematics of `stepscope.flow.functional` (docs/method.md §5): the queries' attention
is split into the per-group log-sum-exps and partial outputs of the bridge B, the segment S and the rest O
(`group_partials`), and `oeb_merge` turns them into the bridged output; SMI adds `step_momentum` of the window.
Scores and probabilities are float32. Engine-free: tests/test_vllm_attention.py checks both against a dense
softmax reference.
"""

from __future__ import annotations

import torch

from ..flow.functional import group_partials, oeb_merge, step_momentum

BLOCK_ELEMS = 1 << 22  # most (head, query, key, group) entries one block of queries holds


def key_groups(codes: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
    """Group of every key for every query: codes [S] (key segment 0 question, 1 thinking, 2 summary), gidx
    [Q, 2] (segment of each query's B and S) -> [Q, S] long in {0 = B, 1 = S, 2 = O}."""
    c = codes[None, :]
    return torch.where(c == gidx[:, :1], 0, torch.where(c == gidx[:, 1:], 1, 2))


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
    kf = keys.to(torch.float32)[:, None]  # [Hkv, 1, S, D]
    vf = values.to(torch.float32)[:, None, None]  # [Hkv, 1, 1, S, D]
    kpos = torch.arange(S)
    step = max(1, BLOCK_ELEMS // max(1, H * S * 3))
    outs, fires, befores, afters = [], [], [], []
    for a in range(0, Q, step):
        b = min(Q, a + step)
        R = b - a
        q5 = query[a:b].to(torch.float32).view(R, hkv, n_rep, D).permute(1, 2, 0, 3)  # [Hkv, n_rep, R, D]
        s = torch.matmul(q5, kf.transpose(-1, -2)) * scale  # [Hkv, n_rep, R, S]
        hidden = kpos[None, :] > qpos[a:b, None]  # [R, S]
        if window:
            hidden |= kpos[None, :] <= qpos[a:b, None] - window
        s = s.masked_fill(hidden, float("-inf"))
        part_out, lse = group_partials(s, vf, key_groups(codes, gidx[a:b]))  # [Hkv, n_rep, R, 3, D], [.., 3]
        sink = None if sinks is None else sinks.to(torch.float32).view(hkv, n_rep, 1).expand(hkv, n_rep, R)
        merged, fired, before, after = oeb_merge(part_out, lse, tau[a:b], sink)  # [Hkv, n_rep, R, D] ...
        outs.append(merged.permute(2, 0, 1, 3).reshape(R, H, D))
        fires.append(fired.permute(2, 0, 1).reshape(R, H))
        befores.append(before.permute(2, 0, 1, 3).reshape(R, H, 2))
        afters.append(after.permute(2, 0, 1, 3).reshape(R, H, 2))
    return torch.cat(outs), torch.cat(fires), torch.cat(befores), torch.cat(afters)


def smi_delta(values: torch.Tensor, ws: int, we: int, qpos: int, alpha: float, n_rep: int,
              window: int | None = None) -> torch.Tensor | None:
    """alpha times the mean value vector of keys [ws, we) (only those the query at `qpos` sees in a
    sliding-window layer), per query head: values [Hkv, S, D] -> [H, D] float32, or None when no key is seen."""
    lo = max(ws, qpos - window + 1) if window else ws
    if lo >= we:
        return None
    return step_momentum(values[:, lo:we], alpha).repeat_interleave(n_rep, dim=0)
